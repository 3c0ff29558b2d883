"""Invariant 7 at the callers: a body the state refuses is discarded, never put in place.

The state refuses a second file for a recorded or pending UID (schema v4,
see ``tests/unit/test_state.py``); these tests check what the sync does then:
a refetched body is aborted (no file in new/, cur/ or tmp/, the first copy's
row and file untouched), and recovery settles a pending second copy that an
older version left, keeping the recorded one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import defer, task

from mirrord.flags import Flags
from mirrord.store.maildir import Maildir, Trash
from mirrord.store.state import MessageRecord
from mirrord.sync.mailbox import MailboxResult, MailboxSync
from tests.unit.test_durable_fetch import fake_fetch, sync, tmp_files  # noqa: F401 - the fixture

A, INBOX = "acct", "INBOX"


@pytest.mark.parametrize("new_mail", [False, True], ids=["batch", "burst-of-new-mail"])
def test_a_refetched_body_is_discarded_and_the_first_copy_kept(sync: MailboxSync, new_mail: bool) -> None:  # noqa: F811
    first = defer.Deferred.fromCoroutine(sync._receive(fake_fetch(sync, 2), MailboxResult(A, INBOX)))
    sync.syncer.release()  # type: ignore[attr-defined]
    first.result  # noqa: B018 - raises if it failed
    before = sync.state.messages(A, INBOX)
    files_before = sync.maildir.scan()
    assert len(files_before) == 2

    # A retry that (wrongly) fetches messages 1..5 again: only 3..5 are new.
    # The refused bodies share fsync calls with new ones, still running
    # when the rows are refused: discarding them must not fail those calls.
    result = MailboxResult(A, INBOX)
    options = {"flush_every": 1, "flush_soon": task.Clock()} if new_mail else {}
    again = defer.Deferred.fromCoroutine(sync._receive(fake_fetch(sync, 5), result, **options))  # type: ignore[arg-type]
    sync.syncer.release()  # type: ignore[attr-defined]
    again.result  # noqa: B018

    after = sync.state.messages(A, INBOX)
    assert {u: after[u] for u in before} == before  # no row replaced
    assert set(after) == {1, 2, 3, 4, 5}
    files = sync.maildir.scan()
    assert len(files) == 5 and set(files_before) <= set(files)
    assert set(files) == {r.key for r in after.values()}
    assert tmp_files(sync) == []
    assert result.fetched == 3
    assert sync.state.pending(A, INBOX) == {}


def test_recovery_drops_a_pending_second_copy_of_a_recorded_uid(sync: MailboxSync, tmp_path: Path) -> None:  # noqa: F811
    """Older versions could leave a pending row for a recorded UID: the recorded copy stays."""
    md: Maildir = sync.maildir
    sync.trash = Trash(tmp_path / "trash", 30)
    keys = []
    for body in (b"Subject: one\r\n\r\n1\r\n", b"Subject: one\r\n\r\n1\r\n"):
        tmp = md.open_tmp()
        tmp.write(body)
        keys.append(md.deliver(tmp, Flags()))
    sync.state.add_messages(A, INBOX, [MessageRecord(1, keys[0], Flags(), 20)])
    sync.state._db.execute("DROP TRIGGER IF EXISTS pending_one_file")  # as an older schema allowed
    sync.state._db.execute("INSERT INTO pending (account, mailbox, uid, key, flags, size) VALUES ('acct', 'INBOX', 1, ?, '', 20)", (keys[1],))
    sync.recover()
    assert sync.state.pending(A, INBOX) == {}
    assert sync.state.messages(A, INBOX)[1].key == keys[0]
    assert set(md.scan()) == {keys[0]}
