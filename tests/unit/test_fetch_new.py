"""New mail in one round trip: EXAMINE and UID FETCH go out together, on StringTransport.

The worker's connection is a real MirrordIMAP4Client on a StringTransport;
the test plays the server. What is checked: the exact bytes sent before any
answer (both commands, so one round trip), that what arrives lands in the
Maildir and the state, that a changed UIDVALIDITY records nothing, and that
a server answering the pipelined FETCH from an older view (so the fetch
brings less than EXAMINE's UIDNEXT promised) gets a second UID FETCH rather
than leaving the message behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mirrord._fs import InlineSyncer
from mirrord.flags import Flags
from mirrord.pool import WorkerPool
from mirrord.protocol.client import ListEntry, MirrordIMAP4Client
from mirrord.store.maildir import Maildir
from mirrord.store.state import MessageRecord, StateDB
from mirrord.sync.engine import UidValidityChanged
from mirrord.sync.mailbox import MailboxSync
from tests.unit.test_protocol_client import connected, fetch_response, result_of, run, sent

BODY = b"Subject: new\r\n\r\nhello\r\n"


def examine_answer(tag: bytes, uidvalidity: int = 7, uidnext: int | None = 7, exists: int = 6) -> bytes:
    next_line = b"* OK [UIDNEXT %d] ok\r\n" % uidnext if uidnext is not None else b""
    return (
        b"* FLAGS (\\Seen)\r\n* %d EXISTS\r\n* OK [UIDVALIDITY %d] ok\r\n%s"
        b"%s OK [READ-ONLY] done\r\n" % (exists, uidvalidity, next_line, tag)
    )


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.client, self.transport, self.clock = connected()
        self.state = StateDB(tmp_path / "state.db")
        self.state.set_mailbox("acct", "INBOX", 7)
        self.state.add_messages("acct", "INBOX", [MessageRecord(5, "k5", Flags(), 10)])
        self.maildir = Maildir(tmp_path / "Mail" / "INBOX")

        async def connect(label: str) -> MirrordIMAP4Client:
            return self.client

        settings: Any = type("S", (), {"name": "acct", "host": "127.0.0.1", "compress": "no"})()
        self.pool = WorkerPool(None, settings, "pw", 1, connect=connect)
        entry = ListEntry(b"INBOX", "INBOX", "/", frozenset())
        self.sync = MailboxSync(
            account="acct", entry=entry, local_name="INBOX", maildir=self.maildir, state=self.state, pool=self.pool
        )
        # Disk work in place: these tests drive the protocol by hand, with no reactor.
        self.sync.syncer = InlineSyncer()

    def files(self) -> list[bytes]:
        return [p.read_bytes() for sub in ("new", "cur") for p in (self.maildir.path / sub).iterdir()]


def test_examine_and_fetch_go_out_together_and_the_mail_lands(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    d = run(h.sync.fetch_new())
    # Both commands before any answer: one round trip.
    assert sent(h.transport) == (
        b'M1 EXAMINE "INBOX"\r\nM2 UID FETCH 6:* (UID FLAGS RFC822.SIZE BODY.PEEK[])\r\n'
    )
    h.client.dataReceived(examine_answer(b"M1") + fetch_response(6, 6, BODY, b"") + b"M2 OK done\r\n")
    result = result_of(d)
    assert result.fetched == 1
    assert h.files() == [BODY.replace(b"\r\n", b"\n")]
    assert h.state.highest_uid("acct", "INBOX") == 6
    assert sent(h.transport) == b""  # nothing more: UIDNEXT 7 is covered


def test_the_next_arrival_on_the_same_worker_is_one_round_trip_too(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    d = run(h.sync.fetch_new())
    sent(h.transport)
    h.client.dataReceived(examine_answer(b"M1") + fetch_response(6, 6, BODY, b"") + b"M2 OK done\r\n")
    result_of(d)
    d = run(h.sync.fetch_new())
    # No NOOP first: a NOOP's UID FETCH behind it would see Dovecot's old view.
    assert sent(h.transport) == (
        b'M3 EXAMINE "INBOX"\r\nM4 UID FETCH 7:* (UID FLAGS RFC822.SIZE BODY.PEEK[])\r\n'
    )
    h.client.dataReceived(
        examine_answer(b"M3", uidnext=8, exists=7) + fetch_response(7, 7, BODY + b"2", b"") + b"M4 OK done\r\n"
    )
    assert result_of(d).fetched == 1


def test_a_changed_uidvalidity_records_nothing(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    d = run(h.sync.fetch_new())
    sent(h.transport)
    h.client.dataReceived(examine_answer(b"M1", uidvalidity=99) + fetch_response(6, 6, BODY, b"") + b"M2 OK done\r\n")
    with pytest.raises(UidValidityChanged):
        result_of(d)
    assert h.files() == []
    assert h.state.highest_uid("acct", "INBOX") == 5


def test_a_fetch_answered_from_an_older_view_is_followed_by_another(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    d = run(h.sync.fetch_new())
    sent(h.transport)
    # EXAMINE says UID 6 exists, but the pipelined fetch only returns the old
    # last message (``6:*`` always includes the highest one): filtered out.
    h.client.dataReceived(examine_answer(b"M1") + fetch_response(5, 5, b"old", b"") + b"M2 OK done\r\n")
    assert not d.called
    assert sent(h.transport) == b"M3 UID FETCH 6:* (UID FLAGS RFC822.SIZE BODY.PEEK[])\r\n"
    h.client.dataReceived(fetch_response(6, 6, BODY, b"") + b"M3 OK done\r\n")
    assert result_of(d).fetched == 1
    assert h.files() == [BODY.replace(b"\r\n", b"\n")]


def test_a_failed_examine_fails_the_job_without_fetching(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    d = run(h.sync.fetch_new())
    sent(h.transport)
    h.client.dataReceived(b"M1 NO no such mailbox\r\nM2 BAD no mailbox selected\r\n")
    with pytest.raises(Exception, match="no such mailbox"):
        result_of(d)
    assert h.files() == []


def test_pipeline_block_sends_exclusive_commands_back_to_back() -> None:
    client, transport, _ = connected()
    with client.pipeline():
        first = run(client.examine(b"INBOX"))
        second = run(client.examine(b"Other"))
    assert sent(transport) == b'M1 EXAMINE "INBOX"\r\nM2 EXAMINE "Other"\r\n'
    # Outside the block the usual rule holds again: wait for the pipeline to drain.
    third = run(client.noop())
    assert sent(transport) == b""
    client.dataReceived(examine_answer(b"M1") + examine_answer(b"M2"))
    assert result_of(first).uidvalidity == 7 and result_of(second).uidvalidity == 7
    assert sent(transport) == b"M3 NOOP\r\n"
    client.dataReceived(b"M3 OK\r\n")
    result_of(third)


def test_without_uidnext_the_message_count_is_the_hint(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    d = run(h.sync.fetch_new())
    sent(h.transport)
    # Courier gives no UIDNEXT: EXAMINE's 2 messages against 1 here after a fetch that brought nothing.
    h.client.dataReceived(examine_answer(b"M1", uidnext=None, exists=2) + b"M2 OK done\r\n")
    assert sent(h.transport) == b"M3 UID FETCH 6:* (UID FLAGS RFC822.SIZE BODY.PEEK[])\r\n"
    h.client.dataReceived(fetch_response(2, 6, BODY, b"") + b"M3 OK done\r\n")
    assert result_of(d).fetched == 1


def test_a_batch_behind_its_examine_records_nothing_under_a_new_uidvalidity(tmp_path: Path) -> None:
    """A sync's fetch batch on a worker that did not list sends EXAMINE with the
    FETCH behind it; bodies that arrive under another UIDVALIDITY name other
    mail and must not be recorded (DESIGN invariant 3)."""
    from mirrord.sync.mailbox import MailboxResult

    h = Harness(tmp_path)
    worker = h.pool._all[0]
    d = run(h.sync._fetch_batch(worker, [6], 7, MailboxResult("acct", "INBOX")))
    assert sent(h.transport) == b'M1 EXAMINE "INBOX"\r\nM2 UID FETCH 6 (UID FLAGS RFC822.SIZE BODY.PEEK[])\r\n'
    h.client.dataReceived(examine_answer(b"M1", uidvalidity=99) + fetch_response(6, 6, BODY, b"") + b"M2 OK done\r\n")
    with pytest.raises(UidValidityChanged):
        result_of(d)
    assert h.files() == [] and h.state.highest_uid("acct", "INBOX") == 5
    assert h.state.pending("acct", "INBOX") == {}


def test_new_mail_read_together_is_made_durable_as_one_group(tmp_path: Path) -> None:
    """Issue 15, under a stream of arrivals: one EXISTS announces dozens; those
    read from the socket together share one fsynced commit and one directory
    fsync (a group each cost 1.3 ms per message, in series), closed on the
    next reactor turn. Still one file at a time in its own right: fsynced,
    renamed, then recorded."""
    from twisted.internet import task

    h = Harness(tmp_path)
    clock = task.Clock()
    h.pool.reactor = clock
    commits: list[list[int]] = []
    add_pending = h.state.add_pending

    def counting(account: str, mailbox: str, records: Any) -> set[int]:
        records = list(records)
        commits.append([r.uid for r in records])
        return add_pending(account, mailbox, records)

    h.state.add_pending = counting  # type: ignore[method-assign]
    d = run(h.sync.fetch_new())
    sent(h.transport)
    h.client.dataReceived(
        examine_answer(b"M1", uidnext=9, exists=8)
        + fetch_response(6, 6, BODY, b"")
        + fetch_response(7, 7, BODY + b"2", b"")
        + fetch_response(8, 8, BODY + b"3", b"")
    )
    assert commits == []  # not one group per message: the group closes on the next turn
    clock.advance(0)
    assert commits == [[6, 7, 8]]
    assert len(h.files()) == 3 and h.state.highest_uid("acct", "INBOX") == 8
    h.client.dataReceived(fetch_response(9, 9, BODY + b"4", b""))
    clock.advance(0)
    assert commits == [[6, 7, 8], [9]]
    h.client.dataReceived(b"M2 OK done\r\n")
    assert result_of(d).fetched == 4
    assert not clock.getDelayedCalls()
