"""``\\Recent`` belongs to a session, not to a message (issue #11 item 7).

A server marks a message ``\\Recent`` for the first session that sees it; a
restart's session sees it unset. Had mirrord kept it as a flag, the restart
would log (and apply) a flag change of every such message. It is stripped
wherever server flags enter, and ignored in comparisons, since state rows
written before may still hold it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from mirrord.flags import message_flags
from mirrord.protocol.client import FetchedMessage, MirrordIMAP4Client
from mirrord.sync.engine import KnownMessage, LocalSnapshot, ServerListing, plan_changes, plan_sync

SEEN = "\\Seen"


def connected() -> tuple[MirrordIMAP4Client, StringTransport]:
    client = MirrordIMAP4Client(label="test", clock=task.Clock())
    transport = StringTransport()
    client.makeConnection(transport)
    client.dataReceived(b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n")
    return client, transport


def result_of(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "deferred has not fired"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def test_message_flags_drops_recent_in_any_spelling() -> None:
    assert message_flags(frozenset({"\\Recent", SEEN, "$Junk"})) == {SEEN, "$Junk"}
    assert message_flags(frozenset({"\\RECENT"})) == frozenset()
    kept = frozenset({SEEN})
    assert message_flags(kept) is kept


def test_listing_drops_recent_on_the_fast_and_the_general_path() -> None:
    client, transport = connected()
    d = defer.Deferred.fromCoroutine(client.uid_fetch_listing())
    transport.clear()
    client.dataReceived(
        b"* 1 FETCH (UID 10 FLAGS (\\Seen \\Recent) RFC822.SIZE 99)\r\n"  # the regex path
        b"* 2 FETCH (FLAGS (\\Recent) UID 12 MODSEQ (5) RFC822.SIZE 7)\r\n"  # the tokenising path
        b"M1 OK\r\n"
    )
    listing = result_of(d)
    assert {uid: e.flags for uid, e in listing.items()} == {10: {SEEN}, 12: frozenset()}


def test_catch_ups_and_fetched_bodies_drop_recent() -> None:
    client, transport = connected()
    d = defer.Deferred.fromCoroutine(client.examine(b"INBOX", qresync=(7, 1)))
    client.dataReceived(
        b"* 1 EXISTS\r\n* OK [UIDVALIDITY 7] x\r\n* OK [HIGHESTMODSEQ 9] x\r\n"
        b"* 1 FETCH (UID 5 FLAGS (\\Recent \\Seen) MODSEQ (9))\r\nM1 OK [READ-ONLY] done\r\n"
    )
    assert result_of(d).changed == {5: {SEEN}}
    d = defer.Deferred.fromCoroutine(client.uid_fetch_changed(1))
    client.dataReceived(b"* 1 FETCH (UID 5 FLAGS (\\Recent) MODSEQ (9))\r\nM2 OK\r\n")
    assert result_of(d) == {5: frozenset()}

    class Sink:
        def write(self, data: bytes) -> None:
            pass

        def abort(self) -> None:
            pass

    messages: list[FetchedMessage] = []
    d = defer.Deferred.fromCoroutine(client.uid_fetch_bodies([5], Sink, messages.append))
    client.dataReceived(b"* 1 FETCH (UID 5 FLAGS (\\Recent \\Seen) RFC822.SIZE 2 BODY[] {2}\r\nab)\r\nM3 OK\r\n")
    result_of(d)
    assert [m.flags for m in messages] == [{SEEN}]


def test_a_restart_after_a_sync_that_saw_recent_plans_no_flag_change() -> None:
    """A state row from before the fix holds ``\\Recent``; the next session's listing has none."""
    local = LocalSnapshot(
        uidvalidity=7, known={1: KnownMessage(key="a", flags=frozenset({"\\Recent", SEEN}))}, files={"a": frozenset({SEEN})}
    )
    assert plan_sync(ServerListing(7, {1: frozenset({SEEN})}), local).is_empty
    assert plan_changes(local, flags={1: frozenset({SEEN})}).is_empty
    local = LocalSnapshot(uidvalidity=7, known={1: KnownMessage(key="a", flags=frozenset({"\\Recent", SEEN}))}, files=None)
    assert plan_sync(ServerListing(7, {1: frozenset({SEEN})}), local).is_empty


def test_files_with_the_same_info_share_one_flag_set() -> None:
    # A Maildir scan holds one flag set per file; at 100,000 messages a set
    # of their own cost ~20 MB of the daemon's peak memory.
    from mirrord.flags import flags_from_info

    assert flags_from_info("FS") is flags_from_info("FS") == frozenset({"\\Flagged", "\\Seen"})
    assert flags_from_info("") == frozenset()
