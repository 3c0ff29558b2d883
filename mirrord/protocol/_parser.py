"""Turning the bytes an IMAP server sends into whole, parsed responses.

Twisted's IMAP4Client frames with LineReceiver (16 KiB line limit), reads every
literal into memory, and mis-frames a response that ends in a literal. This
reader replaces that layer. It is pure (no Twisted, no sockets): ``feed`` it
bytes, and it calls back with each complete response, in order.

Literals are the reason this is a state machine rather than a line splitter:
a message body arrives as ``BODY[] {123456}`` followed by that many raw bytes,
and those bytes must go to a file as they arrive, not into memory. When a
literal starts, the reader asks ``choose_sink`` where the bytes should go;
``None`` means "keep it in memory" (mailbox names, small strings), anything
else receives ``write(chunk)`` calls and stands in the parsed response in
place of the bytes.

Anything malformed raises :class:`ProtocolError`; the client drops the
connection on it rather than guessing (DESIGN: a server that sends garbage
gets its connection dropped and re-established).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_LINE = 16 * 1024 * 1024
"""Longest response line we accept (a ``* SEARCH`` with a million UIDs is ~8 MB)."""

MAX_MEMORY_LITERAL = 16 * 1024 * 1024
"""Largest literal kept in memory; bodies are streamed and not subject to it."""

MAX_STREAMED_LITERAL = 4 * 1024 * 1024 * 1024
"""Largest literal we stream to disk; beyond it a size is absurd, not a message."""

MAX_MEMORY_LITERALS_PER_RESPONSE = 32 * 1024 * 1024
"""In-memory literal bytes one response may carry in all (headers, literal names):
without it, one response could hold any number of 16 MiB literals."""

MAX_DEPTH = 64
"""Deepest nesting of parentheses in a response. BODYSTRUCTURE of a deeply
nested MIME message is the deepest thing servers send (a few levels per MIME
level); 8 million ``(`` in one line cost 872 MB and overflowed the stack."""

STATUS_KINDS = frozenset({"OK", "NO", "BAD", "PREAUTH", "BYE"})


class ProtocolError(Exception):
    """The server sent something that is not IMAP: the connection must be dropped."""


class LiteralSink(Protocol):
    """Where a streamed literal's bytes go (a Maildir tmp file, in practice).

    ``write`` gets bytes or a memoryview of the read; one it keeps must be
    copied (the view's memory is the reader's).
    """

    def write(self, data: bytes | memoryview) -> None: ...

    def abort(self) -> None: ...


@dataclass
class Tagged:
    """The tagged completion of one of our commands."""

    tag: bytes
    status: str
    code: list[Any] | None
    text: str


@dataclass
class Untagged:
    """An untagged (``*``) response.

    ``kind`` is the response name upper-cased (``FETCH``, ``EXISTS``, ``LIST``,
    ``OK``...). ``number`` is the leading number of ``* 12 FETCH`` /
    ``* 3 EXISTS``. Status responses (``* OK [UIDVALIDITY 5] ...``) carry
    ``code`` and ``text``; all others carry their parsed ``data`` tokens:
    ``bytes`` for atoms and strings, ``None`` for NIL, lists for
    parenthesised lists, ``bytes`` or a sink object for literals.
    """

    kind: str
    number: int | None = None
    data: list[Any] = field(default_factory=list)
    code: list[Any] | None = None
    text: str = ""
    body: FetchBody | None = field(default=None, compare=False)
    """Set on a message's FETCH in the form :data:`_FETCH_BODY` matches whose
    response ended right after the body: its UID, size and flags, read and
    checked already, so that a consumer need not pick ``data`` apart again.
    ``data`` holds the same items all the same."""


@dataclass(frozen=True, slots=True)
class FetchBody:
    """The items of ``* n FETCH (UID u FLAGS (...) RFC822.SIZE s BODY[] {size}...)`` and nothing else."""

    uid: int
    flags: bytes
    """The flag list's inside, as sent (atoms, no NIL): e.g. ``\\Seen \\Flagged``."""
    size: int


@dataclass
class Continuation:
    """A ``+`` continuation request: the server waits for more of our command."""

    text: str


Response = Tagged | Untagged | Continuation

# One token at a time, anchored at a position. Order matters: a literal
# marker must be the last thing on its line; an atom may carry bracketed
# sections with spaces and parentheses inside (BODY[HEADER.FIELDS (FROM)]<0>)
# and, as an astring may, a bare "]" (a mailbox named "a]b").
#
# Every repetition below has alternatives that cannot both match at one
# position, so a match or a failure costs time linear in the line: lines may
# be megabytes long, and a pattern that backtracks over them (the first
# version took half a second for 16 KB of "[") would let a server stall the
# reactor.
_TOKEN = re.compile(
    rb"""
    (?P<space>\ +)
  | (?P<open>\()
  | (?P<close>\))
  | "(?P<quoted>[^"\\\r\n]*(?:\\["\\][^"\\\r\n]*)*)"
  | \{(?P<literal>[0-9]{1,12})\+?\}\Z
  | (?P<atom>(?:[^\x00-\x1f\x7f\ ()"{\[]+|\[[^\]\r\n]*\])+)
    """,
    re.VERBOSE,
)
_UNQUOTE = re.compile(rb"\\([\"\\])")
_FETCH_BODY = re.compile(
    rb"""
    ([0-9]{1,20})\ FETCH\ \(UID\ ([0-9]{1,20})
    \ FLAGS\ \(((?:[^\x00-\x1f\x7f\ ()"{\[\]]+(?:\ [^\x00-\x1f\x7f\ ()"{\[\]]+)*)?)\)
    \ RFC822\.SIZE\ ([0-9]{1,20})\ BODY\[\]\ \{([0-9]{1,12})\+?\}\Z
    """,
    re.VERBOSE,
)
"""The line that starts each message of a first sync, as Dovecot (and most servers) send it:
``12 FETCH (UID 34 FLAGS (\\Seen) RFC822.SIZE 5678 BODY[] {5678}`` after the ``* ``.
Matched whole, it is turned into the very tokens :func:`_tokenize` would make,
in one match instead of a dozen (a parser's share of a first sync: 20 -> 12 us
a message); any other form takes the general way."""
_NUMBER = re.compile(rb"[0-9]{1,20}\Z")
_KIND = re.compile(rb"[A-Za-z][A-Za-z0-9.-]{0,40}\Z")


class _Pending:
    """A response whose tokens continue across one or more literals."""

    def __init__(self, kind: str, number: int | None) -> None:
        self.kind = kind
        self.number = number
        self.top: list[Any] = []
        self.stack: list[list[Any]] = [self.top]
        self.memory_bytes = 0
        """In-memory literal bytes so far, against MAX_MEMORY_LITERALS_PER_RESPONSE."""
        self.body: FetchBody | None = None
        """Set by the fast path (``_fetch_body``); kept only if the response ends after the body."""

    @property
    def current(self) -> list[Any]:
        return self.stack[-1]

    def finish(self) -> Untagged:
        if len(self.stack) != 1:
            raise ProtocolError("unbalanced parentheses in response")
        return Untagged(self.kind, self.number, self.top, body=self.body)


SinkChooser = Callable[[Untagged, list[Any], int], "LiteralSink | None"]
"""(response so far, the list the literal will land in, size) -> sink or None for memory."""


class ResponseReader:
    """Frames and parses server responses; see the module docstring."""

    def __init__(
        self,
        on_response: Callable[[Response], None],
        choose_sink: SinkChooser | None = None,
        *,
        max_line: int = MAX_LINE,
        max_memory_literal: int = MAX_MEMORY_LITERAL,
        on_line: Callable[[bytes], None] | None = None,
    ) -> None:
        self._on_response = on_response
        self._choose_sink = choose_sink
        self._max_line = max_line
        self._max_memory_literal = max_memory_literal
        self._on_line = on_line
        self._buffer = bytearray()
        """The start of a line that the last read cut off (never holds an LF)."""
        self._pending: _Pending | None = None
        self.fast_line: Callable[[bytes], bool] | None = None
        """Offered each line that starts a response, before it is parsed; True:
        it was handled. A consumer's short cut for a flood of simple responses
        (a listing's ``* n FETCH (UID u FLAGS (...) RFC822.SIZE s)``)."""
        self.fast_run: Callable[[bytes, int], int] | None = None
        """Like :attr:`fast_line` for many lines at once: offered the read and the
        position where a response starts, it handles as many whole lines
        from there as it can and returns where it stopped (the position
        itself if it took none). Not offered while lines are traced."""
        # Literal in progress: bytes left, and either a sink or a memory buffer.
        self._literal_left = 0
        self._literal_sink: LiteralSink | None = None
        self._literal_memory: bytearray | None = None
        self._literal_target: list[Any] | None = None
        self._failed = False
        self._split = False
        self._rest: bytes | None = None

    # -- feeding ----------------------------------------------------------

    def split_after_line(self) -> None:
        """Stop parsing at the end of the line being handled; keep what follows raw.

        For a change of encoding in the middle of the stream (COMPRESS: the
        bytes after the tagged OK's CRLF are compressed, even those in the
        same chunk). Called from a response callback; :meth:`feed` returns
        once that line is handled, and :meth:`take_rest` hands over the rest.
        """
        self._split = True

    def take_rest(self) -> bytes | None:
        """What followed the line :meth:`split_after_line` was called for (None if not split)."""
        rest, self._rest = self._rest, None
        return rest

    def feed(self, data: bytes) -> None:
        """Consume bytes off the wire; calls ``on_response`` for each complete response.

        After it raises (ProtocolError, or whatever a callback or sink raised)
        the reader is finished: its position in the stream is unknown, so it
        aborts what is in progress and ignores all later input.
        """
        if self._failed:
            return
        try:
            self._feed(data)
        except BaseException:
            self.abort()
            raise

    def _feed(self, data: bytes) -> None:
        """Split ``data`` into lines and literal bytes, reading it in place.

        Only a line cut by the end of a read is copied into the buffer; the
        rest of a read (most of it the bytes of literals) goes from ``data``
        straight to where it belongs, so several messages in one read cost
        no more copies than one.
        """
        if not isinstance(data, bytes):
            data = bytes(data)
        pos = 0
        end = len(data)
        buffer = self._buffer
        while not self._failed:
            if self._literal_left:
                if pos >= end:
                    return
                pos = self._feed_literal(data, pos)
                continue
            if pos >= end:
                return
            if self.fast_run is not None and self._pending is None and not buffer:
                taken = self.fast_run(data, pos)
                if taken > pos:
                    pos = taken
                    continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                buffer += memoryview(data)[pos:]
                # A CR at the end may be the first half of the CRLF ending a line of
                # exactly max_line bytes: the limit must not depend on the chunking.
                partial = len(buffer) - (1 if buffer.endswith(b"\r") else 0)
                if partial > self._max_line:
                    raise ProtocolError(f"response line longer than {self._max_line} bytes")
                return
            if buffer:
                buffer += memoryview(data)[pos:nl]
                line = bytes(buffer)
                buffer.clear()
            else:
                line = data[pos:nl]
            pos = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self._max_line:
                raise ProtocolError(f"response line longer than {self._max_line} bytes")
            self._line(line)
            if self._split:
                # The encoding changes after this line (COMPRESS): the rest of
                # the read is not ours to parse.
                self._split = False
                self._rest = data[pos:]
                return

    def _feed_literal(self, data: bytes, pos: int) -> int:
        take = min(self._literal_left, len(data) - pos)
        if self._literal_sink is not None:
            # A read the literal takes whole goes to the sink as it is; a part
            # of one as a view, not a copy (most reads hold several messages).
            self._literal_sink.write(data if take == len(data) else memoryview(data)[pos : pos + take])
        else:
            assert self._literal_memory is not None
            self._literal_memory += memoryview(data)[pos : pos + take]
        self._literal_left -= take
        if not self._literal_left:
            self._end_literal()
        return pos + take

    def _end_literal(self) -> None:
        assert self._literal_target is not None
        if self._literal_sink is not None:
            value: Any = self._literal_sink
        else:
            value = bytes(self._literal_memory or b"")
        self._literal_target.append(value)
        self._literal_sink = None
        self._literal_memory = None
        self._literal_target = None

    def abort(self) -> None:
        """Give up on whatever is in progress: a streamed literal's sink is aborted.

        Called when the connection is lost or the stream was found corrupt, so
        that no half-written message file survives. The reader reads nothing
        more afterwards, even when called from one of its own callbacks in the
        middle of a chunk (a connection closed while a response is handled).
        """
        self._failed = True
        sink, self._literal_sink = self._literal_sink, None
        self._literal_left = 0
        if sink is not None:
            sink.abort()
        if self._pending is not None:
            _abort_sinks(self._pending.top)
        self._pending = None

    # -- lines ------------------------------------------------------------

    def _line(self, line: bytes) -> None:
        if self._on_line is not None:
            self._on_line(line)
        pending = self._pending
        if pending is not None:
            if line == b")" and len(pending.stack) == 2:
                # The usual end of a message's FETCH: what _tokens would do, without the tokenizer.
                pending.stack.pop()
                self._pending = None
                self._emit(Untagged(pending.kind, pending.number, pending.top, body=pending.body))
                return
            pending.body = None  # more items follow the body: the general way reads them all
            self._tokens(line, pending)
            return
        if self.fast_line is not None and self.fast_line(line):
            return
        if line.startswith(b"+"):
            self._emit(Continuation(line[2:].decode("utf-8", "replace")))
            return
        tag, sep, rest = line.partition(b" ")
        if not sep or not tag:
            raise ProtocolError(f"response too short: {line[:80]!r}")
        if tag == b"*":
            self._untagged(rest)
        else:
            self._tagged(tag, rest)

    def _tagged(self, tag: bytes, rest: bytes) -> None:
        status, _, text = rest.partition(b" ")
        kind = status.upper().decode("ascii", "replace")
        if kind not in ("OK", "NO", "BAD"):
            raise ProtocolError(f"bad tagged status {status[:20]!r}")
        code, text_str = _resp_text(text)
        self._emit(Tagged(tag, kind, code, text_str))

    def _untagged(self, rest: bytes) -> None:
        m = _FETCH_BODY.match(rest)
        if m is not None:
            self._fetch_body(m)
            return
        first, _, after = rest.partition(b" ")
        number: int | None = None
        if _NUMBER.match(first):
            number = int(first)
            first, _, after = after.partition(b" ")
        kind = first.upper().decode("ascii", "replace")
        if not _KIND.match(first):
            raise ProtocolError(f"bad untagged response {rest[:40]!r}")
        if kind in STATUS_KINDS and number is None:
            code, text = _resp_text(after)
            self._emit(Untagged(kind, None, [], code, text))
            return
        self._tokens(after, _Pending(kind, number))

    def _fetch_body(self, m: re.Match[bytes]) -> None:
        """A message's FETCH line up to its body's literal (see :data:`_FETCH_BODY`): what
        :meth:`_untagged` and :meth:`_tokens` would do with it, without the tokenizer."""
        number, uid, flags, size, literal = m.groups()
        pending = _Pending("FETCH", int(number))
        tokens = [None if f == b"NIL" else f for f in flags.split(b" ")] if flags else []
        items: list[Any] = [
            b"UID", uid,
            b"FLAGS", tokens,
            b"RFC822.SIZE", size,
            b"BODY[]",
        ]
        pending.top.append(items)
        pending.stack.append(items)
        if None not in tokens:
            pending.body = FetchBody(int(uid), flags, int(size))
        self._pending = pending
        self._start_literal(pending, int(literal))

    def _tokens(self, line: bytes, pending: _Pending) -> None:
        """Tokenise one line segment of ``pending``; finish it or start a literal.

        ``pending`` stays reachable from ``abort`` until it is handed over, so
        that the sinks of its earlier literals are aborted if this last line
        turns out to be malformed.
        """
        self._pending = pending
        literal = _tokenize(line, pending.stack)
        if literal is None:
            response = pending.finish()
            self._pending = None
            self._emit(response)
        else:
            self._start_literal(pending, literal)

    def _start_literal(self, pending: _Pending, size: int) -> None:
        target = pending.current
        sink = None
        if self._choose_sink is not None:
            sink = self._choose_sink(Untagged(pending.kind, pending.number, pending.top, body=pending.body), target, size)
        if sink is None:
            if size > self._max_memory_literal:
                raise ProtocolError(f"literal of {size} bytes is too large (limit {self._max_memory_literal})")
            pending.memory_bytes += size
            if pending.memory_bytes > MAX_MEMORY_LITERALS_PER_RESPONSE:
                raise ProtocolError(
                    f"one response carries more than {MAX_MEMORY_LITERALS_PER_RESPONSE} bytes of literals to hold in memory"
                )
            self._literal_memory = bytearray()
        else:
            if size > MAX_STREAMED_LITERAL:
                sink.abort()
                raise ProtocolError(f"literal of {size} bytes is absurd")
            self._literal_sink = sink
        self._literal_target = target
        self._literal_left = size
        if size == 0:
            self._end_literal()

    def _emit(self, response: Response) -> None:
        """Hand a response over; if the consumer fails on it, abort its sinks.

        A consumer that raised (a FETCH it found malformed, say) has not taken
        the sinks, and the connection is about to be dropped: nobody else
        would close them. Sinks must tolerate ``abort`` after they were used
        (a delivered Maildir file ignores it).
        """
        try:
            self._on_response(response)
        except BaseException:
            if isinstance(response, Untagged):
                _abort_sinks(response.data)
            raise


def _tokenize(line: bytes, stack: list[list[Any]]) -> int | None:
    """Append the tokens of ``line`` to the innermost list of ``stack``.

    Returns the size of the literal the line ends with, or None.
    """
    pos = 0
    end = len(line)
    match = _TOKEN.match
    while pos < end:
        m = match(line, pos)
        if m is None:
            raise ProtocolError(f"unparsable response near {line[pos:pos + 40]!r}")
        pos = m.end()
        group = m.lastgroup
        if group == "space":
            continue
        if group == "atom":
            value = m.group("atom")
            stack[-1].append(None if value == b"NIL" else value)
        elif group == "quoted":
            stack[-1].append(_UNQUOTE.sub(rb"\1", m.group("quoted")))
        elif group == "open":
            if len(stack) > MAX_DEPTH:
                raise ProtocolError(f"parentheses nested deeper than {MAX_DEPTH}")
            new: list[Any] = []
            stack[-1].append(new)
            stack.append(new)
        elif group == "close":
            if len(stack) == 1:
                raise ProtocolError("unbalanced ')' in response")
            stack.pop()
        else:  # a literal marker, which the pattern only matches at the end
            return int(m.group("literal"))
    return None


def _abort_sinks(tokens: list[Any]) -> None:
    for token in tokens:
        if isinstance(token, list):
            _abort_sinks(token)
        elif hasattr(token, "abort") and not isinstance(token, (bytes, bytearray)):
            token.abort()


def _resp_text(text: bytes) -> tuple[list[Any] | None, str]:
    """Split ``[CODE args] human text`` into the parsed code and the text."""
    if not text.startswith(b"["):
        return None, text.decode("utf-8", "replace")
    close = text.find(b"]")
    if close < 0:
        raise ProtocolError(f"unterminated response code {text[:40]!r}")
    stack: list[list[Any]] = [[]]
    if _tokenize(text[1:close], stack) is not None or len(stack) != 1:
        raise ProtocolError(f"malformed response code {text[:40]!r}")
    return stack[0], text[close + 1 :].lstrip(b" ").decode("utf-8", "replace")


# -- helpers for interpreting parsed tokens ---------------------------------


def as_int(token: Any, what: str) -> int:
    if isinstance(token, (bytes, bytearray)) and _NUMBER.match(token):
        return int(token)
    raise ProtocolError(f"expected a number for {what}, got {token!r}")


def as_flags(token: Any) -> frozenset[str]:
    if not isinstance(token, list) or not all(isinstance(t, bytes) for t in token):
        raise ProtocolError(f"expected a flag list, got {token!r}")
    return frozenset(t.decode("ascii", "replace") for t in token)


def fetch_items(response: Untagged) -> dict[str, Any]:
    """The ``(NAME value NAME value ...)`` of a FETCH response as a dict.

    Names are upper-cased; ``BODY.PEEK[]`` comes back as ``BODY[]``.
    """
    if response.number is None or len(response.data) != 1 or not isinstance(response.data[0], list):
        raise ProtocolError("malformed FETCH response")
    pairs = response.data[0]
    if len(pairs) % 2:
        raise ProtocolError("FETCH response with an odd number of items")
    items: dict[str, Any] = {}
    for i in range(0, len(pairs), 2):
        name = pairs[i]
        if not isinstance(name, bytes):
            raise ProtocolError(f"bad FETCH item name {name!r}")
        key = name.decode("ascii", "replace").upper()
        value = pairs[i + 1]
        if "[" in key and isinstance(value, list):
            # BODY[...] and BINARY[...] are strings (nstring); a list there
            # would reach a caller expecting bytes or a sink.
            raise ProtocolError(f"FETCH item {key} is not a string")
        if key in items and items[key] != value:
            # Two different bodies (or UIDs) in one response: whichever we
            # took could be the wrong message, and the other's sink would leak.
            raise ProtocolError(f"FETCH response gives {key} twice")
        items[key] = value
    return items


def code_name(code: list[Any] | None) -> str | None:
    if code and isinstance(code[0], bytes):
        return code[0].decode("ascii", "replace").upper()
    return None
