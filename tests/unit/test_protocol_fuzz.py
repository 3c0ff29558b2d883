"""Property-based fuzzing of the protocol layer: bad server input ends in a drop, never harm.

The issue "Survive faults and bad input" asks that malformed, truncated and
oversized server responses each end in a dropped connection with a log line,
never in an exception escaping into the reactor, a command that never
finishes, or a message file holding the wrong bytes. These tests generate a
valid server conversation for commands the client really sent, damage it
(truncation, flipped and inserted bytes, NUL and CR/LF, unbalanced
parentheses, literal sizes that lie, tags we never sent, unasked-for ``+``,
over-long lines), deliver it in random chunks, and check the outcome.

The oracle for "no wrong file" is the parser itself, fed the same damaged
bytes in one piece: a message the client delivers for UID n must hold exactly
the body of the first FETCH for UID n in that parse. The parser in turn is
checked on its own: round trips of generated responses, the same responses
whatever the chunking, and nothing but ProtocolError on arbitrary bytes.

The client gets a reader with small line and literal limits so that
oversized input stays cheap to generate; the limits are the only difference.
"""

from __future__ import annotations

import gc
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from mirrord.protocol import _parser
from mirrord.protocol._parser import (
    Continuation,
    STATUS_KINDS,
    ProtocolError,
    Response,
    ResponseReader,
    Tagged,
    Untagged,
    as_int,
    fetch_items,
)
from mirrord.protocol.client import FetchedMessage, ListEntry, MirrordIMAP4Client
from mirrord.protocol.errors import CommandFailed

LABEL = "fuzz-account worker 7"
"""Every drop must be logged with the connection's label; a distinctive one is easy to find."""

MAX_LINE = 400
MAX_MEMORY_LITERAL = 200

FAST = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = settings(FAST, max_examples=10_000)
FEW = settings(FAST, max_examples=120)
"""For the narrower properties, so that the default run stays at a few seconds."""


# -- what the client hands out and receives ------------------------------------


@dataclass(eq=False)
class RecordingSink:
    """A message file in memory that remembers how it was treated."""

    data: bytearray = field(default_factory=bytearray)
    aborts: int = 0
    delivered: bool = False
    late_writes: int = 0

    def write(self, data: bytes) -> None:
        if self.aborts or self.delivered:
            self.late_writes += 1
        self.data += data

    def abort(self) -> None:
        self.aborts += 1


@dataclass
class Delivery:
    uid: int
    body: Any
    data: bytes | None
    flags: frozenset[str]
    size: int | None
    aborted_before: bool


@implementer(ILogObserver)
class _FailureObserver:
    """Collects Twisted log events carrying a failure ("Unhandled error in Deferred")."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            self.events.append(event)


@pytest.fixture(autouse=True)
def no_unhandled_twisted_errors() -> Iterator[None]:
    """Fail a test if any Deferred was garbage-collected holding an unhandled failure.

    Checked once per test rather than per example: a full collection per
    example would cost more than the example.
    """
    observer = _FailureObserver()
    globalLogPublisher.addObserver(observer)
    try:
        yield
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not observer.events, [e.get("log_failure") or e for e in observer.events]


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def captured_logs() -> Iterator[_ListHandler]:
    handler = _ListHandler()
    logger = logging.getLogger("mirrord")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# -- a valid server conversation ------------------------------------------------


FLAGS = [b"\\Seen", b"\\Answered", b"\\Flagged", b"\\Deleted", b"\\Draft", b"$Junk", b"$Forwarded"]

# Bodies that look like protocol: a framing bug would act on them.
EVIL_BODIES = [
    b"",
    b"\r\n",
    b")\r\n* 9 EXISTS\r\nM1 OK fake\r\n",
    b"Subject: x\r\n\r\n{5}\r\nabcde\r\n",
    b"\x00" * 7,
    b"M2 OK [READ-ONLY] done\r\n+ go ahead\r\n",
    b'* 3 FETCH (UID 3 BODY[] {3}\r\nxyz)\r\n',
]

bodies = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(EVIL_BODIES),
    st.lists(st.sampled_from(EVIL_BODIES + [b"x" * 50, b"\r", b"\n"]), max_size=5).map(b"".join),
)
flag_lists = st.lists(st.sampled_from(FLAGS), unique=True, max_size=3)
texts = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="["), max_size=20
).map(lambda s: s.encode())

MAILBOX_ATOM_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-&+"


@dataclass
class Piece:
    """One response of the valid conversation, with what it means."""

    data: bytes
    kind: str
    uid: int | None = None
    body: bytes | None = None
    flags: frozenset[str] = frozenset()
    wanted: bool = False


@dataclass
class Conversation:
    """The valid byte stream and the results the client must report for it."""

    pieces: list[Piece]
    wanted: list[int]
    fetch_status: str
    search_status: str
    list_status: str
    search_uids: list[int]
    mailboxes: list[ListEntry]

    @property
    def stream(self) -> bytes:
        return b"".join(p.data for p in self.pieces)

    def boundaries(self) -> list[int]:
        """Offsets between responses, after the greeting."""
        offsets, at = [], 0
        for piece in self.pieces:
            at += len(piece.data)
            offsets.append(at)
        return offsets


@st.composite
def fetch_piece(draw: st.DrawFn, uid: int, wanted: bool) -> Piece:
    # Bodies we did not ask for may exceed the in-memory literal limit: the
    # client discards them as they stream instead of holding them.
    body = draw(bodies)
    flags = draw(flag_lists)
    items = [
        b"UID %d" % uid,
        b"FLAGS (" + b" ".join(flags) + b")",
        b"RFC822.SIZE %d" % len(body),
        b"BODY[] {%d}\r\n" % len(body) + body,
    ]
    order = draw(st.permutations(items))
    seq = draw(st.integers(1, 40))
    data = b"* %d FETCH (" % seq + b" ".join(order) + b")\r\n"
    decoded = frozenset(f.decode() for f in flags)
    return Piece(data, "fetch", uid=uid, body=body, flags=decoded, wanted=wanted)


@st.composite
def unsolicited_piece(draw: st.DrawFn) -> Piece:
    """Responses no command asked for, all valid IMAP; the client must shrug them off."""
    n = draw(st.integers(0, 99))
    flags = b" ".join(draw(flag_lists))
    data = draw(
        st.sampled_from(
            [
                b"* %d EXISTS\r\n" % n,
                b"* %d RECENT\r\n" % n,
                b"* %d EXPUNGE\r\n" % max(n, 1),
                b"* %d FETCH (FLAGS (%s))\r\n" % (max(n, 1), flags),
                b"* %d FETCH (UID %d FLAGS (%s) MODSEQ (12))\r\n" % (max(n, 1), n + 100, flags),
                b"* OK [UIDNEXT %d] Predicted next UID\r\n" % n,
                b"* OK [ALERT] System shutdown in 10 minutes\r\n",
                b"* OK still here\r\n",
                b"* NO [OVERQUOTA] Mailbox is full\r\n",
                b"* BAD stray\r\n",
                b"* FLAGS (\\Answered \\Seen)\r\n",
                b'* XYZZY %d (plugh "twisty passages") NIL\r\n' % n,
                b"* STATUS INBOX (MESSAGES %d UIDNEXT 9)\r\n" % n,
                b"* VANISHED (EARLIER) 1:3,%d\r\n" % (n + 5),
                b'* ENABLED QRESYNC\r\n',
            ]
        )
    )
    return Piece(data, "unsolicited")


@st.composite
def list_piece(draw: st.DrawFn) -> tuple[Piece, ListEntry]:
    attributes = draw(
        st.lists(st.sampled_from([b"\\HasNoChildren", b"\\HasChildren", b"\\Noselect", b"\\Marked"]), unique=True, max_size=2)
    )
    delimiter = draw(st.sampled_from([b'"/"', b'"."', b"NIL"]))
    form = draw(st.sampled_from(["atom", "quoted", "literal"]))
    if form == "atom":
        raw = draw(st.text(MAILBOX_ATOM_CHARS, min_size=1, max_size=20).filter(lambda s: s != "NIL")).encode()
        wire = raw
    elif form == "quoted":
        raw = draw(st.binary(max_size=30).filter(lambda b: b"\r" not in b and b"\n" not in b))
        wire = b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    else:
        raw = draw(st.binary(max_size=MAX_MEMORY_LITERAL))
        wire = b"{%d}\r\n" % len(raw) + raw
    data = b"* LIST (" + b" ".join(attributes) + b") " + delimiter + b" " + wire + b"\r\n"
    from mirrord.protocol.mutf7 import decode_mailbox_name

    entry = ListEntry(
        raw_name=raw,
        name=decode_mailbox_name(raw),
        delimiter=None if delimiter == b"NIL" else delimiter.strip(b'"').decode(),
        attributes=frozenset(a.decode() for a in attributes),
    )
    return Piece(data, "list"), entry


def tagged_line(tag: bytes, status: str, text: bytes, code: bytes | None) -> bytes:
    line = tag + b" " + status.encode()
    if code is not None:
        line += b" [" + code + b"]"
    if text:
        line += b" " + text
    return line + b"\r\n"


@st.composite
def tagged_piece(draw: st.DrawFn, tag: bytes) -> tuple[Piece, str]:
    status = draw(st.sampled_from(["OK", "OK", "OK", "ok", "NO", "BAD"]))
    code = draw(st.sampled_from([None, b"READ-ONLY", b"SERVERBUG", b"CAPABILITY IMAP4rev1 IDLE"]))
    text = draw(texts)
    return Piece(tagged_line(tag, status, text, code), "tagged"), status.upper()


@st.composite
def conversations(draw: st.DrawFn) -> Conversation:
    """Greeting; UID FETCH bodies (M1) and UID SEARCH (M2) pipelined; then LIST (M3).

    The client sends the three commands before anything arrives, so M1 and
    M2 are in flight together and M3 follows once both are done.
    """
    greeting = draw(
        st.sampled_from(
            [b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n", b"* PREAUTH logged in\r\n", b"* OK hello\r\n"]
        )
    )
    pieces = [Piece(greeting, "greeting")]
    wanted = sorted(draw(st.sets(st.integers(1, 20), min_size=1, max_size=6)))
    ours = st.sampled_from(wanted)
    sent_uids = draw(st.lists(st.one_of(ours, ours, st.integers(1, 25)), unique=True, min_size=1, max_size=6))
    phase1: list[Piece] = [draw(fetch_piece(uid, uid in wanted)) for uid in sent_uids]
    search_lines = draw(st.lists(st.lists(st.integers(1, 10**6), max_size=15), max_size=2))
    phase1 += [Piece(b"* SEARCH" + b"".join(b" %d" % u for u in uids) + b"\r\n", "search") for uids in search_lines]
    phase1 += draw(st.lists(unsolicited_piece(), max_size=4))
    pieces += draw(st.permutations(phase1))
    (m1, fetch_status), (m2, search_status) = draw(tagged_piece(b"M1")), draw(tagged_piece(b"M2"))
    pieces += draw(st.permutations([m1, m2]))
    listed = draw(st.lists(list_piece(), max_size=4))
    phase2 = [p for p, _ in listed] + draw(st.lists(unsolicited_piece(), max_size=2))
    # LIST responses keep their order (the result is a list); unsolicited ones go anywhere.
    order = draw(st.permutations(range(len(phase2))))
    lists_in_order = iter(p for p, _ in listed)
    pieces += [next(lists_in_order) if phase2[i].kind == "list" else phase2[i] for i in order]
    m3, list_status = draw(tagged_piece(b"M3"))
    pieces.append(m3)
    return Conversation(
        pieces=pieces,
        wanted=wanted,
        fetch_status=fetch_status,
        search_status=search_status,
        list_status=list_status,
        search_uids=sorted({u for uids in search_lines for u in uids}),
        mailboxes=[e for _, e in listed],
    )


# -- damage -------------------------------------------------------------------------


INSERTS = [b"\x00", b"\r", b"\n", b"\r\n", b"(", b")", b'"', b"{", b"}", b"[", b"]", b"*", b"+", b" ", b"\\", b"\xff", b"{3}\r\n"]

MUST_DROP = [
    b"M99 OK we never sent M99\r\n",
    b"M1 OK already finished or never sent\r\n",
    b"X1 NO nope\r\n",
    b"+ nobody asked\r\n",
    b"* 4 FETCH (UID 4 BODY[] {99999999999}\r\n",
    b'* LIST () "/" {99999999999}\r\n',
    b'* LIST () "/" {4294967297}\r\n',
    b"* 1 FETCH (UID 1 FLAGS (\\Seen)\r\n",
    b"* 1 FETCH (UID 1))\r\n",
    b"\x00\x01\x02\r\n",
    b"* \x00 EXISTS\r\n",
    b"\r\n",
    b"* SEARCH" + b" 12345" * 80 + b"\r\n",
    b"* OK [UNTERMINATED code\r\n",
    b"M1 MAYBE\r\n",
]
"""Responses that are not IMAP, or not for us, wherever they come: the client must drop."""

HARMLESS = [
    b"* XYZZY\r\n",
    b"* 3 FROBNICATE (a b) {3}\r\nxyz\r\n",
    b"* 1 FETCH (UID 1234 FLAGS () BODY[] {3}\r\nabc)\r\n",
    b"* OK [UIDNEXT 77] unsolicited\r\n",
]
"""Valid responses to nothing we asked; the client must ignore them."""

SUSPECT = [
    b"* 1 FETCH (UID 1 BODY[] {3}\r\nabc BODY[] {3}\r\nxyz)\r\n",
    b"* 2 FETCH (UID 2 BODY[] (\\Seen))\r\n",
    b'* 3 FETCH (UID 3 BODY[] "quoted body")\r\n',
    b"* 4 FETCH (BODY[] {3}\r\nabc UID 4 UID 5)\r\n",
    b"* BYE server shutting down\r\n",
]
"""Malformed or odd only for some commands in flight: the client may drop or ignore them."""


@dataclass
class Damaged:
    conversation: Conversation
    stream: bytes
    chunks: list[bytes]
    mutations: list[str]


def chunked(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    mode = draw(st.sampled_from(["whole", "random", "random", "bytes"]))
    if mode == "whole" or not stream:
        return [stream]
    if mode == "bytes" and len(stream) <= 2000:
        return [stream[i : i + 1] for i in range(len(stream))]
    cuts = sorted(set(draw(st.lists(st.integers(0, len(stream)), max_size=25))))
    edges = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:]) if b > a]


_LITERAL_MARKER = re.compile(rb"\{([0-9]+)\}\r\n")


@st.composite
def mutate(draw: st.DrawFn, conversation: Conversation) -> tuple[bytes, list[str]]:
    """Apply a few random kinds of damage, recording what was done for the failure report."""
    stream = conversation.stream
    done: list[str] = []
    for _ in range(draw(st.sampled_from([1, 1, 2, 3, 0]))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "duplicate", "lie", "inject", "truncate"]))
        size = len(stream)
        if op == "truncate":
            at = draw(st.integers(0, size))
            stream = stream[:at]
        elif op == "flip" and size:
            at = draw(st.integers(0, size - 1))
            mask = draw(st.integers(1, 255))
            stream = stream[:at] + bytes([stream[at] ^ mask]) + stream[at + 1 :]
        elif op == "insert":
            at = draw(st.integers(0, size))
            what = draw(st.one_of(st.sampled_from(INSERTS), st.binary(min_size=1, max_size=4)))
            stream = stream[:at] + what + stream[at:]
        elif op == "delete" and size:
            at = draw(st.integers(0, size - 1))
            length = draw(st.integers(1, 40))
            stream = stream[:at] + stream[at + length :]
        elif op == "duplicate" and size:
            at = draw(st.integers(0, size - 1))
            length = draw(st.integers(1, 80))
            to = draw(st.integers(0, size))
            stream = stream[:to] + stream[at : at + length] + stream[to:]
        elif op == "lie":
            markers = list(_LITERAL_MARKER.finditer(stream))
            if not markers:
                continue
            m = draw(st.sampled_from(markers))
            n = int(m.group(1))
            lie = draw(st.sampled_from([max(n - 1, 0), n + 1, 0, 2 * n + 5, 999_999_999, 99_999_999_999, 10**13]))
            stream = stream[: m.start()] + b"{%d}\r\n" % lie + stream[m.end() :]
        elif op == "inject":
            # Between two responses, give or take what earlier damage shifted.
            at = draw(st.sampled_from(conversation.boundaries()))
            what = draw(st.sampled_from(MUST_DROP + HARMLESS + SUSPECT))
            stream = stream[:at] + what + stream[at:]
        else:
            continue
        done.append(op)
    return stream, done


@st.composite
def damaged_conversations(draw: st.DrawFn) -> Damaged:
    conversation = draw(conversations())
    stream, done = draw(mutate(conversation))
    return Damaged(conversation, stream, chunked(draw, stream), done)


# -- driving the client --------------------------------------------------------------


class AbortingTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().loseConnection()


@dataclass
class Outcome:
    client: MirrordIMAP4Client
    transport: AbortingTransport
    sinks: list[RecordingSink]
    deliveries: list[Delivery]
    results: dict[str, list[Any]]
    fed: bytes
    logs: list[logging.LogRecord]
    done_before_lost: bool


def small_limits(client: MirrordIMAP4Client) -> None:
    """Swap the client's reader for one with tiny limits, keeping its callbacks.

    Oversized lines and literals then cost hundreds of bytes, not megabytes.
    """
    old = client._reader
    client._reader = ResponseReader(
        old._on_response,
        old._choose_sink,
        max_line=MAX_LINE,
        max_memory_literal=MAX_MEMORY_LITERAL,
        on_line=old._on_line,
    )


def drive(wanted: list[int], chunks: list[bytes]) -> Outcome:
    """Send the three commands, feed the chunks, let the deadline pass, then lose the connection."""
    clock = task.Clock()
    client = MirrordIMAP4Client(label=LABEL, clock=clock)
    small_limits(client)
    transport = AbortingTransport()
    sinks: list[RecordingSink] = []
    deliveries: list[Delivery] = []
    results: dict[str, list[Any]] = {"greeting": [], "fetch": [], "search": [], "list": []}

    def open_sink() -> RecordingSink:
        sinks.append(RecordingSink())
        return sinks[-1]

    def on_message(message: FetchedMessage) -> None:
        body = message.body
        data = bytes(body.data) if isinstance(body, RecordingSink) else None
        deliveries.append(Delivery(message.uid, body, data, message.flags, message.size, bool(getattr(body, "aborts", 0))))
        if isinstance(body, RecordingSink):
            body.delivered = True

    with captured_logs() as logs:
        client.makeConnection(transport)
        client.greeting.addBoth(results["greeting"].append)
        defer.Deferred.fromCoroutine(client.uid_fetch_bodies(wanted, open_sink, on_message)).addBoth(results["fetch"].append)
        defer.Deferred.fromCoroutine(client.uid_search()).addBoth(results["search"].append)
        defer.Deferred.fromCoroutine(client.list_mailboxes()).addBoth(results["list"].append)
        fed = bytearray()
        for chunk in chunks:
            if transport.aborted:
                break  # a real transport delivers nothing after abortConnection
            fed += chunk
            client.dataReceived(chunk)
        # Let any deadline pass: a stalled command must end in a drop, not a hang.
        for _ in range(3):
            clock.advance(client.command_timeout + 1)
        done = all(results[k] for k in ("fetch", "search", "list"))
        client.connectionLost(Failure(ConnectionLost("the test is over")))
        clock.advance(client.command_timeout + 1)
    return Outcome(client, transport, sinks, deliveries, results, bytes(fed), logs.records, done)


def reference_bodies(stream: bytes) -> dict[int, bytes]:
    """UID -> BODY[] of the first FETCH carrying both, parsing ``stream`` in one piece.

    The client must deliver exactly these bytes for a UID, whatever the
    chunking, or nothing.
    """
    first: dict[int, bytes] = {}

    def choose(response: Untagged, target: list[Any], size: int) -> RecordingSink | None:
        if size > MAX_MEMORY_LITERAL or (target and target[-1] == b"BODY[]"):
            return RecordingSink()
        return None

    def on_response(response: Response) -> None:
        if not isinstance(response, Untagged) or response.kind != "FETCH":
            return
        try:
            items = fetch_items(response)
            uid = as_int(items.get("UID"), "UID")
        except ProtocolError:
            return
        body = items.get("BODY[]")
        if body is not None and uid not in first:
            first[uid] = bytes(body.data) if isinstance(body, RecordingSink) else body

    reader = ResponseReader(on_response, choose, max_line=MAX_LINE, max_memory_literal=MAX_MEMORY_LITERAL)
    try:
        reader.feed(stream)
    except ProtocolError:
        pass
    return first


def check_invariants(outcome: Outcome, wanted: list[int]) -> None:
    """What must hold after any input at all."""
    errors = [r for r in outcome.logs if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    # No hang: every command finished, at the latest when the connection was lost.
    assert all(outcome.results[k] for k in outcome.results), outcome.results
    for name in ("fetch", "search", "list", "greeting"):
        (result,) = outcome.results[name]
        if isinstance(result, Failure):
            assert result.check(ConnectionLost, CommandFailed, ProtocolError), result
            if result.check(ProtocolError):
                # A response that parses but cannot be read (``* SEARCH 1!1``)
                # means the stream is not to be trusted: the connection goes.
                assert outcome.transport.aborted, "a malformed result must drop the connection"
    # Either everything completed, or the connection was dropped, and said so.
    assert outcome.done_before_lost or outcome.transport.aborted
    if outcome.transport.aborted:
        warned = [r for r in outcome.logs if r.levelno == logging.WARNING and LABEL in r.getMessage()]
        assert warned, "a drop must be logged, also after a BYE"
    # Every sink is closed exactly one way, and nothing is written after.
    for sink in outcome.sinks:
        assert sink.delivered != bool(sink.aborts), sink
        assert sink.late_writes == 0, sink
    # Deliveries: wanted UIDs, each once, each a fresh sink, bytes as in the stream.
    uids = [d.uid for d in outcome.deliveries]
    assert len(uids) == len(set(uids)) and set(uids) <= set(wanted), uids
    reference = reference_bodies(outcome.fed)
    for delivery in outcome.deliveries:
        assert isinstance(delivery.body, RecordingSink) and not delivery.aborted_before, delivery
        assert delivery.data == reference.get(delivery.uid), (delivery, reference.get(delivery.uid))


def check_exact(outcome: Outcome, conversation: Conversation) -> None:
    """A valid conversation, in any chunking, gives exactly its results and keeps the connection."""
    assert not outcome.transport.aborted, [r.getMessage() for r in outcome.logs]
    assert outcome.done_before_lost
    expected = [p for p in conversation.pieces if p.kind == "fetch" and p.wanted]
    assert [(d.uid, d.data, d.flags, d.size) for d in outcome.deliveries] == [
        (p.uid, p.body, p.flags, len(p.body or b"")) for p in expected
    ]
    (fetch,) = outcome.results["fetch"]
    (search,) = outcome.results["search"]
    (listed,) = outcome.results["list"]
    for result, status in ((fetch, conversation.fetch_status), (search, conversation.search_status), (listed, conversation.list_status)):
        if status != "OK":
            assert isinstance(result, Failure) and result.check(CommandFailed), result
    if conversation.fetch_status == "OK":
        assert fetch is None
    if conversation.search_status == "OK":
        assert search == conversation.search_uids
    if conversation.list_status == "OK":
        assert listed == conversation.mailboxes
    assert all(s.delivered or s.aborts for s in outcome.sinks)


def check_damaged(case: Damaged) -> None:
    outcome = drive(case.conversation.wanted, case.chunks)
    check_invariants(outcome, case.conversation.wanted)
    if case.stream == case.conversation.stream:
        check_exact(outcome, case.conversation)
        return
    # Messages whose FETCH came whole before the first damaged byte must arrive intact.
    intact = 0
    while intact < min(len(case.stream), len(case.conversation.stream)) and (
        case.stream[intact] == case.conversation.stream[intact]
    ):
        intact += 1
    at = 0
    must = []
    for piece in case.conversation.pieces:
        at += len(piece.data)
        if at > intact:
            break
        if piece.kind == "fetch" and piece.wanted:
            must.append((piece.uid, piece.body))
    got = [(d.uid, d.data) for d in outcome.deliveries]
    assert got[: len(must)] == must


# -- the client properties --------------------------------------------------------


@FAST
@given(damaged_conversations())
def _damaged_fast(case: Damaged) -> None:
    check_damaged(case)


@SLOW
@given(damaged_conversations())
def _damaged_slow(case: Damaged) -> None:
    check_damaged(case)


def test_client_survives_damaged_responses() -> None:
    _damaged_fast()


@pytest.mark.slow
def test_client_survives_damaged_responses_10000() -> None:
    _damaged_slow()


@st.composite
def valid_cases(draw: st.DrawFn) -> tuple[Conversation, list[bytes]]:
    conversation = draw(conversations())
    return conversation, chunked(draw, conversation.stream)


@FEW
@given(valid_cases())
def test_valid_conversation_in_any_chunking_gives_exact_results(case: tuple[Conversation, list[bytes]]) -> None:
    conversation, chunks = case
    outcome = drive(conversation.wanted, chunks)
    check_invariants(outcome, conversation.wanted)
    check_exact(outcome, conversation)


@st.composite
def injected(draw: st.DrawFn, palette: list[bytes]) -> tuple[Conversation, bytes, list[bytes]]:
    conversation = draw(conversations())
    at = draw(st.sampled_from(conversation.boundaries()))  # after the greeting
    what = draw(st.sampled_from(palette))
    stream = conversation.stream[:at] + what + conversation.stream[at:]
    return conversation, what, chunked(draw, stream)


@settings(FAST, max_examples=200)
@given(injected(MUST_DROP))
def test_garbage_between_responses_always_drops_with_a_log_line(case: tuple[Conversation, bytes, list[bytes]]) -> None:
    conversation, what, chunks = case
    outcome = drive(conversation.wanted, chunks)
    check_invariants(outcome, conversation.wanted)
    assert outcome.transport.aborted, what
    assert any(LABEL in r.getMessage() and "dropping connection" in r.getMessage() for r in outcome.logs)


@FEW
@given(injected(HARMLESS))
def test_responses_to_nothing_we_asked_are_ignored(case: tuple[Conversation, bytes, list[bytes]]) -> None:
    conversation, _, chunks = case
    outcome = drive(conversation.wanted, chunks)
    check_invariants(outcome, conversation.wanted)
    check_exact(outcome, conversation)


@FEW
@given(st.data())
def test_truncated_conversation_drops_on_the_deadline(data: st.DataObject) -> None:
    conversation = data.draw(conversations())
    stream = conversation.stream
    at = data.draw(st.integers(0, len(stream) - 1))  # M3's tagged OK, at least, is incomplete
    outcome = drive(conversation.wanted, chunked(data.draw, stream[:at]))
    check_invariants(outcome, conversation.wanted)
    assert outcome.transport.aborted
    assert all(s.delivered or s.aborts for s in outcome.sinks)


# -- the parser on its own -----------------------------------------------------------


ATOM = st.binary(min_size=1, max_size=12).map(
    lambda b: bytes(c for c in b if c > 0x20 and c != 0x7F and c not in b'()"{[') or b"x"
).filter(lambda b: b != b"NIL")
SECTION_ATOM = st.tuples(
    st.sampled_from([b"BODY", b"BINARY", b"BODY.PEEK", b""]),
    st.sampled_from([b"", b"1.2", b"HEADER.FIELDS (FROM TO)", b"TEXT"]),
    st.sampled_from([b"", b"<0>", b"<0.100>"]),
).map(lambda t: t[0] + b"[" + t[1] + b"]" + t[2])


@dataclass
class Lit:
    """A literal in a generated response; ``sink`` says whether the chooser streams it."""

    data: bytes
    sink: bool


def tokens(depth: int = 2) -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        ATOM,
        SECTION_ATOM,
        st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b).map(lambda b: ("q", b)),
        st.none(),
        st.builds(Lit, st.binary(max_size=60), st.booleans()),
    )
    if depth == 0:
        return leaves
    return st.one_of(leaves, st.lists(tokens(depth - 1), max_size=4))


def serialize(values: list[Any]) -> bytes:
    out = []
    for value in values:
        if isinstance(value, list):
            out.append(b"(" + serialize(value) + b")")
        elif value is None:
            out.append(b"NIL")
        elif isinstance(value, tuple):
            out.append(b'"' + value[1].replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"')
        elif isinstance(value, Lit):
            out.append(b"{%d}\r\n" % len(value.data) + value.data)
        else:
            out.append(value)
    return b" ".join(out)


def expected_tokens(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if isinstance(value, list):
            out.append(expected_tokens(value))
        elif isinstance(value, tuple):
            out.append(value[1])
        elif isinstance(value, Lit):
            out.append(("sink", value.data) if value.sink else value.data)
        else:
            out.append(value)
    return out


def literal_plan(values: list[Any]) -> list[bool]:
    """Whether each literal, in stream order, goes to a sink."""
    plan: list[bool] = []
    for value in values:
        if isinstance(value, list):
            plan += literal_plan(value)
        elif isinstance(value, Lit):
            plan.append(value.sink)
    return plan


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, Response | tuple[str, int | None, list[Any]], list[bool]]:
    """One response on the wire, what it must parse to, and which literals are sunk."""
    shape = draw(st.sampled_from(["data", "data", "status", "tagged", "continuation"]))
    text = draw(texts)
    if shape == "continuation":
        return b"+ " + text + b"\r\n", Continuation(text.decode()), []
    code_tokens = draw(st.none() | st.lists(st.one_of(ATOM.filter(lambda b: b"]" not in b), st.lists(ATOM.filter(lambda b: b"]" not in b), max_size=3)), min_size=1, max_size=3))
    wire_text = (b"[" + serialize(code_tokens) + b"] " if code_tokens is not None else b"") + text
    code = expected_tokens(code_tokens) if code_tokens is not None else None
    stripped = text.lstrip(b" ").decode() if code_tokens is not None else text.decode()
    if shape == "tagged":
        tag = draw(st.text("ABCXYZabc0123456789.", min_size=1, max_size=6)).encode()
        status = draw(st.sampled_from(["OK", "NO", "BAD"]))
        wire = tag + b" " + status.encode() + (b" " + wire_text if wire_text else b"") + b"\r\n"
        return wire, Tagged(tag, status, code, stripped if wire_text else ""), []
    if shape == "status":
        status = draw(st.sampled_from(["OK", "NO", "BAD", "BYE", "PREAUTH"]))
        wire = b"* " + status.encode() + (b" " + wire_text if wire_text else b"") + b"\r\n"
        return wire, Untagged(status, None, [], code, stripped if wire_text else ""), []
    number = draw(st.none() | st.integers(0, 10**9))
    kind = draw(st.sampled_from([b"FETCH", b"LIST", b"SEARCH", b"X-ODD.KIND", b"EXISTS"]))
    values = draw(st.lists(tokens(), max_size=5))
    head = b"* " + (b"%d " % number if number is not None else b"") + kind
    wire = head + (b" " + serialize(values) if values else b"") + b"\r\n"
    return wire, ("untagged", kind.decode(), number, expected_tokens(values)), literal_plan(values)


def normalize(value: Any) -> Any:
    """Parsed values in the shape ``responses`` promises: sinks as their bytes, data responses as tuples."""
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, RecordingSink):
        return ("sink", bytes(value.data))
    if isinstance(value, Untagged) and (value.number is not None or value.kind not in STATUS_KINDS):
        return ("untagged", value.kind, value.number, normalize(value.data))
    return value


class Collector:
    """Feeds a reader and records what it emits; literals go to sinks as ``plan`` says."""

    def __init__(self, plan: list[bool] | None = None, **limits: int) -> None:
        self.plan = list(plan or [])
        self.sinks: list[RecordingSink] = []
        self.responses: list[Response] = []
        self.reader = ResponseReader(self.responses.append, self.choose, **limits)

    def choose(self, response: Untagged, target: list[Any], size: int) -> RecordingSink | None:
        sink = self.plan.pop(0) if self.plan else bool(size % 2)
        if sink:
            self.sinks.append(RecordingSink())
            return self.sinks[-1]
        return None

    def feed_all(self, chunks: list[bytes]) -> ProtocolError | None:
        for chunk in chunks:
            try:
                self.reader.feed(chunk)
            except ProtocolError as e:
                return e
        return None


@settings(FAST, max_examples=200)
@given(st.lists(responses(), min_size=1, max_size=5), st.data())
def test_parser_round_trips_and_ignores_chunking(generated: list[Any], data: st.DataObject) -> None:
    stream = b"".join(wire for wire, _, _ in generated)
    plan = [p for _, _, plans in generated for p in plans]
    whole = Collector(plan)
    assert whole.feed_all([stream]) is None
    assert [normalize(r) for r in whole.responses] == [expected for _, expected, _ in generated]
    pieces = Collector(plan)
    assert pieces.feed_all(chunked(data.draw, stream)) is None
    assert [normalize(r) for r in pieces.responses] == [normalize(r) for r in whole.responses]
    assert all(not s.aborts for s in whole.sinks + pieces.sinks)


garbage = st.one_of(
    st.binary(max_size=400),
    st.lists(st.sampled_from(INSERTS + MUST_DROP + HARMLESS + [b"* 1 FETCH (", b"BODY[] ", b"{5}", b"\r\n", b"abc", b"[", b"]", b" "]), max_size=30).map(b"".join),
    conversations().map(lambda c: c.stream).flatmap(lambda s: st.integers(0, len(s)).map(lambda i: s[:i] + b"\x00" + s[i:])),
)


@FAST
@given(garbage, st.data())
def test_parser_on_arbitrary_bytes_raises_only_protocol_error(stream: bytes, data: st.DataObject) -> None:
    collector = Collector(max_line=MAX_LINE, max_memory_literal=MAX_MEMORY_LITERAL)
    chunks = chunked(data.draw, stream)
    error = collector.feed_all(chunks)  # anything but ProtocolError propagates and fails the test
    # Chunking never changes what is emitted, nor whether the stream is rejected.
    whole = Collector(max_line=MAX_LINE, max_memory_literal=MAX_MEMORY_LITERAL)
    whole_error = whole.feed_all([stream])
    assert (error is None) == (whole_error is None)
    assert [normalize(r) for r in collector.responses] == [normalize(r) for r in whole.responses]
    if error is not None:
        collector.reader.feed(b"* 1 EXISTS\r\n")  # a failed reader ignores the rest
        assert len(collector.responses) == len(whole.responses)
    # Once the connection is gone, every sink is either in an emitted response or aborted.
    collector.reader.abort()
    emitted: set[int] = set()

    def walk(value: Any) -> None:
        if isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, RecordingSink):
            emitted.add(id(value))

    for response in collector.responses:
        if isinstance(response, Untagged):
            walk(response.data)
    for sink in collector.sinks:
        assert (id(sink) in emitted) != bool(sink.aborts), sink
        assert sink.late_writes == 0


def test_line_of_exactly_max_line_is_accepted_in_any_chunking() -> None:
    line = b"* SEARCH" + b" 1" * ((MAX_LINE - 8) // 2)
    line += b"9" * (MAX_LINE - len(line))
    assert len(line) == MAX_LINE
    for cut in range(len(line) - 2, len(line) + 2):
        wire = line + b"\r\n"
        c = Collector(max_line=MAX_LINE)
        assert c.feed_all([wire[:cut], wire[cut:]]) is None, cut
        assert len(c.responses) == 1
    c = Collector(max_line=MAX_LINE)
    assert c.feed_all([b"9" + line + b"\r\n"]) is not None


@pytest.mark.parametrize("unit", [b"[", b"a[", b"a[b", b'"', b'"a\\"', b"a" * 7 + b"]"])
def test_pathological_lines_take_linear_time(unit: bytes) -> None:
    # The first tokenizer backtracked quadratically on "[": 16 KB took half a
    # second, so a server could stall the reactor for hours with one line.
    line = b"* SEARCH " + unit * (400_000 // len(unit)) + b"\r\n"
    started = time.perf_counter()
    c = Collector()
    c.feed_all([line])
    assert time.perf_counter() - started < 2.0


def test_sinks_of_a_response_whose_last_line_is_malformed_are_aborted() -> None:
    c = Collector([True])
    error = c.feed_all([b"* 1 FETCH (UID 1 BODY[] {3}\r\nabc FLAGS (\\Seen)\r\n"])
    assert isinstance(error, ProtocolError)
    assert c.sinks[0].aborts == 1


def test_sinks_of_a_response_its_consumer_rejects_are_aborted() -> None:
    sinks: list[RecordingSink] = []

    def choose(response: Untagged, target: list[Any], size: int) -> RecordingSink:
        sinks.append(RecordingSink())
        return sinks[-1]

    def reject(response: Response) -> None:
        raise ProtocolError("malformed FETCH")

    reader = ResponseReader(reject, choose)
    with pytest.raises(ProtocolError):
        reader.feed(b"* 1 FETCH (UID x BODY[] {3}\r\nabc)\r\n")
    assert sinks[0].aborts == 1


def test_reader_aborted_from_a_callback_reads_no_further() -> None:
    seen: list[Response] = []
    reader: ResponseReader

    def on_response(response: Response) -> None:
        seen.append(response)
        reader.abort()  # the connection was closed while handling this response

    reader = ResponseReader(on_response)
    reader.feed(b"* 1 EXISTS\r\nM1 OK done\r\n* 2 EXISTS\r\n")
    assert len(seen) == 1


@pytest.mark.parametrize(
    "items",
    [
        b"(UID 5 BODY[] {3}\r\nabc BODY[] {3}\r\nxyz)",
        b"(UID 5 BODY[] {3}\r\nabc UID 6)",
        b"(UID 5 BODY[] (\\Seen))",
    ],
)
def test_fetch_items_rejects_ambiguous_or_mistyped_bodies(items: bytes) -> None:
    c = Collector([True, True])
    assert c.feed_all([b"* 1 FETCH " + items + b"\r\n"]) is None
    response = c.responses[0]
    assert isinstance(response, Untagged)
    with pytest.raises(ProtocolError):
        fetch_items(response)


def test_fetch_items_tolerates_a_repeated_equal_item() -> None:
    c = Collector()
    c.feed_all([b"* 1 FETCH (UID 5 FLAGS (\\Seen) UID 5)\r\n"])
    assert fetch_items(c.responses[0])["UID"] == b"5"  # type: ignore[arg-type]



# -- resource bounds (issue #11 item 9) ----------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ranges=st.lists(st.tuples(st.integers(1, 2**32 - 1), st.integers(1, 2**32 - 1)), min_size=1, max_size=6),
)
def test_uid_sets_from_the_server_are_bounded(ranges: list[tuple[int, int]]) -> None:
    """Any UID set either parses within MAX_UIDS_PER_SET or is refused, never expanded past it."""
    from mirrord.protocol.client import MAX_UIDS_PER_SET, parse_uid_ranges, parse_uid_set

    text = b",".join(b"%d:%d" % r for r in ranges)
    named = sum(abs(b - a) + 1 for a, b in ranges)
    if named > MAX_UIDS_PER_SET:
        with pytest.raises(ProtocolError):
            parse_uid_ranges(text)
    elif named <= 50_000:
        assert len(parse_uid_set(text)) <= named


@settings(max_examples=60, deadline=None)
@given(depth=st.integers(0, 200), close=st.booleans())
def test_nesting_depth_is_bounded(depth: int, close: bool) -> None:
    """Parentheses nest up to MAX_DEPTH; deeper is a ProtocolError, not a recursion or a stall."""
    from mirrord.protocol._parser import MAX_DEPTH, ResponseReader

    out: list[Any] = []
    reader = ResponseReader(out.append)
    line = b"* 1 FETCH " + b"(" * depth + (b")" * depth if close else b"") + b"\r\n"
    if depth > MAX_DEPTH:
        with pytest.raises(ProtocolError, match="nested deeper"):
            reader.feed(line)
    elif close:
        reader.feed(line)
        assert len(out) == 1
    elif depth:
        with pytest.raises(ProtocolError):
            reader.feed(line)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 4096), min_size=1, max_size=12))
def test_in_memory_literal_bytes_per_response_are_bounded(sizes: list[int]) -> None:
    """A response's in-memory literals are refused once their sum passes the per-response budget."""
    from mirrord.protocol import _parser

    budget = 8192
    old = _parser.MAX_MEMORY_LITERALS_PER_RESPONSE
    _parser.MAX_MEMORY_LITERALS_PER_RESPONSE = budget
    try:
        out: list[Any] = []
        reader = _parser.ResponseReader(out.append)
        data = b"* 1 FETCH (X " + b"".join(b"{%d}\r\n" % n + b"a" * n + b" " for n in sizes) + b"Y)\r\n"
        if sum(sizes) > budget:
            with pytest.raises(ProtocolError, match="bytes of literals"):
                reader.feed(data)
        else:
            reader.feed(data)
            assert len(out) == 1
    finally:
        _parser.MAX_MEMORY_LITERALS_PER_RESPONSE = old


# -- the FETCH fast path ------------------------------------------------------------

_FLAG_ATOMS = st.one_of(
    st.sampled_from([b"\\Seen", b"\\Flagged", b"\\Answered", b"\\Recent", b"$Forwarded", b"NIL", b"nil", b"a]b",
                     b"x[y]", b"\\*", b"%", b"Junk", b"\\"]),
    st.binary(min_size=1, max_size=6),
)


@st.composite
def body_fetch_lines(draw: Any) -> bytes:
    """The line that opens a message's body, in Dovecot's form or slightly off it."""
    flags = b" ".join(draw(st.lists(_FLAG_ATOMS, max_size=4)))
    number, uid = draw(st.integers(0, 10**21)), draw(st.integers(0, 10**21))
    size = draw(st.integers(0, 40))
    line = b"* %d FETCH (UID %d FLAGS (%s) RFC822.SIZE %d BODY[] {%d%s}" % (
        number, uid, flags, size, size, draw(st.sampled_from([b"", b"+"])))
    if draw(st.booleans()):  # sometimes a little off: case, spacing, order
        old, new = draw(st.sampled_from([(b"FETCH", b"fetch"), (b"UID ", b"UID  "), (b"BODY[]", b"BODY[TEXT]"),
                                          (b"FLAGS", b"flags"), (b" RFC822.SIZE %d" % size, b"")]))
        line = line.replace(old, new, 1)
    # Mostly the end of the response right after the body; sometimes more items follow it.
    tail = draw(st.sampled_from([b")", b")", b")", b" UID %d)" % uid, b" UID 7)", b" FLAGS (\\Seen))", b" X)"]))
    return line + b"\r\n" + b"x" * size + tail + b"\r\n"


def _parse_all(stream: bytes) -> tuple[list[Any], str | None]:
    out: list[Any] = []
    reader = ResponseReader(out.append)
    try:
        reader.feed(stream)
    except ProtocolError as e:
        return out, type(e).__name__
    return out, None


@FAST
@given(body_fetch_lines())
def test_fetch_fast_path_parses_as_the_tokenizer_does(stream: bytes) -> None:
    fast = _parse_all(stream)
    pattern = _parser._FETCH_BODY
    _parser._FETCH_BODY = re.compile(rb"(?!)")  # never matches: the general way
    try:
        general = _parse_all(stream)
    finally:
        _parser._FETCH_BODY = pattern
    assert fast == general
    # What the fast path read ahead (``Untagged.body``, not compared above) is
    # set only for a response with exactly these items, and says what they say.
    for response, plain in zip(fast[0], general[0]):
        assert plain.body is None
        if response.body is None:
            continue
        items = _parser.fetch_items(response)
        assert list(items) == ["UID", "FLAGS", "RFC822.SIZE", "BODY[]"]
        assert response.body.uid == _parser.as_int(items["UID"], "UID")
        assert response.body.size == _parser.as_int(items["RFC822.SIZE"], "RFC822.SIZE")
        assert frozenset(response.body.flags.decode("ascii", "replace").split()) == _parser.as_flags(items["FLAGS"])


def test_fetch_fast_path_takes_dovecots_form_without_the_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = _parser._tokenize
    monkeypatch.setattr(_parser, "_tokenize", lambda line, stack: (calls.append(line), real(line, stack))[1])
    out, error = _parse_all(b"* 7 FETCH (UID 42 FLAGS (\\Seen $Forwarded) RFC822.SIZE 3 BODY[] {3}\r\nabc)\r\n")
    assert error is None
    assert out == [Untagged("FETCH", 7, [[b"UID", b"42", b"FLAGS", [b"\\Seen", b"$Forwarded"],
                                          b"RFC822.SIZE", b"3", b"BODY[]", b"abc"]])]
    assert calls == []  # nor the ")" that ends it
    assert out[0].body == _parser.FetchBody(42, b"\\Seen $Forwarded", 3)


def test_fetch_fast_path_reads_ahead_only_a_response_that_ends_after_the_body() -> None:
    head = b"* 7 FETCH (UID 42 FLAGS (\\Seen) RFC822.SIZE 3 BODY[] {3}\r\nabc"
    (plain,), _ = _parse_all(head + b")\r\n")
    assert plain.body == _parser.FetchBody(42, b"\\Seen", 3)
    (more,), _ = _parse_all(head + b" UID 43)\r\n")  # a second UID: the general way sees both
    assert more.body is None and more.data[0][-2:] == [b"UID", b"43"]
    (nil,), _ = _parse_all(head.replace(b"\\Seen", b"NIL") + b")\r\n")
    assert nil.body is None and nil.data[0][3] == [None]
