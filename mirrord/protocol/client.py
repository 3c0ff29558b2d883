"""mirrord's IMAP client connection: Twisted's IMAP4Client with its gaps filled.

DESIGN.md lists what Twisted's client gets wrong for a mirror: a 16 KiB line
limit, whole FETCH responses buffered in memory, a response ending in a
literal merged with the next line, a bare ``TAG OK`` dropping the connection,
untagged responses lost while a command runs, results keyed by sequence
number, one command at a time, capabilities never re-read after login.

This subclass keeps IMAP4Client's place in the design (connection lifecycle,
tags, transport) but replaces its receive path with
:class:`~mirrord.protocol._parser.ResponseReader` and its command path with
one that routes every untagged response to the command that asked for it (or
to :meth:`unsolicited`), streams message bodies to a sink as they arrive, and
may keep several UID FETCH commands in flight. Twisted's ``Command``-based
methods (``select``, ``fetchMessage``...) are not usable on it; the typed
``async`` methods below are its API.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import math
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.mail.imap4 import IMAP4Client
from twisted.python.failure import Failure

from mirrord.flags import Flags, message_flags
from mirrord.protocol._parser import (
    Continuation,
    LiteralSink,
    ProtocolError,
    Response,
    ResponseReader,
    Tagged,
    Untagged,
    _abort_sinks,
    as_flags,
    as_int,
    code_name,
    fetch_items,
)
from mirrord.protocol import sasl
from mirrord.protocol.compress import DeflateStream
from mirrord.protocol.errors import CommandFailed, MissingCapability, OAuthRefused, quote_server_text
from mirrord.protocol.mutf7 import decode_mailbox_name

log = logging.getLogger("mirrord.protocol")
trace_log = logging.getLogger("mirrord.trace")

COMMAND_TIMEOUT = 120.0
"""Seconds without a byte from the server, while a command waits, before we
call the connection dead. Long enough for a slow server's big SEARCH; short
enough that a stalled link is noticed."""

DEADLINE_GRID = 1.0
"""The command deadline's timer ends on multiples of this many seconds (rounded up)."""


LOGOUT_GRACE = 5.0
"""Seconds we wait for the server to close the connection after LOGOUT."""


T = TypeVar("T")


def _drops_on_malformed(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Drop the connection when a command's responses cannot be interpreted.

    These methods read their responses after the tagged OK, outside
    dataReceived, so a ProtocolError would reach only the caller and leave a
    connection open whose stream we no longer trust (and the pool, which
    forgets the client on ProtocolError, would leak it).
    """

    @functools.wraps(method)
    async def wrapper(self: MirrordIMAP4Client, *args: Any, **kwargs: Any) -> T:
        try:
            return await method(self, *args, **kwargs)
        except ProtocolError as e:
            self.drop(f"server sent something that is not IMAP: {e}")
            raise

    return wrapper


@dataclass
class CommandResult:
    """The untagged responses a command collected, and its tagged OK."""

    untagged: list[Untagged]
    tagged: Tagged


@dataclass(eq=False)
class _Command:
    name: str
    parts: list[bytes]
    """Command text; a new part starts after each synchronizing literal."""
    trace: str
    """What the protocol trace shows: the command with its secrets redacted."""
    wants: frozenset[str] = frozenset()
    """Kinds of untagged response this command collects."""
    pipelined: bool = False
    """May be in flight together with other pipelined commands."""
    claim: Callable[[Untagged], bool] | None = None
    choose_sink: Callable[[Untagged, list[Any], int], LiteralSink | None] | None = None
    on_continuation: Callable[[str], None] | None = None
    on_ok: Callable[[], None] | None = None
    """Runs when the tagged OK is read, before anything after it is parsed or sent."""
    burst: bool = False
    """Submitted inside :meth:`MirrordIMAP4Client.pipeline`: goes out behind the others at once."""
    untagged: list[Untagged] = field(default_factory=list)
    quiet: bool = False
    """The server may stay silent indefinitely (we are idling): no deadline."""
    barrier: bool = False
    """Opens a mailbox (EXAMINE): a server runs what is pipelined behind it only
    after it, so every untagged response before its tagged OK is its own or
    unsolicited, never one for a command behind it. Without this a listing
    pipelined behind ``EXAMINE ... (QRESYNC ...)`` would take the EXAMINE's
    FETCH (changed flags) responses for its own."""
    deferred: defer.Deferred[CommandResult] = field(default_factory=defer.Deferred)
    tag: bytes = b""
    next_part: int = 1


@dataclass(frozen=True)
class ListEntry:
    """One mailbox from LIST."""

    raw_name: bytes
    """As the server spells it (modified UTF-7); what commands must send."""
    name: str
    """Decoded to Unicode, still with the server's delimiter."""
    delimiter: str | None
    attributes: frozenset[str]

    @property
    def selectable(self) -> bool:
        lowered = {a.lower() for a in self.attributes}
        return not ({"\\noselect", "\\nonexistent"} & lowered)


@dataclass(frozen=True)
class MailboxStatus:
    """What EXAMINE told us about a mailbox."""

    exists: int
    uidvalidity: int
    uidnext: int | None
    highestmodseq: int | None
    vanished: frozenset[int] = frozenset()
    """With ``EXAMINE ... (QRESYNC ...)``: UIDs expunged since the given modseq (VANISHED (EARLIER))."""
    changed: Mapping[int, Flags] = field(default_factory=dict)
    """With ``EXAMINE ... (QRESYNC ...)``: UID -> flags of messages changed since the given modseq."""
    resynced: bool = False
    """The server accepted the QRESYNC parameters: ``vanished`` and ``changed``
    are complete. False when the UIDVALIDITY given was not the mailbox's (the
    server then says nothing about changes) or no QRESYNC was asked for."""


@dataclass(frozen=True)
class Namespace:
    prefix: str
    delimiter: str | None


@dataclass(frozen=True)
class ListingEntry:
    """One message of a listing: its flags, and its size for planning batches."""

    flags: Flags
    size: int | None


@dataclass(slots=True)
class FetchedMessage:
    """A message whose body has been streamed completely into ``body``."""

    uid: int
    flags: Flags
    size: int | None
    body: Any
    """The sink the body was written to (a Maildir tmp file)."""


def quote(value: str | bytes) -> bytes:
    """An IMAP quoted string; raises ValueError where only a literal would do."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if b"\r" in raw or b"\n" in raw or b"\0" in raw:
        raise ValueError("CR, LF and NUL cannot be sent as a quoted string")
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def uid_set(uids: Iterable[int]) -> bytes:
    """Compress UIDs into an IMAP sequence set: ``1:5,7,9:12``."""
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("empty UID set")
    ranges: list[bytes] = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        ranges.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
        start = prev = uid
    ranges.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
    return b",".join(ranges)


_LISTING_LINE = re.compile(
    rb"\* [0-9]{1,10} FETCH \((?:"
    rb"UID (?P<uid1>[0-9]{1,10}) FLAGS \((?P<flags1>[^\x00-\x1f\x7f()\"{}%*\[\]]*)\) RFC822\.SIZE (?P<size1>[0-9]{1,20})"
    rb"|FLAGS \((?P<flags2>[^\x00-\x1f\x7f()\"{}%*\[\]]*)\) UID (?P<uid2>[0-9]{1,10}) RFC822\.SIZE (?P<size2>[0-9]{1,20})"
    rb")\)",
    re.IGNORECASE,
)
"""A listing's FETCH response as Dovecot, Cyrus and Courier write it: the fast path."""

_LISTING_FLAGS = rb"[^\x00-\x1f\x7f()\"{}%*\[\]]{0,4000}"
_LISTING_ITEM = (
    rb"\* [0-9]{1,10} FETCH \((?:"
    rb"UID ([0-9]{1,10}) FLAGS \((" + _LISTING_FLAGS + rb")\) RFC822\.SIZE ([0-9]{1,20})"
    rb"|FLAGS \((" + _LISTING_FLAGS + rb")\) UID ([0-9]{1,10}) RFC822\.SIZE ([0-9]{1,20})"
    rb")\)\r\n"
)
_LISTING_LINES = re.compile(_LISTING_ITEM, re.IGNORECASE)
_LISTING_RUN = re.compile(rb"(?:" + _LISTING_ITEM + rb")+", re.IGNORECASE)
"""Many such lines in a row, CRLF included: a whole read of a listing is taken
with two regex calls, not a Python call per line (100,000 lines in a plain
catch-up of 50 mailboxes). Lines are bounded well under the reader's line
limit; a longer one takes the general path, which enforces it."""


MAX_UIDS_PER_SET = 1_000_000
"""Most UIDs a server's UID set (VANISHED, ESEARCH ALL, and the sum over one
EXAMINE's or one search's sets) may name. A 27-byte set ``1:9999999,20000000:29999999``
named 20 million (1.1 GB, 3.5 s with the reactor stalled); a million, about
70 MB as a Python set, is more messages than a personal mailbox holds."""


def parse_uid_ranges(text: bytes, limit: int = MAX_UIDS_PER_SET) -> list[tuple[int, int]]:
    """``1:3,7`` -> [(1, 3), (7, 7)], low end first, counted before anything is expanded.

    Raises ProtocolError when the ranges name more than ``limit`` UIDs.
    """
    ranges: list[tuple[int, int]] = []
    total = 0
    for part in text.split(b","):
        first, _, last = part.partition(b":")
        a = as_int(first, "UID")
        b = as_int(last, "UID") if last else a
        lo, hi = min(a, b), max(a, b)
        total += hi - lo + 1
        if total > limit:
            raise ProtocolError(f"UID set names more than {limit} UIDs ({text[:40]!r}...)")
        ranges.append((lo, hi))
    return ranges


def parse_uid_set(text: bytes, limit: int = MAX_UIDS_PER_SET) -> set[int]:
    """``1:3,7,9:10`` -> {1, 2, 3, 7, 9, 10}; ranges may come in either order.

    At most ``limit`` UIDs (see :data:`MAX_UIDS_PER_SET`): the size is
    checked on the ranges before the set is built.
    """
    uids: set[int] = set()
    for lo, hi in parse_uid_ranges(text, limit):
        uids.update(range(lo, hi + 1))
    return uids


_BARE_LF = re.compile(rb"(?<!\r)\n")
_FLAG = re.compile(r"\\?[!#$&'+\-./0-9:;<=>?@A-Z^_`a-z|~]+\Z")


def flag_list(flags: Iterable[str]) -> bytes | None:
    """``(\\Seen $Junk)`` for a STORE or APPEND; None for no flags.

    Each flag must be one atom (an optional leading backslash): a space,
    parenthesis, quote, CR or LF in a flag could smuggle another command.
    ``\\Recent`` cannot be set by a client.
    """
    out = sorted(set(flags))
    for flag in out:
        if not _FLAG.match(flag) or flag.lower() == "\\recent" or flag.count("\\") > 1:
            raise ValueError(f"not a flag a client may set: {flag!r}")
    return ("(" + " ".join(out) + ")").encode("ascii") if out else None


def copyuid_map(code: list[Any] | None) -> dict[int, int] | None:
    """``[COPYUID v 3:5,9 20:23]`` -> {3: 20, 4: 21, 5: 22, 9: 23}; None when there is none."""
    if code_name(code) != "COPYUID" or code is None or len(code) < 4:
        return None
    source = _ordered_uids(code[2])
    target = _ordered_uids(code[3])
    if len(source) != len(target):
        raise ProtocolError("COPYUID with sets of different sizes")
    return dict(zip(source, target))


def _ordered_uids(token: Any) -> list[int]:
    if not isinstance(token, bytes):
        raise ProtocolError("malformed COPYUID")
    out: list[int] = []
    for part in token.split(b","):
        first, _, last = part.partition(b":")
        a = as_int(first, "UID")
        b = as_int(last, "UID") if last else a
        if abs(b - a) > 10_000_000:
            raise ProtocolError("absurd COPYUID range")
        out.extend(range(min(a, b), max(a, b) + 1))
    return out


READ_SIZE = 512 * 1024
"""Most bytes taken from the socket per read (Twisted's default is 64 KB).

A first sync's reads come full: each costs a reactor turn, a pass of the
parser and a hand-over of the interpreter lock whatever its size. 512 KB
rather than 256 KB: a 10,000-message first sync 0.1-0.2 s less CPU (of
about 3), for 1 MB more peak memory; 1 MB reads saved no more and held 3 MB."""


def _tcp_handle(transport: Any) -> Any:
    """The TCP transport under any TLS wrapping, for socket options."""
    seen = 0
    while transport is not None and seen < 5:
        if hasattr(transport, "setTcpNoDelay"):
            return transport
        transport = getattr(transport, "transport", None)
        seen += 1
    return None



def _selection_codes(untagged: Iterable[Untagged]) -> tuple[int | None, int | None, int | None]:
    """UIDVALIDITY, UIDNEXT and HIGHESTMODSEQ from the OK codes of an EXAMINE or SELECT (None when absent)."""
    found: dict[str, int] = {}
    for response in untagged:
        name = code_name(response.code)
        if name in ("UIDVALIDITY", "UIDNEXT", "HIGHESTMODSEQ") and len(response.code or ()) >= 2:
            found[name] = as_int(response.code[1], name)  # type: ignore[index]
    return found.get("UIDVALIDITY"), found.get("UIDNEXT"), found.get("HIGHESTMODSEQ")

def status_figures(response: Untagged) -> tuple[bytes, dict[str, int]]:
    """``* STATUS name (MESSAGES 3 UIDNEXT 9 ...)`` as (raw name, {item: number})."""
    data = response.data
    if len(data) < 2 or not isinstance(data[0], bytes) or not isinstance(data[1], list) or len(data[1]) % 2:
        raise ProtocolError(f"malformed STATUS response {data!r:.80}")
    pairs = data[1]
    figures: dict[str, int] = {}
    for key, value in zip(pairs[::2], pairs[1::2]):
        if not isinstance(key, bytes):
            raise ProtocolError(f"malformed STATUS item {key!r:.40}")
        name = key.decode("ascii", "replace").upper()
        figures[name] = as_int(value, name)
    return data[0], figures


class MirrordIMAP4Client(IMAP4Client):
    """One IMAP connection; see the module docstring."""

    command_timeout = COMMAND_TIMEOUT
    adopted = False
    """Whether the connection runs on a socket connected before the reactor
    started (:mod:`mirrord.protocol.early`), which Twisted adopted."""

    def __init__(self, label: str = "", clock: IReactorTime | None = None) -> None:
        super().__init__()
        self.label = label
        """Account (and mailbox or role) for log lines: ``personal worker 2``."""
        if clock is None:
            from twisted.internet import reactor as default_reactor

            clock = default_reactor  # type: ignore[assignment]
        self._clock: IReactorTime = clock  # type: ignore[assignment]
        self.capabilities: frozenset[str] = frozenset()
        self.auth_mechanism: str | None = None
        """How this session logged in (``PLAIN``, ``LOGIN``, ``OAUTHBEARER``, ``XOAUTH2``), for `mirrord check`."""
        self.enabled: frozenset[str] = frozenset()
        """Extensions the server confirmed with ``* ENABLED`` (CONDSTORE, QRESYNC)."""
        self.greeting: defer.Deferred[None] = defer.Deferred()
        self._greeted = False
        self._reader = ResponseReader(self._response, self._choose_sink, on_line=self._trace_in)
        self._waiting: list[_Command] = []
        self._in_flight: dict[bytes, _Command] = {}
        self._barriers = 0
        """Commands in flight that are barriers (EXAMINE)."""
        self._tag_counter = 0
        self._closing_reason: str | None = None
        self._dropped = False
        self._deadline: IDelayedCall | None = None
        """The one timer checking :attr:`_deadline_at`; see :meth:`_arm_deadline`."""
        self._deadline_at: float | None = None
        """When the server must have answered by, if a command waits; None if none does."""
        self.connected_transport_lost = False
        self.on_unsolicited: Callable[[Untagged], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        """Called when the connection is lost, for a listener with no command pending (NOTIFY)."""
        """Receives every untagged response no command claimed (the watcher's events)."""
        self.compression: DeflateStream | None = None
        """Set once COMPRESS DEFLATE is in force: every byte either way goes through it."""
        self._bursting = 0
        self._starttls_switch = False
        """STARTTLS's OK was parsed in the read being handled: what follows it is refused."""

    # -- Twisted Protocol ---------------------------------------------------

    def connectionMade(self) -> None:
        handle = _tcp_handle(self.transport)
        if handle is not None:
            # Commands and literals are written whole; Nagle would only add
            # delayed-ACK stalls (~40 ms each, DESIGN.md). Keepalive lets the
            # kernel notice a peer that vanished behind a NAT box.
            handle.setTcpNoDelay(True)
            handle.setTcpKeepAlive(True)
            _tune_keepalive(handle)
            if hasattr(handle, "bufferSize"):
                # Fewer, larger reads: each read costs a reactor turn and a
                # pass of the parser whatever its size (a first sync of
                # 500 MB in 64 KB reads took 8,000 of them).
                handle.bufferSize = READ_SIZE
        self._arm_deadline()

    def dataReceived(self, data: bytes) -> None:
        self._arm_deadline()  # progress: moves the deadline, makes no timer
        try:
            self._receive(data)
        except ProtocolError as e:
            self.drop(f"server sent something that is not IMAP: {e}")
        except Exception as e:  # noqa: BLE001 - a bug of ours must not kill the reactor
            log.exception("%s: error handling the server's response", self.label)
            self.drop(f"internal error handling a response: {e!r}")

    def _receive(self, data: bytes) -> None:
        if self.compression is not None:
            for piece in self.compression.decompress(data):
                self._reader.feed(piece)
            return
        self._reader.feed(data)
        rest = self._reader.take_rest()
        if self._starttls_switch:
            self._starttls_switch = False
            if rest:
                raise ProtocolError(
                    f"server sent {len(rest)} bytes after its STARTTLS OK, before TLS began "
                    "(a man in the middle injecting responses?)"
                )
            return
        if rest is not None and self.compression is not None:
            # COMPRESS's OK arrived in this chunk: what followed it is
            # already compressed.
            self._receive(rest)
        elif rest:
            raise ProtocolError("the stream was split where no change of encoding was due")

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.connected_transport_lost = True
        self._cancel_deadline()
        self._reader.abort()
        why = reason
        if self._closing_reason is not None and reason.check(ConnectionLost) is None:
            why = Failure(ConnectionLost(self._closing_reason))
        pending = list(self._in_flight.values()) + self._waiting
        self._in_flight.clear()
        self._barriers = 0
        self._waiting.clear()
        if not self._greeted:
            self._greeted = True
            self.greeting.errback(why)
        for command in pending:
            command.deferred.errback(why)
        if self.on_lost is not None:
            self.on_lost()

    def drop(self, why: str) -> None:
        """Abandon the connection at once: anything we would say could be misread."""
        if not self._dropped:
            # Logged even after a BYE set the closing reason: a server that
            # says goodbye and then sends garbage or goes silent is news.
            self._dropped = True
            log.warning("%s: dropping connection: %s", self.label, why)
        if self._closing_reason is None:
            self._closing_reason = why
        if self.transport is not None:
            self.transport.abortConnection()

    # -- Twisted's Command API is replaced ---------------------------------

    def sendCommand(self, cmd: Any) -> defer.Deferred[Any]:
        raise NotImplementedError(
            "MirrordIMAP4Client replaces IMAP4Client's Command machinery; use its async methods"
        )

    # -- deadlines -----------------------------------------------------------

    def _arm_deadline(self) -> None:
        """(Re)start the no-progress deadline while any command waits for the server.

        This runs on every read, so it only moves :attr:`_deadline_at`; a
        single timer, started when none is pending, checks it when it fires
        and goes again if the deadline moved. Cancelling and re-creating a
        timer per read cost heap work on the hot path, and each cancelled
        timer stayed in the reactor's heap to wake an idle daemon when its
        time came. Timers end on a :data:`DEADLINE_GRID` grid, rounded up,
        so the stale ones of many connections expire in one wakeup; a
        silent server is dropped at most that much after ``command_timeout``.
        """
        needs = (not self._greeted) or any(not c.quiet for c in self._in_flight.values())
        if not needs or self.command_timeout <= 0:
            self._deadline_at = None  # a pending timer finds nothing due, once
            return
        self._deadline_at = self._clock.seconds() + self.command_timeout
        if self._deadline is None:
            self._schedule_deadline(self._deadline_at)
        elif self._deadline.getTime() > self._deadline_at + DEADLINE_GRID:
            # A shorter timeout than the pending timer was set for (the
            # watcher's DONE deadline): that timer would look too late.
            self._deadline.cancel()
            self._schedule_deadline(self._deadline_at)

    def _schedule_deadline(self, at: float) -> None:
        on_grid = math.ceil(at / DEADLINE_GRID) * DEADLINE_GRID
        self._deadline = self._clock.callLater(max(on_grid - self._clock.seconds(), 0.0), self._deadline_due)

    def _deadline_due(self) -> None:
        self._deadline = None
        if self._deadline_at is None or self.connected_transport_lost:
            return
        if self._clock.seconds() < self._deadline_at:
            self._schedule_deadline(self._deadline_at)  # progress since: look again then
            return
        self._deadline_at = None
        self.drop(f"no response from the server for {self.command_timeout:g} s")

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._deadline_at = None

    # -- responses ------------------------------------------------------------

    def _trace_in(self, line: bytes) -> None:
        if trace_log.isEnabledFor(logging.DEBUG):
            trace_log.debug("%s S: %s", self.label, line[:2000].decode("utf-8", "replace"))

    def _response(self, response: Response) -> None:
        if not self._greeted:
            self._greet(response)
        elif isinstance(response, Tagged):
            self._tagged(response)
        elif isinstance(response, Untagged):
            self._untagged(response)
        else:
            self._continuation(response)

    def _greet(self, response: Response) -> None:
        if not isinstance(response, Untagged) or response.kind not in ("OK", "PREAUTH", "BYE"):
            raise ProtocolError(f"bad greeting {response!r:.80}")
        if response.kind == "BYE":
            self._closing_reason = f"the server refused the connection: {quote_server_text(response.text)}"
            raise ProtocolError(self._closing_reason)
        self._greeted = True
        self.state = "auth" if response.kind == "PREAUTH" else "unauth"
        if code_name(response.code) == "CAPABILITY":
            self._set_capabilities(response.code[1:])  # type: ignore[index]
        self._arm_deadline()
        self.greeting.callback(None)

    def _tagged(self, response: Tagged) -> None:
        command = self._in_flight.pop(response.tag, None)
        if command is not None and command.barrier:
            self._barriers -= 1
        if command is None:
            raise ProtocolError(f"tagged response for a command we never sent: {response.tag!r:.40}")
        if code_name(response.code) == "CAPABILITY":
            self._set_capabilities(response.code[1:])  # type: ignore[index]
        self._arm_deadline()
        if response.status == "OK":
            if command.on_ok is not None:
                try:
                    command.on_ok()
                except Exception:
                    # The connection is dropped for this (dataReceived): the
                    # command fails with it, as every command in flight does.
                    # Out of the in-flight table its caller would wait forever.
                    self._in_flight[response.tag] = command
                    raise
            command.deferred.callback(CommandResult(command.untagged, response))
        else:
            command.deferred.errback(
                CommandFailed(command.name, response.status, response.text, code_name(response.code))
            )
        self._pump()

    def _untagged(self, response: Untagged) -> None:
        for command in list(self._in_flight.values()):
            if command.claim is not None and command.claim(response):
                return
            if command.barrier:
                break
        for command in self._in_flight.values():
            if response.kind in command.wants:
                command.untagged.append(response)
                return
        if response.kind == "BYE":
            self._closing_reason = f"the server closed the session: {quote_server_text(response.text)}"
        if response.kind == "CAPABILITY":
            self._set_capabilities(response.data)
        _abort_sinks(response.data)
        self.unsolicited(response)

    def _behind_barrier(self, command: _Command) -> bool:
        """Whether an EXAMINE sent before ``command`` is still in flight (see ``_Command.barrier``)."""
        if not self._barriers:  # the usual case, asked once per listing line
            return False
        for other in self._in_flight.values():
            if other is command:
                return False
            if other.barrier:
                return True
        return False

    def _continuation(self, response: Continuation) -> None:
        for command in self._in_flight.values():
            if command.next_part < len(command.parts):
                part = command.parts[command.next_part]
                command.next_part += 1
                self._send(part, None)
                return
            if command.on_continuation is not None:
                command.on_continuation(response.text)
                return
        raise ProtocolError("continuation request nobody asked for")

    def unsolicited(self, response: Untagged) -> None:
        """An untagged response no command claimed: EXISTS, EXPUNGE, flag changes...

        Workers have nothing to do with these (they work by UID and re-list on
        every sync); the IDLE watcher overrides this to turn them into events.
        """
        if self.on_unsolicited is not None:
            self.on_unsolicited(response)
        else:
            log.debug("%s: unsolicited %s %s", self.label, response.number or "", response.kind)

    def _choose_sink(self, response: Untagged, target: list[Any], size: int) -> LiteralSink | None:
        for command in self._in_flight.values():
            if command.choose_sink is not None:
                sink = command.choose_sink(response, target, size)
                if sink is not None:
                    return sink
        return None

    def _set_capabilities(self, tokens: list[Any]) -> None:
        self.capabilities = frozenset(
            t.decode("ascii", "replace").upper() for t in tokens if isinstance(t, bytes)
        )

    # -- commands ---------------------------------------------------------------

    def _next_tag(self) -> bytes:
        self._tag_counter += 1
        return b"M%d" % self._tag_counter

    def _submit(self, command: _Command) -> defer.Deferred[CommandResult]:
        if self._bursting:
            command.burst = True
        if self.connected_transport_lost:
            return defer.fail(ConnectionLost(self._closing_reason or "the connection is closed"))
        self._waiting.append(command)
        self._pump()
        return command.deferred

    def _pump(self) -> None:
        """Send waiting commands as far as pipelining rules allow."""
        while self._waiting:
            command = self._waiting[0]
            if self._in_flight and not (
                command.pipelined and all(c.pipelined for c in self._in_flight.values())
            ) and not (command.burst and all(c.burst for c in self._in_flight.values())):
                return
            self._waiting.pop(0)
            command.tag = self._next_tag()
            self._in_flight[command.tag] = command
            if command.barrier:
                self._barriers += 1
            self._send(command.tag + b" " + command.parts[0], command.tag.decode() + " " + command.trace)
            self._arm_deadline()

    def _send(self, line: bytes, trace: str | None) -> None:
        if trace_log.isEnabledFor(logging.DEBUG):
            shown = trace if trace is not None else "<continuation data, redacted>"
            trace_log.debug("%s C: %s", self.label, shown)
        data = line + b"\r\n"
        if self.compression is not None:
            data = self.compression.compress(data)
        self.transport.write(data)

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[None]:
        """Commands started inside go out at once, behind whatever else started inside.

        Normally a command that changes the session (EXAMINE...) waits for the
        one before it to finish. Inside this block the caller vouches that the
        commands are meant to run in the order given, as one exchange: the
        server executes them in order (RFC 3501 5.5: it must, when the result
        of one depends on another), and we save a round trip per command.
        Start them by calling the coroutines (``Deferred.fromCoroutine``):
        each is sent before the call returns.
        """
        self._bursting += 1
        try:
            yield
        finally:
            self._bursting -= 1

    async def _run(self, command: _Command) -> CommandResult:
        return await self._submit(command)

    def _simple(self, name: str, args: bytes = b"", wants: Iterable[str] = (), **kw: Any) -> _Command:
        text = name.encode("ascii") + (b" " + args if args else b"")
        return _Command(name, [text], text.decode("utf-8", "replace"), frozenset(wants), **kw)

    # -- the API -------------------------------------------------------------------

    @_drops_on_malformed
    async def capability(self) -> frozenset[str]:
        result = await self._run(self._simple("CAPABILITY", wants=["CAPABILITY"]))
        for response in result.untagged:
            self._set_capabilities(response.data)
        return self.capabilities

    async def compress(self) -> None:
        """COMPRESS DEFLATE (RFC 4978): compress both directions from now on.

        The server starts compressing right after the CRLF of its tagged OK,
        possibly in the same chunk; the switch happens there, before anything
        after it is parsed and before any other command goes out (nothing
        is pipelined behind COMPRESS; it may itself follow a command sent in
        the same :meth:`pipeline`). Over TLS, compression sits inside it.
        """
        if self.compression is not None:
            return
        stream = DeflateStream()

        def switch() -> None:
            self._reader.split_after_line()
            self.compression = stream

        await self._run(self._simple("COMPRESS", b"DEFLATE", on_ok=switch))
        log.debug("%s: compression on", self.label)

    async def starttls(self, options: Any) -> None:
        """Upgrade to TLS and re-read capabilities (the old ones may have been forged).

        Nothing that arrived in plaintext is trusted afterwards (DESIGN.md
        invariant 9; CVE-2011-0411): the handshake starts the moment the
        tagged OK's line is parsed, before any byte after it is looked at,
        and a server that sent anything after that OK in the same read is
        dropped rather than have those bytes read as if they came over TLS.
        The capabilities from before TLS are forgotten and asked for again.
        """

        def switch() -> None:
            self._reader.split_after_line()
            self._starttls_switch = True
            self.capabilities = frozenset()
            if self.adopted:
                # On a socket adopted from protocol/early.py Twisted's
                # transport takes itself for the accepting side; its
                # normal=False makes it the TLS client all the same.
                self.transport.startTLS(options, False)
            else:
                self.transport.startTLS(options)

        await self._run(self._simple("STARTTLS", on_ok=switch))
        self.capabilities = frozenset()
        await self.capability()

    async def login(self, username: str, password: str) -> None:
        """Authenticate, preferring AUTHENTICATE PLAIN (UTF-8 safe) over LOGIN.

        The trace shows neither the user name nor the password. Capabilities
        are re-read afterwards, from the tagged OK's code or by asking.
        """
        user_b, pass_b = username.encode("utf-8"), password.encode("utf-8")
        if "AUTH=PLAIN" in self.capabilities:
            token = base64.b64encode(b"\0" + user_b + b"\0" + pass_b)
            if "SASL-IR" in self.capabilities:
                command = _Command("AUTHENTICATE", [b"AUTHENTICATE PLAIN " + token], "AUTHENTICATE PLAIN <redacted>")
            else:
                command = _Command(
                    "AUTHENTICATE", [b"AUTHENTICATE PLAIN", token], "AUTHENTICATE PLAIN <redacted>"
                )
        else:
            parts = [b"LOGIN "]
            for i, value in enumerate((user_b, pass_b)):
                sep = b" " if i == 0 else b""
                try:
                    parts[-1] += quote(value) + sep
                except ValueError:
                    parts[-1] += b"{%d}" % len(value)
                    parts.append(value + sep)
            command = _Command("LOGIN", parts, "LOGIN <redacted>")
        result = await self._run(command)
        self.state = "auth"
        self.auth_mechanism = "PLAIN" if command.name == "AUTHENTICATE" else "LOGIN"
        if code_name(result.tagged.code) != "CAPABILITY":
            await self.capability()

    async def authenticate_oauth(
        self, mechanism: sasl.OAuthMechanism, username: str, token: str, host: str, port: int
    ) -> None:
        """AUTHENTICATE with an OAuth2 bearer token (OAUTHBEARER or XOAUTH2).

        The token goes in the command line where the server offers SASL-IR
        (RFC 4959), saving a round trip, else after the server's first
        continuation. A server refusing the token first sends an error
        challenge (RFC 7628 3.2.2, base64 JSON), which is answered as the
        mechanism wants so that the server ends with its tagged NO; that NO
        is raised as :class:`OAuthRefused` carrying the decoded error. The
        trace shows neither the token nor the user name, nor their base64.
        """
        response = base64.b64encode(sasl.initial_response(mechanism, username, token, host, port))
        trace = f"AUTHENTICATE {mechanism} <redacted>"
        head = b"AUTHENTICATE " + mechanism.encode("ascii")
        parts = [head + b" " + response] if "SASL-IR" in self.capabilities else [head, response]
        errors: list[str] = []

        def on_challenge(text: str) -> None:
            errors.append(sasl.describe_error(text))
            # The answer is base64 like every SASL response: ^A is "AQ==", XOAUTH2's empty one an empty line.
            self._send(base64.b64encode(sasl.failure_reply(mechanism)), None)

        command = _Command("AUTHENTICATE", parts, trace, on_continuation=on_challenge)
        try:
            result = await self._run(command)
        except CommandFailed as e:
            raise OAuthRefused(e.command, e.status, e.text, errors[-1] if errors else None) from None
        self.state = "auth"
        self.auth_mechanism = mechanism
        if code_name(result.tagged.code) != "CAPABILITY":
            await self.capability()

    @_drops_on_malformed
    async def enable(self, *extensions: str) -> frozenset[str]:
        """ENABLE (RFC 5161) what is not enabled yet; returns what the server enabled.

        Asking again for an extension already on costs a round trip for
        nothing (the watcher asks for QRESYNC on a session that may have it).
        """
        wanted = [e for e in extensions if e.upper() not in self.enabled]
        if not wanted:
            return frozenset()
        result = await self._run(self._simple("ENABLE", " ".join(wanted).encode(), wants=["ENABLED"]))
        enabled: set[str] = set()
        for response in result.untagged:
            enabled.update(t.decode("ascii", "replace").upper() for t in response.data if isinstance(t, bytes))
        if "QRESYNC" in enabled:
            enabled.add("CONDSTORE")  # RFC 7162 3.2.3: QRESYNC implies CONDSTORE
        self.enabled = self.enabled | enabled
        return frozenset(enabled)

    @_drops_on_malformed
    async def namespace(self) -> Namespace:
        """The first personal namespace; ``("", None)`` when the server has no NAMESPACE."""
        if "NAMESPACE" not in self.capabilities:
            return Namespace("", None)
        result = await self._run(self._simple("NAMESPACE", wants=["NAMESPACE"]))
        for response in result.untagged:
            personal = response.data[0] if response.data else None
            if isinstance(personal, list) and personal and isinstance(personal[0], list):
                prefix, delimiter = personal[0][0], personal[0][1]
                return Namespace(
                    decode_mailbox_name(prefix if isinstance(prefix, bytes) else b""),
                    delimiter.decode("ascii", "replace") if isinstance(delimiter, bytes) else None,
                )
        return Namespace("", None)

    @_drops_on_malformed
    async def list_mailboxes(self, reference: str = "", pattern: str = "*") -> list[ListEntry]:
        result = await self._run(self._simple("LIST", quote(reference) + b" " + quote(pattern), wants=["LIST"]))
        entries = []
        for response in result.untagged:
            if len(response.data) < 3:
                raise ProtocolError(f"malformed LIST response {response.data!r:.80}")
            attributes, delimiter, raw = response.data[:3]
            if not isinstance(raw, bytes):
                raise ProtocolError(f"malformed LIST mailbox name {raw!r:.80}")
            entries.append(
                ListEntry(
                    raw_name=raw,
                    name=decode_mailbox_name(raw),
                    delimiter=delimiter.decode("ascii", "replace") if isinstance(delimiter, bytes) else None,
                    attributes=as_flags(attributes),
                )
            )
        return entries

    @_drops_on_malformed
    async def status_many(self, raw_names: Sequence[bytes], items: Sequence[str]) -> dict[bytes, dict[str, int]]:
        """STATUS of every mailbox in ``raw_names``, all pipelined: one round trip for any number.

        Answers are matched by the mailbox name each ``* STATUS`` carries,
        not by which command collected it. A mailbox the server refuses
        (deleted meanwhile) is missing from the result; a lost connection
        raises.
        """
        what = b"(" + " ".join(items).encode("ascii") + b")"
        runs: list[defer.Deferred[CommandResult]] = []
        with self.pipeline():
            for raw in raw_names:
                try:
                    name = quote(raw)
                except ValueError:  # EXAMINE cannot name it either: its sync fails and says so
                    continue
                command = self._simple("STATUS", name + b" " + what, wants=["STATUS"])
                runs.append(defer.Deferred.fromCoroutine(self._run(command)))
        outcomes = await defer.DeferredList(runs, consumeErrors=True)
        found: dict[bytes, dict[str, int]] = {}
        for ok, value in outcomes:
            if ok:
                for response in value.untagged:
                    name, figures = status_figures(response)
                    found[name] = figures
            elif not value.check(CommandFailed):
                value.raiseException()
        return found

    @_drops_on_malformed
    async def list_status(self, items: Sequence[str], pattern: str = "*") -> dict[bytes, dict[str, int]]:
        """LIST with RETURN (STATUS ...) (RFC 5819): every mailbox's figures in one command."""
        what = " ".join(items).encode("ascii")
        args = quote("") + b" " + quote(pattern) + b" RETURN (STATUS (" + what + b"))"
        result = await self._run(self._simple("LIST", args, wants=["STATUS"]))
        found: dict[bytes, dict[str, int]] = {}
        for response in result.untagged:
            name, figures = status_figures(response)
            found[name] = figures
        return found

    async def notify_set(self, spec: bytes) -> None:
        """NOTIFY SET ``spec`` (RFC 5465): the server reports those events on this connection from now on.

        The events arrive as unsolicited ``* STATUS`` and ``* LIST``
        responses (see :mod:`mirrord.notify`).
        """
        await self._run(self._simple("NOTIFY", b"SET " + spec))

    @_drops_on_malformed
    async def examine(
        self,
        raw_name: bytes,
        *,
        qresync: tuple[int, int] | None = None,
        condstore: bool = False,
    ) -> MailboxStatus:
        """Open a mailbox read-only: a mirror never changes the server.

        ``qresync=(uidvalidity, modseq)`` (QRESYNC enabled) asks the server
        for what changed since ``modseq``: ``VANISHED (EARLIER)`` and FETCH
        FLAGS responses, collected into the status. No known-UIDs list is
        sent: the server then reports expunges among all UIDs, and the
        caller ignores UIDs it never had. ``condstore`` adds the
        ``(CONDSTORE)`` parameter, which turns CONDSTORE on for servers that
        have it but no ENABLE.
        """
        args = quote(raw_name)
        wants = ["OK", "EXISTS", "RECENT", "FLAGS"]
        if qresync is not None:
            args += b" (QRESYNC (%d %d))" % qresync
            wants += ["VANISHED", "FETCH"]
        elif condstore:
            args += b" (CONDSTORE)"
        result = await self._run(self._simple("EXAMINE", args, wants=wants, barrier=True))
        exists = 0
        uidvalidity, uidnext, modseq = _selection_codes(result.untagged)
        vanished: set[int] = set()
        changed: dict[int, Flags] = {}
        for response in result.untagged:
            if response.kind == "EXISTS" and response.number is not None:
                exists = response.number
            elif response.kind == "VANISHED":
                data = response.data
                if data and isinstance(data[0], list):  # (EARLIER)
                    data = data[1:]
                if len(data) != 1 or not isinstance(data[0], bytes):
                    raise ProtocolError("malformed VANISHED response")
                vanished.update(parse_uid_set(data[0], MAX_UIDS_PER_SET - len(vanished)))
            elif response.kind == "FETCH":
                items = fetch_items(response)
                if "UID" in items and "FLAGS" in items:
                    changed[as_int(items["UID"], "UID")] = message_flags(as_flags(items["FLAGS"]))
        if uidvalidity is None:
            raise ProtocolError("EXAMINE gave no UIDVALIDITY")
        resynced = qresync is not None and uidvalidity == qresync[0] and modseq is not None
        for uid in vanished:
            changed.pop(uid, None)
        return MailboxStatus(
            exists,
            uidvalidity,
            uidnext,
            modseq,
            vanished=frozenset(vanished) if resynced else frozenset(),
            changed=changed if resynced else {},
            resynced=resynced,
        )

    @_drops_on_malformed
    async def uid_fetch_changed(self, modseq: int) -> dict[int, Flags]:
        """UID -> flags of the messages whose flags changed since ``modseq`` (CONDSTORE)."""
        changed: dict[int, Flags] = {}

        def claim(response: Untagged) -> bool:
            if response.kind != "FETCH":
                return False
            items = fetch_items(response)
            if "UID" not in items or "FLAGS" not in items or "BODY[]" in items:
                return False
            changed[as_int(items["UID"], "UID")] = message_flags(as_flags(items["FLAGS"]))
            return True

        await self._run(
            self._simple("UID FETCH", b"1:* (UID FLAGS) (CHANGEDSINCE %d)" % modseq, claim=claim, pipelined=True)
        )
        return changed

    @_drops_on_malformed
    async def uid_search_all(self) -> set[int]:
        """Every UID of the selected mailbox; compact (ESEARCH ``RETURN (ALL)``) where offered.

        A plain ``* SEARCH`` lists each UID (about 7 bytes each); ESEARCH
        answers ``1:2000``-style ranges, which is what a catch-up of a large,
        rarely expunged mailbox wants.
        """
        if "ESEARCH" not in self.capabilities:
            return set(await self.uid_search(b"ALL"))
        found: set[int] = set()

        def claim(response: Untagged) -> bool:
            if response.kind != "ESEARCH":
                return False
            data = response.data
            if data and isinstance(data[0], list):
                correlator = data[0]  # (TAG "M5")
                if len(correlator) == 2 and correlator[1] != command.tag:
                    return False  # another command's answer
                data = data[1:]
            if data and isinstance(data[0], bytes) and data[0].upper() == b"UID":
                data = data[1:]
            for i in range(0, len(data) - 1, 2):
                name, value = data[i], data[i + 1]
                if isinstance(name, bytes) and name.upper() == b"ALL":
                    if not isinstance(value, bytes):
                        raise ProtocolError("malformed ESEARCH ALL")
                    found.update(parse_uid_set(value, MAX_UIDS_PER_SET - len(found)))
            return True

        command = self._simple("UID SEARCH", b"RETURN (ALL) ALL", claim=claim, pipelined=True)
        await self._run(command)
        return found

    async def uid_fetch_listing(self, uids: bytes = b"1:*") -> dict[int, ListingEntry]:
        """UID -> flags and size for a UID set: the complete listing a sync diffs against."""
        listing: dict[int, ListingEntry] = {}
        # A mailbox has few distinct flag lists: decode each once (this runs
        # once per message of every mailbox on every sync without CONDSTORE).
        flag_sets: dict[tuple[Any, ...], Flags] = {}

        def claim(response: Untagged) -> bool:
            if response.kind != "FETCH":
                return False
            items = fetch_items(response)
            if "UID" not in items or "FLAGS" not in items or "BODY[]" in items:
                return False
            raw = items["FLAGS"]
            try:
                flags = flag_sets[tuple(raw)]
            except (KeyError, TypeError):
                flags = message_flags(as_flags(raw))
                flag_sets[tuple(raw)] = flags
            size = items.get("RFC822.SIZE")
            listing[as_int(items["UID"], "UID")] = ListingEntry(
                flags, as_int(size, "RFC822.SIZE") if size is not None else None
            )
            return True

        def fast(line: bytes) -> bool:
            # Most of a plain catch-up's time went into tokenising these lines
            # one by one; the common shape is read here with one regex, and
            # anything else takes the general path (and ``claim``).
            if command.tag not in self._in_flight or self._behind_barrier(command):
                return False
            m = _LISTING_LINE.fullmatch(line)
            if m is None:
                return False
            uid, flag_text, size_text = m.group("uid1", "flags1", "size1")
            if uid is None:
                uid, flag_text, size_text = m.group("uid2", "flags2", "size2")
            add(uid, flag_text, size_text)
            return True

        def add(uid: bytes, flag_text: bytes, size_text: bytes) -> None:
            try:
                flags = flag_sets[(flag_text,)]
            except KeyError:
                flags = flag_sets[(flag_text,)] = message_flags(
                    frozenset(flag_text.decode("ascii", "replace").split())
                )
            listing[int(uid)] = ListingEntry(flags, int(size_text))

        def fast_run(data: bytes, pos: int) -> int:
            if command.tag not in self._in_flight or self._behind_barrier(command):
                return pos
            m = _LISTING_RUN.match(data, pos)
            if m is None:
                return pos
            for uid1, flags1, size1, flags2, uid2, size2 in _LISTING_LINES.findall(data, pos, m.end()):
                add(uid1 or uid2, flags1 or flags2, size1 or size2)
            return m.end()

        command = self._simple("UID FETCH", uids + b" (UID FLAGS RFC822.SIZE)", claim=claim, pipelined=True)
        self._reader.fast_line = fast
        if not trace_log.isEnabledFor(logging.DEBUG):
            self._reader.fast_run = fast_run
        try:
            await self._run(command)
        finally:
            if self._reader.fast_line is fast:
                self._reader.fast_line = None
            if self._reader.fast_run is fast_run:
                self._reader.fast_run = None
        return listing

    @_drops_on_malformed
    async def uid_fetch_identities(self, uids: bytes = b"1:*") -> dict[int, tuple[int | None, bytes]]:
        """UID -> (RFC822.SIZE, the Message-ID header block), to re-match renumbered mail."""
        found: dict[int, tuple[int | None, bytes]] = {}
        item = b"BODY[HEADER.FIELDS (MESSAGE-ID)]"

        def claim(response: Untagged) -> bool:
            if response.kind != "FETCH":
                return False
            items = fetch_items(response)
            header = items.get(item.decode())
            if "UID" not in items or header is None:
                return False
            size = items.get("RFC822.SIZE")
            found[as_int(items["UID"], "UID")] = (
                as_int(size, "RFC822.SIZE") if size is not None else None,
                header if isinstance(header, bytes) else b"",
            )
            return True

        await self._run(
            self._simple(
                "UID FETCH",
                uids + b" (UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])",
                claim=claim,
                pipelined=True,
            )
        )
        return found

    @_drops_on_malformed
    async def uid_search(self, criteria: bytes = b"ALL") -> list[int]:
        """UIDs matching ``criteria``, ascending. Lines of any length are fine."""
        result = await self._run(self._simple("UID SEARCH", criteria, wants=["SEARCH"], pipelined=True))
        found: set[int] = set()
        for response in result.untagged:
            found.update(as_int(token, "SEARCH result") for token in response.data)
        return sorted(found)

    async def uid_fetch_bodies(
        self,
        uids: Sequence[int],
        open_sink: Callable[[], LiteralSink],
        on_message: Callable[[FetchedMessage], None],
    ) -> None:
        """Stream the listed messages: each body goes to a fresh sink as it arrives.

        ``on_message`` runs once per complete message, in arrival order. A
        message the server sends that we did not ask for has its sink
        aborted. If ``on_message`` raises (disk full...), the remaining bodies
        are discarded and the command fails with that error once the server
        finishes it.
        """
        wanted = set(uids)
        await self._fetch_bodies(uid_set(uids), wanted.__contains__, open_sink, on_message)

    async def uid_fetch_from(
        self,
        first_uid: int,
        open_sink: Callable[[], LiteralSink],
        on_message: Callable[[FetchedMessage], None],
    ) -> None:
        """Stream every message with UID >= ``first_uid`` (new mail).

        ``UID FETCH n:*`` also returns the highest message when its UID is
        below n; that one is filtered out here.
        """
        await self._fetch_bodies(b"%d:*" % first_uid, lambda uid: uid >= first_uid, open_sink, on_message)

    async def _fetch_bodies(
        self,
        uid_spec: bytes,
        accept: Callable[[int], bool],
        open_sink: Callable[[], LiteralSink],
        on_message: Callable[[FetchedMessage], None],
    ) -> None:
        delivered: set[int] = set()
        failure: list[BaseException] = []
        # A batch has few distinct flag lists: each is decoded once.
        flag_sets: dict[bytes, Flags] = {}

        def wanted(uid: int) -> bool:
            return accept(uid) and uid not in delivered

        def choose_sink(response: Untagged, target: list[Any], size: int) -> LiteralSink | None:
            if response.kind != "FETCH" or not response.data or target is not response.data[0]:
                return None
            if response.body is not None:
                known_uid: int | None = response.body.uid  # the reader's fast path: BODY[] and UID read
            elif not target or not isinstance(target[-1], bytes) or target[-1].upper() != b"BODY[]":
                return None
            else:
                known_uid = _uid_so_far(target)
            if known_uid is not None and not wanted(known_uid):
                # Not ours (``n:*`` also returns the last message): skip its
                # bytes. In memory, a message over the literal limit would
                # get the connection dropped on every such fetch.
                return _Discard()
            if failure:
                return _Discard()
            try:
                return _GuardedSink(open_sink(), failure)
            except OSError as e:  # cannot even create the file (disk full, read-only)
                failure.append(e)
                return _Discard()

        def passed_over(uid: int, body: Any) -> bool | None:
            """claim's answer for a body not to be delivered; None: deliver it."""
            if not wanted(uid):
                return False
            delivered.add(uid)
            if failure:
                if not isinstance(body, bytes):
                    body.abort()
                return True
            return None

        def claim(response: Untagged) -> bool:
            if response.kind != "FETCH":
                return False
            fast = response.body
            if fast is not None and not isinstance(response.data[0][7], bytes):
                # UID FLAGS RFC822.SIZE BODY[] and nothing more, read by the reader
                # already, the body streamed to a sink (the usual message).
                body = response.data[0][7]
                uid = fast.uid
                answer = passed_over(uid, body)
                if answer is not None:
                    return answer
                try:
                    flags = flag_sets[fast.flags]
                except KeyError:
                    flags = flag_sets[fast.flags] = message_flags(
                        frozenset(fast.flags.decode("ascii", "replace").split())
                    )
                deliver(uid, flags, fast.size, body)
                return True
            items = fetch_items(response)
            body = items.get("BODY[]")
            if body is None or "UID" not in items:
                return False
            uid = as_int(items["UID"], "UID")
            answer = passed_over(uid, body)
            if answer is not None:
                return answer
            if isinstance(body, bytes):
                # Sent as a quoted string, not a literal (some servers do so
                # for an empty message): still the message, so write it out
                # rather than mark it done and lose it.
                try:
                    sink = open_sink()
                    sink.write(body)
                except OSError as e:
                    failure.append(e)
                    return True
                body = sink
            size = items.get("RFC822.SIZE")
            deliver(
                uid,
                message_flags(as_flags(items.get("FLAGS", []))),
                as_int(size, "RFC822.SIZE") if size is not None else None,
                body,
            )
            return True

        def deliver(uid: int, flags: Flags, size: int | None, body: Any) -> None:
            if isinstance(body, _GuardedSink):
                if body.failed:
                    return  # its write error fails the command when it ends
                body = body.sink
            message = FetchedMessage(uid=uid, flags=flags, size=size, body=body)
            try:
                on_message(message)
            except Exception as e:  # noqa: BLE001 - reported once the command ends
                failure.append(e)
                try:
                    message.body.abort()
                except Exception:  # noqa: BLE001
                    pass

        command = self._simple(
            "UID FETCH",
            uid_spec + b" (UID FLAGS RFC822.SIZE BODY.PEEK[])",
            claim=claim,
            choose_sink=choose_sink,
            pipelined=True,
        )
        await self._run(command)
        if failure:
            raise failure[0]

    async def fetch_uids(self, first_seq: int, last_seq: int | None = None) -> dict[int, int]:
        """Sequence number -> UID for a range of messages (``last_seq`` None: to the end).

        This is how a watcher learns the UIDs of messages an EXISTS announced,
        to keep its sequence map able to name expunges. Their flags are passed
        on as unsolicited responses, as flag changes would be.
        """
        found: dict[int, int] = {}

        def claim(response: Untagged) -> bool:
            if response.kind != "FETCH" or response.number is None:
                return False
            items = fetch_items(response)
            if "UID" not in items or "BODY[]" in items:
                return False
            found[response.number] = as_int(items["UID"], "UID")
            if "FLAGS" in items:
                self.unsolicited(response)
            return True

        last = b"*" if last_seq is None else b"%d" % last_seq
        # FLAGS too: a server may not report later flag changes of a message
        # whose flags this session was never told (Dovecot does not).
        await self._run(self._simple("FETCH", b"%d:%s (UID FLAGS)" % (first_seq, last), claim=claim))
        return found

    def idle(self) -> IdleSession:
        """Start IDLE (RFC 2177); see :class:`IdleSession`.

        Twisted's client has no IDLE. The connection counts as idling only
        once the server's ``+`` arrives: a server may refuse with NO.
        """
        session = IdleSession(self)
        command = _Command("IDLE", [b"IDLE"], "IDLE", on_continuation=session._continued)
        session._command = command
        session.finished = self._submit(command)
        session.finished.addBoth(session._ended)
        return session

    async def noop(self) -> None:
        """NOOP: keeps a connection alive, and brings a session's view of its mailbox up to date."""
        await self._run(self._simple("NOOP"))

    async def logout(self) -> None:
        """Say goodbye; the server's BYE here is expected, not an error.

        A stop waits for the answer, so a server that gives none is cut
        after ``LOGOUT_GRACE``, not the two minutes a fetch may take.
        """
        if self.command_timeout > 0:
            self.command_timeout = min(self.command_timeout, LOGOUT_GRACE)
        command = self._simple("LOGOUT", wants=["BYE"])
        try:
            await self._run(command)
        except (ConnectionLost, CommandFailed):
            pass
        finally:
            # The server closes the connection after LOGOUT; we do not race it
            # with a close of our own (a TLS close from both sides at once
            # trips Twisted's TLS wrapper), and only cut it if it lingers.
            self._clock.callLater(LOGOUT_GRACE, self._close_transport)

    def _close_transport(self) -> None:
        if self.transport is not None and not self.connected_transport_lost:
            self.transport.abortConnection()


    # -- writes (two-way mirror, issue #12) ----------------------------------------

    @_drops_on_malformed
    async def select(self, raw_name: bytes) -> MailboxStatus:
        """SELECT a mailbox read-write, for the write commands below.

        Raises CommandFailed when the server opens it read-only: every
        write would then fail one by one.
        """
        result = await self._run(self._simple("SELECT", quote(raw_name), wants=["OK", "EXISTS", "RECENT", "FLAGS"], barrier=True))
        if code_name(result.tagged.code) == "READ-ONLY":
            raise CommandFailed("SELECT", "OK", "the server opened the mailbox read-only")
        exists = 0
        uidvalidity, uidnext, modseq = _selection_codes(result.untagged)
        for response in result.untagged:
            if response.kind == "EXISTS" and response.number is not None:
                exists = response.number
        if uidvalidity is None:
            raise ProtocolError("SELECT gave no UIDVALIDITY")
        return MailboxStatus(exists, uidvalidity, uidnext, modseq)

    @_drops_on_malformed
    async def uid_store(
        self, uids: Iterable[int], add: Iterable[str] = (), remove: Iterable[str] = (),
        unchanged_since: int | None = None,
    ) -> set[int]:
        """``UID STORE ... +FLAGS.SILENT`` / ``-FLAGS.SILENT``; returns the UIDs refused as MODIFIED.

        ``unchanged_since`` adds ``(UNCHANGEDSINCE n)`` (RFC 7162) when the
        server offers CONDSTORE, so a concurrent change on the server is never
        overwritten blindly; without CONDSTORE the store is unconditional.
        Flags are validated: nothing but one atom each reaches the wire.
        """
        targets = sorted(set(uids))
        uid_set(targets)  # refuses an empty set before anything is sent
        conditional = unchanged_since is not None and "CONDSTORE" in self.capabilities
        modified: set[int] = set()
        # RFC 7162 allows no +FLAGS and -FLAGS in one STORE. The first STORE
        # gives each message it changed a new modseq (told in its FETCH
        # responses); the second must be conditional on that one, or it would
        # refuse every message the first changed.
        since: dict[int, int] = {uid: unchanged_since or 0 for uid in targets}
        for sign, flags in ((b"+", add), (b"-", remove)):
            wire = flag_list(flags)
            if wire is None:
                continue
            groups: dict[int, list[int]] = {}
            for uid in targets:
                if uid not in modified:
                    groups.setdefault(since[uid] if conditional else 0, []).append(uid)
            for modseq, group in sorted(groups.items()):
                args = uid_set(group)
                if conditional:
                    args += b" (UNCHANGEDSINCE %d)" % modseq
                args += b" " + sign + b"FLAGS.SILENT " + wire
                result = await self._run(self._simple("UID STORE", args, wants=["FETCH"]))
                if code_name(result.tagged.code) == "MODIFIED" and len(result.tagged.code or ()) >= 2:
                    modified |= parse_uid_set(result.tagged.code[1]) & set(group)  # type: ignore[index]
                for response in result.untagged:
                    items = fetch_items(response)
                    value = items.get("MODSEQ")
                    if "UID" in items and isinstance(value, list) and value:
                        since[as_int(items["UID"], "UID")] = as_int(value[0], "MODSEQ")
        return modified

    async def uid_expunge(self, uids: Iterable[int]) -> None:
        """``UID EXPUNGE`` (RFC 4315) of exactly these UIDs; never a plain EXPUNGE.

        Raises MissingCapability without UIDPLUS: a plain EXPUNGE would also
        remove what other clients marked ``\\Deleted``.
        """
        if "UIDPLUS" not in self.capabilities:
            raise MissingCapability("UID EXPUNGE needs UIDPLUS; the messages stay marked \\Deleted")
        await self._run(self._simple("UID EXPUNGE", uid_set(uids)))

    async def create(self, raw_mailbox: bytes) -> bool:
        """CREATE; False when the mailbox already exists, so it is safe to repeat.

        A refusal is checked with LIST rather than read from the response
        code: ``[ALREADYEXISTS]`` (RFC 5530) is not sent by every server.
        """
        try:
            await self._run(self._simple("CREATE", quote(raw_mailbox)))
        except CommandFailed as e:
            if e.status == "NO":
                found = await self._run(self._simple("LIST", b'"" ' + quote(raw_mailbox), wants=["LIST"]))
                if found.untagged:
                    return False
            raise
        return True

    @_drops_on_malformed
    async def uid_copy(self, uids: Iterable[int], raw_target: bytes) -> dict[int, int] | None:
        """``UID COPY``; source UID -> target UID from ``[COPYUID]`` (None when not offered)."""
        result = await self._run(self._simple("UID COPY", uid_set(uids) + b" " + quote(raw_target)))
        return copyuid_map(result.tagged.code)

    @_drops_on_malformed
    async def uid_move(self, uids: Iterable[int], raw_target: bytes) -> dict[int, int] | None:
        """``UID MOVE`` (RFC 6851); COPYUID mapping as :meth:`uid_copy`.

        Without MOVE: ``UID COPY``, ``\\Deleted``, ``UID EXPUNGE`` of exactly
        those UIDs; without UIDPLUS too, the originals stay marked
        ``\\Deleted`` (never a plain EXPUNGE).
        """
        uids = sorted(set(uids))
        if "MOVE" not in self.capabilities:
            mapping = await self.uid_copy(uids, raw_target)
            await self.uid_store(uids, add=["\\Deleted"])
            if "UIDPLUS" in self.capabilities:
                await self.uid_expunge(uids)
            return mapping
        found: list[dict[int, int] | None] = []

        def claim(response: Untagged) -> bool:
            if response.kind == "OK" and code_name(response.code) == "COPYUID":
                found.append(copyuid_map(response.code))
                return True
            return False

        result = await self._run(self._simple("UID MOVE", uid_set(uids) + b" " + quote(raw_target), claim=claim))
        return found[0] if found else copyuid_map(result.tagged.code)

    @_drops_on_malformed
    async def append(
        self, raw_mailbox: bytes, body: bytes | str | os.PathLike[str], flags: Iterable[str] = (),
        internal_date: str | None = None,
    ) -> tuple[int, int] | None:
        """APPEND a message; (UIDVALIDITY, UID) from ``[APPENDUID]`` when offered, else None.

        A Maildir file has LF line ends: bare LFs are sent as CRLF. The
        literal is synchronizing unless LITERAL+ is offered (Courier drops
        the connection on ``{n+}``); the literal and its closing CRLF go in
        one write. The body is held in memory (streaming is not done yet).
        The caller checks the UIDVALIDITY against its rows'.
        """
        if not isinstance(body, bytes):
            with open(body, "rb") as f:
                body = f.read()
        data = _BARE_LF.sub(b"\r\n", body)
        args = quote(raw_mailbox)
        wire = flag_list(flags)
        if wire is not None:
            args += b" " + wire
        if internal_date is not None:
            args += b" " + quote(internal_date)
        name = b"APPEND " + args
        plus = "LITERAL+" in self.capabilities or ("LITERAL-" in self.capabilities and len(data) <= 4096)
        if plus:
            parts = [name + b" {%d+}\r\n" % len(data) + data]
        else:
            parts = [name + b" {%d}" % len(data), data]
        command = _Command("APPEND", parts, name.decode("utf-8", "replace") + " {%d} <message>" % len(data))
        result = await self._run(command)
        code = result.tagged.code
        if code_name(code) == "APPENDUID" and code is not None and len(code) >= 3:
            return as_int(code[1], "UIDVALIDITY"), as_int(code[2], "UID")
        return None


class IdleSession:
    """An IDLE command in progress on one connection.

    ``idling`` fires True when the server's ``+`` arrives, or False if the
    command ended first (refused, or the connection dropped); ``refused``
    then holds why, and ``finished`` is not to be awaited. ``done()`` sends DONE; from then on the usual
    command deadline applies, so a server that never answers DONE gets the
    connection dropped rather than a watcher that hangs. ``finished`` fires
    on the tagged response.
    """

    def __init__(self, client: MirrordIMAP4Client) -> None:
        self._client = client
        self._command: _Command | None = None
        self.idling: defer.Deferred[bool] = defer.Deferred()
        self.finished: defer.Deferred[CommandResult] = defer.Deferred()
        self.refused: Failure | None = None
        self.done_sent = False
        self.text = ""
        """The text of the server's ``+``: Courier says there whether its IDLE pushes (see the watcher)."""

    @property
    def active(self) -> bool:
        return self.idling.called and not self.done_sent and not self._ended_flag

    _ended_flag = False
    _done_wanted = False

    def _continued(self, text: str) -> None:
        if self.idling.called:
            return
        self.text = text
        assert self._command is not None
        self._command.quiet = True
        self._client._arm_deadline()
        self.idling.callback(True)
        if self._done_wanted:
            self.done()

    def _ended(self, result: Any) -> Any:
        self._ended_flag = True
        if not self.idling.called:
            # Ended before the '+': hand the reason over through ``refused``
            # (awaiting ``finished`` from inside its own callbacks is not
            # possible) and consume it here so it is not reported unhandled.
            self.refused = result if isinstance(result, Failure) else None
            self.idling.callback(False)
            return None
        return result

    def done(self) -> None:
        """End IDLE; harmless to call twice, or before the ``+`` (DONE follows it then)."""
        if self.done_sent or self._ended_flag:
            return
        if not self.idling.called:
            # DONE before the continuation would be read as a new command:
            # it goes when the '+' comes (see _continued). Not as a callback
            # on ``idling``: whoever awaits it already takes its result, and
            # a later callback would see None and never send DONE.
            self._done_wanted = True
            return
        self.done_sent = True
        assert self._command is not None
        self._command.quiet = False
        self._command.on_continuation = None
        self._client._send(b"DONE", "DONE")
        self._client._arm_deadline()


class _GuardedSink:
    """Passes a body through to its sink; a write that fails is recorded, not raised.

    A full disk or a read-only Maildir is a local problem: raised from the
    middle of the response stream it would look like garbage from the server
    and drop a healthy connection. Instead the rest of this body (and of the
    command's bodies) is discarded and the command fails with the error once
    the server has finished it.
    """

    def __init__(self, sink: Any, failure: list[BaseException]) -> None:
        self.sink = sink
        self._failure = failure
        self.failed = False

    def write(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            self.sink.write(data)
        except OSError as e:
            self.failed = True
            self._failure.append(e)
            self.sink.abort()

    def abort(self) -> None:
        self.sink.abort()


class _Discard:
    """A sink for bodies we will not keep (after a failed delivery)."""

    def write(self, data: bytes) -> None:
        pass

    def abort(self) -> None:
        pass


def _uid_so_far(items: list[Any]) -> int | None:
    for i in range(0, len(items) - 1, 2):
        name = items[i]
        if isinstance(name, bytes) and name.upper() == b"UID":
            try:
                return as_int(items[i + 1], "UID")
            except ProtocolError:
                return None
    return None


def _tune_keepalive(handle: Any) -> None:
    """Probe an idle connection after 60 s, every 15 s, give up after 4 misses.

    Linux defaults (2 h) would leave a dead IDLE connection undetected for
    hours; these bound it near two minutes.
    """
    get_handle = getattr(handle, "getHandle", None)
    sock = get_handle() if get_handle is not None else None
    if not isinstance(sock, socket.socket):
        return
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)):
        option = getattr(socket, name, None)
        if option is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
            except OSError:
                pass
