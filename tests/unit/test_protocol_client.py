"""The client's response handling, on StringTransport and task.Clock: no sockets, no sleeps.

Each test drives the client the way a server would, byte by byte where it
matters, and checks both what the client sent and what its API returned.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mirrord.protocol.client import FetchedMessage, MirrordIMAP4Client, quote, uid_set
from mirrord.protocol.errors import CommandFailed


class MemorySink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.data += data
        self.writes += 1

    def abort(self) -> None:
        self.aborted = True


def connected(greeting: bytes = b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n") -> tuple[MirrordIMAP4Client, StringTransport, task.Clock]:
    clock = task.Clock()
    client = MirrordIMAP4Client(label="test", clock=clock)
    transport = StringTransport()
    client.makeConnection(transport)
    client.dataReceived(greeting)
    return client, transport, clock


def sent(transport: StringTransport) -> bytes:
    value = transport.value()
    transport.clear()
    return value


def run(coro: Any) -> defer.Deferred[Any]:
    return defer.Deferred.fromCoroutine(coro)


def result_of(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "deferred has not fired"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def test_greeting_capabilities_are_read() -> None:
    client, _, _ = connected()
    assert client.capabilities == {"IMAP4REV1", "IDLE"}
    assert result_of(client.greeting) is None


def test_bare_tagged_ok_completes_the_command() -> None:
    client, transport, _ = connected()
    d = run(client.noop())
    assert sent(transport) == b"M1 NOOP\r\n"
    client.dataReceived(b"M1 OK\r\n")
    assert result_of(d) is None
    assert transport.connected


def test_list_with_literal_name_at_end_of_line() -> None:
    # Twisted merged the next response into this one and returned [].
    client, transport, _ = connected()
    d = run(client.list_mailboxes())
    assert sent(transport) == b'M1 LIST "" "*"\r\n'
    client.dataReceived(
        b'* LIST (\\HasNoChildren) "/" {11}\r\nodd "name")\r\n'
        b'* LIST (\\HasChildren) "/" Archive\r\n'
        b'* LIST () "/" "Entw&APw-rfe"\r\n'
        b"M1 OK done\r\n"
    )
    entries = result_of(d)
    assert [e.name for e in entries] == ['odd "name")', "Archive", "Entwürfe"]
    assert entries[2].raw_name == b"Entw&APw-rfe"
    assert entries[0].delimiter == "/"


def test_search_with_50000_uids_on_one_line() -> None:
    client, transport, _ = connected()
    d = run(client.uid_search())
    uids = list(range(1, 100001, 2))
    line = b"* SEARCH " + b" ".join(b"%d" % u for u in uids) + b"\r\n"
    assert len(line) > 16384 * 10
    for i in range(0, len(line), 4096):
        client.dataReceived(line[i : i + 4096])
    client.dataReceived(b"M1 OK search done\r\n")
    assert result_of(d) == uids
    assert transport.connected


def fetch_response(seq: int, uid: int, body: bytes, flags: bytes = b"\\Seen") -> bytes:
    return (
        b"* %d FETCH (UID %d FLAGS (%s) RFC822.SIZE %d BODY[] {%d}\r\n" % (seq, uid, flags, len(body), len(body))
        + body
        + b")\r\n"
    )


def fetching(client: MirrordIMAP4Client, uids: list[int]) -> tuple[list[MemorySink], list[FetchedMessage], defer.Deferred[Any]]:
    """A UID FETCH of ``uids``' bodies begun: the sinks it opens, the messages it delivers, its result."""
    sinks: list[MemorySink] = []
    messages: list[FetchedMessage] = []

    def open_sink() -> MemorySink:
        sinks.append(MemorySink())
        return sinks[-1]

    return sinks, messages, run(client.uid_fetch_bodies(uids, open_sink, messages.append))


def test_fetch_literal_split_across_many_reads_streams_to_sink() -> None:
    client, transport, _ = connected()
    sinks, messages, d = fetching(client, [7, 8])
    assert sent(transport) == b"M1 UID FETCH 7:8 (UID FLAGS RFC822.SIZE BODY.PEEK[])\r\n"
    body7 = b"Subject: a\r\n\r\n" + b"x" * 100_000 + b"\r\n"
    body8 = b"Subject: b\r\n\r\n)\r\n* 9 EXISTS\r\nM1 OK fake\r\n"
    stream = fetch_response(1, 7, body7) + fetch_response(2, 8, body8, b"") + b"M1 OK done\r\n"
    for i in range(0, len(stream), 7):
        client.dataReceived(stream[i : i + 7])
    assert result_of(d) is None
    assert [m.uid for m in messages] == [7, 8]
    assert bytes(sinks[0].data) == body7 and bytes(sinks[1].data) == body8
    assert sinks[0].writes > 1000, "the body must be written as it arrives"
    assert messages[0].flags == {"\\Seen"} and messages[1].flags == frozenset()
    assert messages[0].size == len(body7)


def test_fetch_of_unrequested_uid_is_not_delivered() -> None:
    # "UID FETCH 9:*" returns the last message even when its UID is below 9.
    client, transport, _ = connected()
    sinks: list[MemorySink] = []
    messages: list[FetchedMessage] = []

    def open_sink() -> MemorySink:
        sinks.append(MemorySink())
        return sinks[-1]

    d = run(client.uid_fetch_bodies([9], open_sink, messages.append))
    client.dataReceived(fetch_response(3, 5, b"old\r\n") + b"M1 OK done\r\n")
    assert result_of(d) is None
    assert messages == []
    assert all(s.aborted for s in sinks)


def test_fetch_delivery_error_fails_the_command_after_the_server_finishes() -> None:
    client, transport, _ = connected()

    def deliver(message: FetchedMessage) -> None:
        raise OSError(28, "No space left on device")

    sinks: list[MemorySink] = []

    def open_sink() -> MemorySink:
        sinks.append(MemorySink())
        return sinks[-1]

    d = run(client.uid_fetch_bodies([1, 2], open_sink, deliver))
    client.dataReceived(fetch_response(1, 1, b"a\r\n") + fetch_response(2, 2, b"b\r\n") + b"M1 OK done\r\n")
    with pytest.raises(OSError):
        result_of(d)
    assert sinks[0].aborted
    assert transport.connected


def test_connection_lost_mid_literal_aborts_the_sink() -> None:
    client, transport, _ = connected()
    sinks: list[MemorySink] = []

    def open_sink() -> MemorySink:
        sinks.append(MemorySink())
        return sinks[-1]

    d = run(client.uid_fetch_bodies([1], open_sink, lambda m: None))
    client.dataReceived(b"* 1 FETCH (UID 1 BODY[] {1000}\r\nhalf")
    client.connectionLost(Failure(ConnectionError("reset")))
    assert sinks[0].aborted
    with pytest.raises(Exception):
        result_of(d)


def test_fetch_flags_listing_by_uid_not_sequence() -> None:
    client, transport, _ = connected()
    d = run(client.uid_fetch_listing())
    assert sent(transport) == b"M1 UID FETCH 1:* (UID FLAGS RFC822.SIZE)\r\n"
    client.dataReceived(
        b"* 1 FETCH (UID 10 FLAGS (\\Seen $Junk) RFC822.SIZE 99)\r\n* 2 FETCH (FLAGS () UID 12)\r\nM1 OK\r\n"
    )
    listing = result_of(d)
    assert {uid: e.flags for uid, e in listing.items()} == {10: {"\\Seen", "$Junk"}, 12: frozenset()}
    assert listing[10].size == 99 and listing[12].size is None


def test_examine_reads_uidvalidity_uidnext_and_exists() -> None:
    client, transport, _ = connected()
    d = run(client.examine(b"INBOX"))
    assert sent(transport) == b'M1 EXAMINE "INBOX"\r\n'
    client.dataReceived(
        b"* FLAGS (\\Answered \\Seen)\r\n* 3 EXISTS\r\n* 0 RECENT\r\n"
        b"* OK [UIDVALIDITY 1700000000] UIDs valid\r\n* OK [UIDNEXT 4] Predicted next UID\r\n"
        b"* OK [HIGHESTMODSEQ 12] Highest\r\nM1 OK [READ-ONLY] Examine completed\r\n"
    )
    status = result_of(d)
    assert (status.exists, status.uidvalidity, status.uidnext, status.highestmodseq) == (3, 1700000000, 4, 12)


def test_no_answer_is_an_error_naming_the_command() -> None:
    client, transport, _ = connected()
    d = run(client.examine(b"Nope"))
    client.dataReceived(b"M1 NO Mailbox doesn't exist: Nope\r\n")
    with pytest.raises(CommandFailed, match="EXAMINE failed: NO Mailbox doesn't exist"):
        result_of(d)


@pytest.mark.parametrize(
    "garbage",
    [
        b"M9 OK we never sent M9\r\n",
        b"* 1 FETCH (UID 1 FLAGS (\\Seen)\r\n",  # unbalanced
        b"* 1 FETCH (UID 1)) \r\n",
        b'* LIST () "/" {99999999999}\r\n',  # absurd literal for memory
        b"\x00\x01\x02\r\n",
        b"+ nobody asked\r\n",
    ],
)
def test_garbage_drops_the_connection_and_fails_pending_commands(garbage: bytes) -> None:
    client, transport, _ = connected()
    d = run(client.list_mailboxes())
    transport.abortConnection = lambda: setattr(transport, "aborted", True)  # type: ignore[method-assign]
    client.dataReceived(garbage)
    assert getattr(transport, "aborted", False)
    client.connectionLost(Failure(ConnectionError("aborted")))
    with pytest.raises(Exception):
        result_of(d)


def test_silent_server_is_dropped_after_the_command_timeout() -> None:
    client, transport, clock = connected()
    aborted = []
    transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    run(client.noop())
    clock.advance(client.command_timeout - 1)
    client.dataReceived(b"* 1 EXISTS\r\n")  # progress resets the deadline
    clock.advance(client.command_timeout - 1)
    assert not aborted
    clock.advance(2)
    assert aborted


def test_a_logout_the_server_leaves_unanswered_is_cut_after_the_grace_not_the_command_timeout() -> None:
    # A stop (SIGTERM) waits for the LOGOUTs: a silent server must not hold
    # it for the two minutes a fetch may take, nor past systemd's stop timeout.
    from mirrord.protocol.client import DEADLINE_GRID, LOGOUT_GRACE

    client, transport, clock = connected()
    transport.abortConnection = lambda: client.connectionLost(Failure(ConnectionError("aborted")))  # type: ignore[method-assign]
    d = run(client.logout())
    assert sent(transport) == b"M1 LOGOUT\r\n"
    clock.advance(LOGOUT_GRACE + DEADLINE_GRID + 0.1)
    assert result_of(d) is None


def test_a_command_whose_switch_fails_fails_with_the_dropped_connection(caplog: pytest.LogCaptureFixture) -> None:
    # STARTTLS on an adopted socket once raised inside the OK's handling: the
    # connection was dropped, but the command had left the in-flight table and
    # its caller (the login) waited forever instead of retrying.
    from twisted.internet.error import ConnectionLost

    client, transport, _ = connected(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n")

    def broken_start_tls(options: Any, normal: bool = True) -> None:
        raise TypeError("not a client context")

    transport.startTLS = broken_start_tls  # type: ignore[attr-defined]
    transport.abortConnection = lambda: client.connectionLost(Failure(ConnectionLost("aborted")))  # type: ignore[method-assign]
    d = run(client.starttls(object()))
    assert sent(transport) == b"M1 STARTTLS\r\n"
    with caplog.at_level(logging.ERROR):
        client.dataReceived(b"M1 OK begin\r\n")
    with pytest.raises(ConnectionLost):
        result_of(d)


def test_no_deadline_while_nothing_is_outstanding() -> None:
    client, transport, clock = connected()
    aborted = []
    transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    clock.advance(client.command_timeout * 10)
    assert not aborted


def test_pipelined_fetches_are_sent_together_and_matched_by_uid() -> None:
    client, transport, _ = connected()
    got: list[int] = []
    d1 = run(client.uid_fetch_bodies([1], MemorySink, lambda m: got.append(m.uid)))
    d2 = run(client.uid_fetch_bodies([2], MemorySink, lambda m: got.append(m.uid)))
    assert sent(transport) == (
        b"M1 UID FETCH 1 (UID FLAGS RFC822.SIZE BODY.PEEK[])\r\n"
        b"M2 UID FETCH 2 (UID FLAGS RFC822.SIZE BODY.PEEK[])\r\n"
    )
    client.dataReceived(fetch_response(1, 1, b"a") + b"M1 OK\r\n" + fetch_response(2, 2, b"b") + b"M2 OK\r\n")
    result_of(d1), result_of(d2)
    assert got == [1, 2]


def test_exclusive_commands_wait_for_the_pipeline_to_drain() -> None:
    client, transport, _ = connected()
    run(client.uid_fetch_listing())
    d = run(client.examine(b"INBOX"))
    assert sent(transport) == b"M1 UID FETCH 1:* (UID FLAGS RFC822.SIZE)\r\n"
    client.dataReceived(b"M1 OK\r\n")
    assert sent(transport) == b'M2 EXAMINE "INBOX"\r\n'
    assert not d.called


def test_login_trace_never_shows_the_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mirrord.trace")
    client, transport, _ = connected(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n")
    d = run(client.login("me@example.org", "hunter2 secret"))
    wire = sent(transport)
    assert wire.startswith(b"M1 AUTHENTICATE PLAIN ")
    client.dataReceived(b"M1 OK [CAPABILITY IMAP4rev1 IDLE CONDSTORE] Logged in\r\n")
    assert result_of(d) is None
    assert "CONDSTORE" in client.capabilities
    assert "hunter2" not in caplog.text and "me@example.org" not in caplog.text
    assert wire.split()[-1].decode() not in caplog.text


def test_login_falls_back_to_login_with_literal_for_unquotable_password() -> None:
    client, transport, _ = connected(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    d = run(client.login("me", "pa\r\nss"))
    assert sent(transport) == b'M1 LOGIN "me" {6}\r\n'
    client.dataReceived(b"+ go ahead\r\n")
    assert sent(transport) == b"pa\r\nss\r\n"
    client.dataReceived(b"M1 OK logged in\r\n")
    assert sent(transport) == b"M2 CAPABILITY\r\n", "capabilities are re-read after login"
    client.dataReceived(b"* CAPABILITY IMAP4rev1 MOVE\r\nM2 OK\r\n")
    assert result_of(d) is None
    assert client.capabilities == {"IMAP4REV1", "MOVE"}


def test_helpers() -> None:
    assert uid_set([5, 1, 2, 3, 9, 10, 7]) == b"1:3,5,7,9:10"
    assert quote('a"b\\c') == b'"a\\"b\\\\c"'
    with pytest.raises(ValueError):
        quote("a\r\nb")


def test_disk_full_mid_body_fails_the_command_but_keeps_the_connection() -> None:
    client, transport, _ = connected()

    class FullDisk(MemorySink):
        def write(self, data: bytes) -> None:
            if len(self.data) + len(data) > 1000:
                raise OSError(28, "No space left on device")
            super().write(data)

    sinks: list[MemorySink] = []

    def open_sink() -> MemorySink:
        sinks.append(FullDisk())
        return sinks[-1]

    delivered: list[FetchedMessage] = []
    d = run(client.uid_fetch_bodies([1, 2], open_sink, delivered.append))
    stream = fetch_response(1, 1, b"x" * 5000) + fetch_response(2, 2, b"small") + b"M1 OK done\r\n"
    for i in range(0, len(stream), 700):
        client.dataReceived(stream[i : i + 700])
    with pytest.raises(OSError, match="No space left"):
        result_of(d)
    assert delivered == [], "nothing is delivered once the disk said no"
    assert all(s.aborted for s in sinks)
    assert transport.connected
    d2 = run(client.noop())
    client.dataReceived(b"M2 OK\r\n")
    assert result_of(d2) is None, "the connection is still good for the retry"


# -- catch-up commands (QRESYNC, CONDSTORE, ESEARCH) ----------------------------


def test_examine_with_qresync_collects_vanished_and_changed_flags() -> None:
    client, transport, _ = connected()
    d = run(client.examine(b"INBOX", qresync=(67890007, 20050715194045000)))
    assert sent(transport) == b'M1 EXAMINE "INBOX" (QRESYNC (67890007 20050715194045000))\r\n'
    client.dataReceived(
        b"* 314 EXISTS\r\n* OK [UIDVALIDITY 67890007] UIDs valid\r\n* OK [UIDNEXT 567] next\r\n"
        b"* OK [HIGHESTMODSEQ 20050715194045319] Highest\r\n"
        b"* VANISHED (EARLIER) 41,43:45,90\r\n"
        b"* 49 FETCH (UID 117 FLAGS (\\Seen \\Answered) MODSEQ (90060128194045007))\r\n"
        b"* 50 FETCH (UID 119 FLAGS (\\Draft $MDNSent) MODSEQ (90060128194045308))\r\n"
        b"M1 OK [READ-ONLY] done\r\n"
    )
    status = result_of(d)
    assert status.resynced and status.highestmodseq == 20050715194045319 and status.exists == 314
    assert status.vanished == {41, 43, 44, 45, 90}
    assert status.changed == {117: {"\\Seen", "\\Answered"}, 119: {"\\Draft", "$MDNSent"}}


def test_examine_with_qresync_on_a_new_uidvalidity_reports_nothing_as_changed() -> None:
    client, transport, _ = connected()
    d = run(client.examine(b"INBOX", qresync=(1, 5)))
    sent(transport)
    client.dataReceived(
        b"* 2 EXISTS\r\n* OK [UIDVALIDITY 2] UIDs valid\r\n* OK [HIGHESTMODSEQ 9] x\r\nM1 OK done\r\n"
    )
    status = result_of(d)
    assert not status.resynced and status.vanished == frozenset() and status.changed == {}


def test_enable_is_sent_once_per_session() -> None:
    client, transport, _ = connected()
    d = run(client.enable("QRESYNC"))
    assert sent(transport) == b"M1 ENABLE QRESYNC\r\n"
    client.dataReceived(b"* ENABLED QRESYNC\r\nM1 OK Enabled\r\n")
    assert result_of(d) == {"QRESYNC", "CONDSTORE"}
    assert client.enabled == {"QRESYNC", "CONDSTORE"}
    d = run(client.enable("QRESYNC"))
    assert sent(transport) == b"" and result_of(d) == frozenset()


def test_uid_fetch_changed_since() -> None:
    client, transport, _ = connected()
    d = run(client.uid_fetch_changed(12345))
    assert sent(transport) == b"M1 UID FETCH 1:* (UID FLAGS) (CHANGEDSINCE 12345)\r\n"
    client.dataReceived(b"* 3 FETCH (UID 7 MODSEQ (12350) FLAGS (\\Seen))\r\nM1 OK done\r\n")
    assert result_of(d) == {7: {"\\Seen"}}


def test_uid_search_all_uses_esearch_ranges_where_offered() -> None:
    client, transport, _ = connected(b"* OK [CAPABILITY IMAP4rev1 ESEARCH] ready\r\n")
    d = run(client.uid_search_all())
    assert sent(transport) == b"M1 UID SEARCH RETURN (ALL) ALL\r\n"
    client.dataReceived(b'* ESEARCH (TAG "M1") UID ALL 1:3,7,10:11\r\nM1 OK done\r\n')
    assert result_of(d) == {1, 2, 3, 7, 10, 11}
    d = run(client.uid_search_all())
    sent(transport)
    client.dataReceived(b'* ESEARCH (TAG "M2") UID\r\nM2 OK done\r\n')  # empty mailbox
    assert result_of(d) == set()


def test_uid_search_all_without_esearch() -> None:
    client, transport, _ = connected()
    d = run(client.uid_search_all())
    assert sent(transport) == b"M1 UID SEARCH ALL\r\n"
    client.dataReceived(b"* SEARCH 4 2 9\r\nM1 OK done\r\n")
    assert result_of(d) == {2, 4, 9}


def _listing(lines: bytes, monkeypatch: Any = None, chunk: int = 0) -> dict[int, Any]:
    client, transport, _ = connected()
    d = run(client.uid_fetch_listing())
    sent(transport)
    data = lines + b"M1 OK done\r\n"
    for i in range(0, len(data), chunk or len(data)):
        client.dataReceived(data[i : i + (chunk or len(data))])
    return {uid: (e.flags, e.size) for uid, e in result_of(d).items()}


def test_listing_fast_path_reads_the_same_as_the_general_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = (
        b"* 1 FETCH (UID 10 FLAGS (\\Seen $Junk) RFC822.SIZE 99)\r\n"
        b"* 2 EXISTS\r\n"
        b"* 2 FETCH (FLAGS () UID 12 RFC822.SIZE 5)\r\n"
        b"* 3 FETCH (uid 13 flags (\\Answered  \\Seen) rfc822.size 7)\r\n"
        b"* 4 FETCH (UID 14 FLAGS (\\Seen) MODSEQ (77) RFC822.SIZE 8)\r\n"  # general path
        b"* 5 FETCH (UID 15 FLAGS (a[1]) RFC822.SIZE 9)\r\n"  # general path
        b"* 6 FETCH (RFC822.SIZE 10 UID 16 FLAGS (\\Draft))\r\n"  # general path
    )
    fast = _listing(lines)
    # Cut anywhere: runs of lines and single lines take turns with the buffer.
    assert all(_listing(lines, chunk=n) == fast for n in (1, 2, 7, 50, 61, 130))
    import mirrord.protocol.client as client_module

    never = __import__("re").compile(rb"(?!)")
    monkeypatch.setattr(client_module, "_LISTING_LINE", never)
    monkeypatch.setattr(client_module, "_LISTING_RUN", never)
    general = _listing(lines)
    assert fast == general
    assert fast[10] == ({"\\Seen", "$Junk"}, 99) and fast[13] == ({"\\Answered", "\\Seen"}, 7)
    assert set(fast) == {10, 12, 13, 14, 15, 16}


def test_listing_fast_path_ends_with_its_command() -> None:
    client, transport, _ = connected()
    d = run(client.uid_fetch_listing())
    sent(transport)
    client.dataReceived(b"* 1 FETCH (UID 10 FLAGS () RFC822.SIZE 1)\r\nM1 OK done\r\n")
    result_of(d)
    seen: list[Any] = []
    client.on_unsolicited = seen.append
    client.dataReceived(b"* 1 FETCH (UID 10 FLAGS (\\Seen) RFC822.SIZE 1)\r\n")
    assert [r.kind for r in seen] == ["FETCH"]


def test_listing_pipelined_behind_a_qresync_examine_leaves_it_its_flag_changes() -> None:
    """The EXAMINE's FETCH responses come before its OK and are its own, whatever
    their shape; the listing behind it gets only what follows that OK."""
    client, transport, _ = connected()
    with client.pipeline():
        examined = run(client.examine(b"INBOX", qresync=(7, 100)))
        listed = run(client.uid_fetch_listing(b"51:*"))
    assert sent(transport) == (
        b'M1 EXAMINE "INBOX" (QRESYNC (7 100))\r\nM2 UID FETCH 51:* (UID FLAGS RFC822.SIZE)\r\n'
    )
    client.dataReceived(
        b"* 60 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [HIGHESTMODSEQ 120] ok\r\n"
        b"* VANISHED (EARLIER) 3\r\n"
        b"* 4 FETCH (UID 4 FLAGS (\\Flagged) MODSEQ (110))\r\n"
        # The listing's own shape (the fast path's regex would take it), still the EXAMINE's.
        b"* 5 FETCH (UID 5 FLAGS (\\Seen) RFC822.SIZE 10)\r\n"
        b"M1 OK [READ-ONLY] done\r\n"
        b"* 59 FETCH (UID 51 FLAGS () RFC822.SIZE 300)\r\n"
        b"* 60 FETCH (UID 52 FLAGS (\\Seen) RFC822.SIZE 400)\r\n"
        b"M2 OK done\r\n"
    )
    status = result_of(examined)
    assert status.vanished == {3}
    assert status.changed == {4: {"\\Flagged"}, 5: {"\\Seen"}}
    assert {uid: (e.flags, e.size) for uid, e in result_of(listed).items()} == {
        51: (frozenset(), 300),
        52: ({"\\Seen"}, 400),
    }


def test_listing_pipelined_behind_examine_of_an_empty_mailbox_may_be_refused() -> None:
    """Sent before EXISTS is known: a server that refuses ``1:*`` on an empty
    mailbox leaves the caller None, to decide with the EXAMINE's answer."""
    from mirrord.sync.mailbox import _listing_after_examine

    client, transport, _ = connected()
    with client.pipeline():
        examined = run(client.examine(b"Empty"))
        listed = run(_listing_after_examine(client))
    sent(transport)
    client.dataReceived(
        b"* 0 EXISTS\r\n* OK [UIDVALIDITY 9] ok\r\nM1 OK [READ-ONLY] done\r\n"
        b"M2 BAD Invalid uidset\r\n"
    )
    assert result_of(examined).exists == 0
    assert result_of(listed) is None


def test_reads_move_the_deadline_without_making_timers() -> None:
    """The deadline is checked by one timer, not re-made on every read: a
    cancelled timer stays in the reactor's heap and wakes an idle daemon."""
    client, transport, clock = connected()
    aborted = []
    transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    done = run(client.noop())
    made = []
    call_later = clock.callLater
    clock.callLater = lambda *a, **kw: made.append(a) or call_later(*a, **kw)  # type: ignore[method-assign]
    for _ in range(50):
        clock.advance(3)
        client.dataReceived(b"* 1 EXISTS\r\n")
    # 150 s of reads: the timer looked at the moved deadline once (at ~120 s) and went again.
    assert len(made) == 1 and len(clock.getDelayedCalls()) == 1 and not aborted
    client.dataReceived(b"M1 OK done\r\n")
    result_of(done)
    # The pending timer fires once, finds nothing due, and is not renewed.
    clock.advance(client.command_timeout + 2)
    assert clock.getDelayedCalls() == [] and not aborted


def test_deadline_timers_of_many_connections_end_together() -> None:
    clock = task.Clock()
    clock.advance(0.37)
    times = []
    for n in range(5):
        client = MirrordIMAP4Client(label=f"c{n}", clock=clock)
        client.makeConnection(StringTransport())
        times.extend(call.getTime() for call in clock.getDelayedCalls() if call.getTime() not in times)
        clock.advance(0.1)
    assert len(set(times)) == 1 and times[0] >= 0.37 + client.command_timeout


def test_listing_runs_of_lines_are_taken_whole_and_a_traced_listing_goes_line_by_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lines = b"".join(b"* %d FETCH (UID %d FLAGS (\\Seen) RFC822.SIZE %d)\r\n" % (i, i + 100, i) for i in range(1, 501))
    client, transport, _ = connected()
    offered: list[Any] = []
    d = run(client.uid_fetch_listing())
    line_by_line = client._reader.fast_line
    client._reader.fast_line = lambda line: offered.append(line) or line_by_line(line)  # type: ignore[misc]
    sent(transport)
    client.dataReceived(lines + b"M1 OK done\r\n")
    assert len(result_of(d)) == 500 and len(offered) <= 1  # the tagged OK, at most
    assert client._reader.fast_run is None  # gone with its command

    with caplog.at_level(logging.DEBUG, logger="mirrord.trace"):
        client, transport, _ = connected()
        d = run(client.uid_fetch_listing())
        assert client._reader.fast_run is None
        sent(transport)
        client.dataReceived(lines + b"M1 OK done\r\n")
    assert len(result_of(d)) == 500
    assert sum("FETCH (UID" in r.getMessage() for r in caplog.records) == 500


def test_fetch_with_items_after_the_body_is_read_the_general_way() -> None:
    # The reader's short cut for Dovecot's form covers a response that ends
    # after the body; items after it still count, and a second UID there
    # must still be seen (and refused: which of the two names the body?).
    client, transport, _ = connected()
    sinks, messages, d = fetching(client, [7, 8])
    sent(transport)
    client.dataReceived(b"* 1 FETCH (UID 7 FLAGS (\\Seen) RFC822.SIZE 3 BODY[] {3}\r\nabc MODSEQ (5))\r\n")
    assert [(m.uid, m.flags, m.size) for m in messages] == [(7, {"\\Seen"}, 3)]
    client.dataReceived(b"* 2 FETCH (UID 8 FLAGS () RFC822.SIZE 3 BODY[] {3}\r\nxyz UID 9)\r\n")
    assert len(messages) == 1 and sinks[1].aborted
    assert not transport.connected or transport.disconnecting
    with pytest.raises(Exception):
        result_of(d)
