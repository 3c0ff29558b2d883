"""The live path's removals go through the same guard as a listing's (issue #11 item 5).

A live ``VANISHED 1:9999999`` from a broken server names every UID we have;
applied unchecked it would empty the mailbox into the trash. Expunges seen
one at a time, and any number in a \\Trash folder, pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mirrord.flags import Flags
from mirrord.protocol.client import ListEntry
from mirrord.store.maildir import Maildir
from mirrord.store.state import MessageRecord, StateDB
from mirrord.sync.engine import MassRemoval
from mirrord.sync.mailbox import MailboxSync

N = 40


def make(tmp_path: Path, attributes: frozenset[str] = frozenset()) -> MailboxSync:
    state = StateDB(tmp_path / "state.db")
    state.set_mailbox("acct", "Box", 7)
    maildir = Maildir(tmp_path / "Mail" / "Box")
    records = []
    for uid in range(1, N + 1):
        tmp = maildir.open_tmp()
        tmp.write(b"Subject: %d\n\nbody\n" % uid)
        tmp.close_write()
        tmp.sync()
        maildir.deliver_many([(tmp, Flags())])
        records.append(MessageRecord(uid, tmp.key, Flags(), 20))
    state.add_messages("acct", "Box", records)
    pool: Any = None  # apply_changes is local work only
    return MailboxSync(account="acct", entry=ListEntry(b"Box", "Box", "/", attributes), local_name="Box",
                       maildir=maildir, state=state, pool=pool)


def files(sync: MailboxSync) -> int:
    return len(sync.maildir.scan())


def test_live_vanished_of_the_whole_mailbox_stops_and_asks(tmp_path: Path) -> None:
    sync = make(tmp_path)
    with pytest.raises(MassRemoval, match=f"would remove {N} of {N}"):
        sync.apply_changes(list(range(1, 10_000)), {})
    assert files(sync) == N and sync.state.count("acct", "Box") == N


def test_live_expunges_one_at_a_time_are_applied(tmp_path: Path) -> None:
    sync = make(tmp_path)
    for uid in range(1, N + 1):
        assert sync.apply_changes([uid], {}).removed == 1
    assert files(sync) == 0


def test_live_vanished_in_trash_is_applied(tmp_path: Path) -> None:
    sync = make(tmp_path, frozenset({"\\Trash"}))
    assert sync.apply_changes(list(range(1, N + 1)), {}).removed == N
    assert files(sync) == 0
