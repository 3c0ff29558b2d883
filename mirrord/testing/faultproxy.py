"""A loopback TCP proxy that tests and benchmarks break on purpose.

mirrord's hardest code is what it does when the network misbehaves: a
connection reset in the middle of a 20 MB literal, a link that goes silent
without closing, a server that refuses connections for a while, a reply that
trickles in a byte at a time. A real server cannot be made to do those things
on cue, so the tests put :class:`FaultProxy` between mirrord and the private
Dovecot and inject the faults there, at exact points of the byte stream.

The same proxy emulates an ordinary slow link for benchmarks (one-way delay
and a rate limit), since loopback has neither and every timing measured on it
hides round trips.

Why it is built this way:

* It runs in a thread of its own, on plain sockets and :mod:`selectors`, not on
  the Twisted reactor: tests run mirrord as a separate process and run no
  reactor themselves, and a fault injector sharing a reactor with the code it
  breaks could never stall that code's I/O independently anyway.
* Every control method applies its change inside the proxy's thread and
  returns only once it has taken effect, so ``proxy.reset_all()`` followed by a
  client command is not a race.
* Delay is a timestamp on each chunk, released when due, never a sleep: a
  sleeping loop would serialise every connection and cap throughput at one
  chunk per delay. Rates are token buckets shared by all connections, because
  the proxy stands for one link.
* When nothing is due the thread blocks in ``select`` with no timeout; an idle
  proxy costs no CPU.
* It only ever listens on, and connects to, loopback addresses: a forgotten
  proxy must not become an open relay on a real interface.

Faults act on the TCP byte stream, so byte counts and patterns mean IMAP
bytes only on plain (or STARTTLS-before-upgrade) connections; through TLS the
proxy can still reset, stall, drip and shape, but sees ciphertext.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import re
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Literal, TypeVar

__all__ = ["Direction", "FaultProxy", "FaultProxyError", "Watch"]

Direction = Literal["server", "client"]
"""Which side *sent* the bytes: ``"server"`` is server-to-client traffic."""

T = TypeVar("T")

#: Longest pattern that :meth:`FaultProxy.cut_when` and :meth:`FaultProxy.watch`
#: accept. Each stream keeps this many bytes minus one from its last read, so
#: that a pattern split across two reads is still found.
MAX_PATTERN = 1024

_RECV_SIZE = 65536
# Without a rate limit, stop reading from a side once this much is queued for
# the other (only reached with a delay, or a peer that does not read): enough
# for a 1 Gbit/s link at 25 ms one way, without letting memory grow unbounded.
_HIGH_WATER = 4 * 1024 * 1024
# With a rate limit, queue only what the link holds in flight plus a little,
# as a router's modest buffer would; a huge buffer would add seconds of
# queueing delay that no real link has.
_RATE_QUEUE_SECONDS = 0.05
_RATE_QUEUE_EXTRA = 65536
# Token buckets refill for this long at most: short enough that a drip comes
# out as a trickle and a shaped link never bursts far above its rate.
_BURST_SECONDS = 0.005
_MAX_BURST = 256 * 1024
# How long a control call waits for the proxy thread to apply it.
_CALL_TIMEOUT = 10.0

_LINGER_RESET = struct.pack("ii", 1, 0)


class FaultProxyError(RuntimeError):
    """The proxy thread died, or did not answer a control call in time."""


def _loopback(host: str, what: str) -> str:
    """Return ``host`` as a loopback address literal, or refuse it.

    "localhost" is mapped to 127.0.0.1 rather than resolved, so that a
    resolver preferring ::1 (or a hosts file pointing elsewhere) cannot make
    the proxy listen or connect somewhere unexpected.
    """
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{what} must be a loopback address literal such as 127.0.0.1 or ::1, not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"{what} {host!r} is not a loopback address; the fault proxy only works on loopback")
    return str(address)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _hard_close(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN: what a dropped connection looks like to the peer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


class Watch:
    """Fires when a pattern passes through the proxy; made by :meth:`FaultProxy.watch`.

    Separate from waiting so that a test can start watching *before* the
    action that produces the pattern: a watch started afterwards could miss
    bytes that went by in between.
    """

    def __init__(self, pattern: bytes, direction: Direction) -> None:
        self.pattern = pattern
        self.direction: Direction = direction
        self._event = threading.Event()
        self.fired_at: float | None = None
        """``time.monotonic()`` when the proxy read the last byte of the pattern."""

    def wait(self, timeout: float) -> bool:
        """Block until the pattern has passed, at most ``timeout`` seconds; True if it has."""
        return self._event.wait(timeout)

    @property
    def fired(self) -> bool:
        return self._event.is_set()

    def _fire(self, now: float) -> None:
        self.fired_at = now
        self._event.set()

    def __repr__(self) -> str:
        return f"<Watch {self.pattern!r} from {self.direction} {'fired' if self.fired else 'pending'}>"


class _Cut:
    """A rule that resets connections at a point in one direction's byte stream.

    Either after ``count`` more bytes (counted per connection from when the
    rule was armed, or from the start of a connection opened later), or
    ``after_bytes`` past the end of ``pattern``. ``times`` is how many
    connections it may still cut (None: every one).
    """

    def __init__(self, direction: Direction, *, count: int | None, pattern: bytes | None, after_bytes: int, times: int | None) -> None:
        self.direction: Direction = direction
        self.count = count
        self.pattern = pattern
        self.after_bytes = after_bytes
        self.times = times


# Items in a pipe's queue: data, or a marker that acts when it reaches the
# head, so that a FIN or RST goes out only after everything sent before it,
# delayed by the same amount.
_DATA, _EOF, _RESET = 0, 1, 2


class _Item:
    __slots__ = ("due", "kind", "data")

    def __init__(self, due: float, kind: int, data: memoryview | None = None) -> None:
        self.due = due
        self.kind = kind
        self.data = data


class _Bucket:
    """A token bucket: at most ``rate`` bytes a second, in bursts of a few milliseconds' worth."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, min(float(_MAX_BURST), rate * _BURST_SECONDS))
        # Start empty: the first byte of a transfer pays for its transmission
        # time like every other.
        self.tokens = 0.0
        self.stamp = time.monotonic()

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def allowance(self, now: float, want: int) -> tuple[int, float | None]:
        """How many of ``want`` bytes may go now; if none, when to ask again."""
        self._refill(now)
        # Ask for half a bucket, not a full one: then waking a little late
        # (select rounds timeouts to milliseconds) wastes no tokens at the cap.
        need = min(float(want), max(1.0, self.burst / 2))
        if self.tokens >= need:
            return min(want, int(self.tokens)), None
        return 0, now + (need - self.tokens) / self.rate

    def spend(self, sent: int) -> None:
        self.tokens -= sent


class _Pipe:
    """One direction of one proxied connection: bytes read from ``src``, queued, written to ``dst``."""

    def __init__(self, conn: _Conn, direction: Direction) -> None:
        self.conn = conn
        self.direction: Direction = direction
        self.queue: collections.deque[_Item] = collections.deque()
        self.queued = 0
        self.eof_read = False  # no more reading from src: EOF, error, or a cut decided
        self.done = False  # the FIN has gone out to dst
        self.blocked = False  # dst's send buffer is full; wait for it to be writable
        self.tail = b""  # the last MAX_PATTERN-1 bytes read, for patterns across reads
        self.partial = b""  # with a rewrite on: the read bytes after the last LF, held until it comes
        self.counters: dict[_Cut, int] = {}  # bytes still to forward before a cut fires

    @property
    def src(self) -> socket.socket | None:
        return self.conn.server if self.direction == "server" else self.conn.client

    @property
    def dst(self) -> socket.socket | None:
        return self.conn.client if self.direction == "server" else self.conn.server


class _Conn:
    def __init__(self, serial: int, client: socket.socket) -> None:
        self.serial = serial
        self.client: socket.socket | None = client
        self.server: socket.socket | None = None
        self.connecting = True
        self.up = _Pipe(self, "client")  # client -> server
        self.down = _Pipe(self, "server")  # server -> client
        self.registered: dict[int, int] = {}  # fileno -> selector events

    def pipes(self) -> tuple[_Pipe, _Pipe]:
        return (self.up, self.down)


class FaultProxy:
    """Forward TCP connections from ``127.0.0.1:port`` to a target, breaking them on demand.

    Use as a context manager, or call :meth:`start` and :meth:`close`::

        with FaultProxy(dovecot.host, dovecot.port) as proxy:
            client = imaplib.IMAP4("127.0.0.1", proxy.port)
            proxy.reset_all()

    Every fault takes effect before its method returns, on live connections
    and on those accepted later, and stays until undone (:meth:`heal` undoes
    them all). Faults and shaping may also be set before :meth:`start`.

    Counters (``connections``, ``active``, ``bytes_from_server``,
    ``bytes_from_client``) are updated by the proxy thread and safe to read
    from any thread; the byte counters count what each side sent to the
    proxy, including what a stall then dropped.
    """

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1") -> None:
        self.target_host = _loopback(target_host, "target_host")
        self.target_port = int(target_port)
        self.listen_host = _loopback(listen_host, "listen_host")
        self.port: int = 0
        """The port clients connect to; chosen by the kernel at :meth:`start`."""

        self.connections = 0
        """Connections accepted so far, including refused ones."""
        self.active = 0
        """Connections currently open."""
        self.bytes_from_server = 0
        self.bytes_from_client = 0

        # Fault and shaping state: touched only by the proxy thread once it runs.
        self._stalled = False
        self._refusing = False
        self._cuts: list[_Cut] = []
        self._rewrites: list[tuple[Direction, re.Pattern[bytes], bytes]] = []
        self._watches: list[Watch] = []
        self._delay = 0.0
        self._shape_rate: float | None = None
        self._drip_rate: float | None = None
        self._buckets: dict[Direction, _Bucket | None] = {"server": None, "client": None}

        self._conns: dict[int, _Conn] = {}
        self._serial = 0
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failure: BaseException | None = None
        self._calls: collections.deque[tuple[Callable[[], object], threading.Event, list[object]]] = collections.deque()
        self._calls_lock = threading.Lock()

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        """Listen on a free port and start forwarding; :attr:`port` is valid on return."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        if self._stopping:
            # Its port may already belong to someone else; a test that wants
            # the target "down for a while" wants refuse() instead.
            raise RuntimeError("a closed FaultProxy cannot be restarted; make a new one")
        listener = socket.socket(_family(self.listen_host), socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.listen_host, 0))
            listener.listen(128)
            listener.setblocking(False)
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._selector = selectors.DefaultSelector()
            self._selector.register(listener, selectors.EVENT_READ, None)
            self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        except BaseException:
            listener.close()
            self._close_plumbing()
            raise
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._thread = threading.Thread(target=self._run, name=f"FaultProxy:{self.port}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Reset every connection, stop listening and join the thread. Idempotent."""
        thread = self._thread
        if thread is None:
            self._close_plumbing()
            return
        self._stopping = True
        self._wake()
        thread.join(_CALL_TIMEOUT)
        if thread.is_alive():
            raise FaultProxyError(f"proxy thread on port {self.port} did not stop within {_CALL_TIMEOUT} s")
        self._thread = None
        self._close_plumbing()

    def __enter__(self) -> FaultProxy:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FaultProxy 127.0.0.1:{self.port} -> {self.target_host}:{self.target_port} active={self.active}>"

    # -- faults -----------------------------------------------------------------

    def reset_all(self) -> None:
        """Reset both sides of every live connection at once, discarding what is queued.

        Both peers get an RST (SO_LINGER 0): the client's next read or write
        fails with ECONNRESET, as after a NAT timeout or a server crash.
        New connections are not affected.
        """
        self._call(self._reset_all)

    def stall(self) -> None:
        """Turn the link into a black hole: nothing passes either way, nothing is closed.

        Bytes are read and *dropped*, as a real black hole drops packets (held
        bytes delivered later would be a slow link, not a dead one). So the
        peers' writes succeed, their reads wait forever, and only their own
        timeouts can notice; that is the point. What was queued (by a delay
        or a rate limit) is dropped too. New connections are accepted and
        connected to the target, but see nothing.
        """
        self._call(self._stall)

    def resume(self) -> None:
        """Forward again after :meth:`stall`.

        Whatever was dropped stays lost, so a stream that carried bytes
        during the stall is now corrupt: resuming suits links that were idle
        during the stall, and tests of new connections.
        """
        self._call(self._resume)

    def refuse(self, on: bool = True) -> None:
        """While on, reset every new connection as soon as it is accepted, like a server that is down.

        The kernel completes the handshake before the proxy can decide
        anything, so clients see a reset (ECONNRESET, from connect() or from
        their first read) rather than ECONNREFUSED.
        Live connections are left alone.
        """
        self._call(lambda: setattr(self, "_refusing", bool(on)))

    def cut_after(self, server_bytes: int, *, times: int | None = 1) -> None:
        """Forward ``server_bytes`` more bytes from the server, then reset the connection.

        Counted per connection, from now for live connections and from the
        first byte for later ones; the client receives exactly that many
        bytes, then a reset. Put the cut inside a FETCH literal to test a
        connection lost mid-message. ``times`` connections are cut before
        the rule disarms (None: every connection, for good).
        """
        if server_bytes < 0:
            raise ValueError("server_bytes must be >= 0")
        self._add_cut(_Cut("server", count=int(server_bytes), pattern=None, after_bytes=0, times=times))

    def cut_when(
        self,
        pattern: bytes,
        *,
        direction: Direction = "server",
        after_bytes: int = 0,
        times: int | None = 1,
    ) -> None:
        """Reset a connection once ``pattern`` has passed in ``direction``, plus ``after_bytes`` more bytes.

        The pattern (and ``after_bytes`` after it) is delivered, then both
        sides are reset: ``cut_when(b"+ idling")`` kills a connection just
        as IDLE starts, ``cut_when(b"DONE", direction="client")`` just as the
        client ends it, ``cut_when(b"BODY[] {", after_bytes=1000)`` in the
        middle of a literal. Patterns split across reads are found.
        """
        self._check_pattern(pattern)
        if after_bytes < 0:
            raise ValueError("after_bytes must be >= 0")
        self._add_cut(_Cut(self._check_direction(direction), count=None, pattern=bytes(pattern), after_bytes=int(after_bytes), times=times))

    def rewrite(self, pattern: bytes, replacement: bytes, *, direction: Direction = "server") -> None:
        """Replace what matches the regular expression ``pattern`` in each line ``direction`` sends.

        For servers that answer what RFC 3501 allows but Dovecot never
        sends: ``rewrite(rb"\\[APPENDUID [^]]*\\] ", b"")`` makes an APPEND
        whose new UID the client must find by itself. The stream is
        rewritten line by line (up to each LF), so a match never straddles
        two reads; bytes after the last LF wait for the next one. Byte
        counts of cuts refer to the rewritten stream. Undone by :meth:`heal`.
        """
        compiled = re.compile(bytes(pattern))
        rule = (self._check_direction(direction), compiled, bytes(replacement))
        self._call(lambda: self._rewrites.append(rule))

    def drip(self, bytes_per_second: float | None) -> None:
        """Deliver server-to-client bytes as a slow trickle, or stop (None).

        Comes on top of :meth:`shape`'s rate (the slower wins), and applies
        to all connections together, like a congested link.
        """
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive, or None to stop dripping")

        def apply() -> None:
            self._drip_rate = None if bytes_per_second is None else float(bytes_per_second)
            self._update_buckets()

        self._call(apply)

    def heal(self) -> None:
        """Undo every fault (stall, refuse, cuts, drip, rewrites); shaping stays, as it models the link, not a fault."""

        def apply() -> None:
            self._resume()
            self._rewrites.clear()
            self._refusing = False
            self._remove_cuts(list(self._cuts))
            self._drip_rate = None
            self._update_buckets()

        self._call(apply)

    # -- link emulation ----------------------------------------------------------

    def shape(self, *, delay: float = 0.0, rate_bytes_per_second: float | None = None) -> None:
        """Emulate a real link: ``delay`` seconds one way (RTT is twice that) and a rate in each direction.

        For example ``shape(delay=0.025, rate_bytes_per_second=12.5e6)`` is a
        50 ms RTT, 100 Mbit/s link. Each chunk is released ``delay`` after it
        arrived, so many chunks are in flight at once and throughput is not
        bounded by the delay. The rate is shared by all connections. Bytes
        already queued keep the delay they were given.
        """
        if delay < 0:
            raise ValueError("delay must be >= 0")
        if rate_bytes_per_second is not None and rate_bytes_per_second <= 0:
            raise ValueError("rate_bytes_per_second must be positive, or None for no limit")

        def apply() -> None:
            self._delay = float(delay)
            self._shape_rate = None if rate_bytes_per_second is None else float(rate_bytes_per_second)
            self._update_buckets()

        self._call(apply)

    # -- observing -----------------------------------------------------------------

    def watch(self, pattern: bytes, *, direction: Direction = "server") -> Watch:
        """Start watching for ``pattern`` sent by ``direction`` on any connection; returns a :class:`Watch`.

        Only bytes read after this call count; bytes a stall then drops
        count too (the proxy saw them go by). Start the watch before doing
        what produces the pattern, then ``watch.wait(timeout)``. It fires
        when the proxy *reads* the pattern, before any delay it adds.
        """
        self._check_pattern(pattern)
        watch = Watch(bytes(pattern), self._check_direction(direction))
        self._call(lambda: self._watches.append(watch))
        return watch

    def wait_for(self, pattern: bytes, timeout: float, *, direction: Direction = "server") -> bool:
        """Block until ``pattern`` passes (sent after this call) or ``timeout`` runs out; True if it did.

        For bytes that something else (mirrord in its own process, a
        thread) will send. If the caller's own next action sends the bytes,
        use :meth:`watch` before that action instead, or the bytes may pass
        before the wait begins.
        """
        watch = self.watch(pattern, direction=direction)
        if watch.wait(timeout):
            return True
        self._call(lambda: self._watches.remove(watch) if watch in self._watches else None)
        return watch.fired

    # -- control plumbing ------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the proxy thread and wait until it has run, so a fault is in force on return."""
        thread = self._thread
        if thread is None or threading.current_thread() is thread:
            return fn()
        if self._failure is not None or not thread.is_alive():
            raise FaultProxyError("the proxy thread is not running") from self._failure
        done = threading.Event()
        result: list[object] = []
        with self._calls_lock:
            self._calls.append((fn, done, result))
        self._wake()
        if not done.wait(_CALL_TIMEOUT):
            raise FaultProxyError(f"the proxy thread did not answer within {_CALL_TIMEOUT} s")
        if result and isinstance(result[0], _Raised):
            raise result[0].error
        if not result:
            raise FaultProxyError("the proxy thread stopped before applying the change") from self._failure
        return result[0]  # type: ignore[return-value]

    def _run_calls(self) -> None:
        while True:
            with self._calls_lock:
                if not self._calls:
                    return
                fn, done, result = self._calls.popleft()
            try:
                result.append(fn())
            except Exception as error:  # handed back to the caller, who raises it
                result.append(_Raised(error))
            done.set()

    def _wake(self) -> None:
        wake = self._wake_w
        if wake is None:
            return
        try:
            wake.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake, or closing

    @staticmethod
    def _check_pattern(pattern: bytes) -> None:
        if not isinstance(pattern, (bytes, bytearray)) or not pattern:
            raise ValueError("pattern must be non-empty bytes")
        if len(pattern) > MAX_PATTERN:
            raise ValueError(f"pattern longer than {MAX_PATTERN} bytes")

    @staticmethod
    def _check_direction(direction: str) -> Direction:
        if direction == "server":
            return "server"
        if direction == "client":
            return "client"
        raise ValueError(f"direction must be 'server' or 'client', not {direction!r}")

    # -- fault implementations (proxy thread) ----------------------------------------

    def _reset_all(self) -> None:
        for conn in list(self._conns.values()):
            self._reset(conn)

    def _stall(self) -> None:
        self._stalled = True
        for conn in self._conns.values():
            for pipe in conn.pipes():
                # Drop queued data but keep FIN/RST markers: a black hole
                # loses bytes, not the fact that a side has gone.
                kept = [item for item in pipe.queue if item.kind != _DATA]
                pipe.queue = collections.deque(kept)
                pipe.queued = 0
            self._update_interest(conn)

    def _resume(self) -> None:
        self._stalled = False
        for conn in self._conns.values():
            self._update_interest(conn)

    def _add_cut(self, cut: _Cut) -> None:
        if cut.times is not None and cut.times < 1:
            raise ValueError("times must be >= 1, or None for every connection")

        def apply() -> None:
            self._cuts.append(cut)
            if cut.count is not None:
                for conn in self._conns.values():
                    pipe = conn.down if cut.direction == "server" else conn.up
                    if not pipe.eof_read:
                        pipe.counters[cut] = cut.count

        self._call(apply)

    def _remove_cuts(self, cuts: list[_Cut]) -> None:
        for cut in cuts:
            if cut in self._cuts:
                self._cuts.remove(cut)
            for conn in self._conns.values():
                for pipe in conn.pipes():
                    pipe.counters.pop(cut, None)

    def _update_buckets(self) -> None:
        """Rebuild the token buckets after a rate change; the server direction takes the slower of shape and drip."""
        rates: dict[Direction, float | None] = {"client": self._shape_rate, "server": self._shape_rate}
        if self._drip_rate is not None:
            down = rates["server"]
            rates["server"] = self._drip_rate if down is None else min(down, self._drip_rate)
        for direction, rate in rates.items():
            bucket = self._buckets[direction]
            if rate is None:
                self._buckets[direction] = None
            elif bucket is None or bucket.rate != rate:
                self._buckets[direction] = _Bucket(rate)
        for conn in self._conns.values():
            self._update_interest(conn)

    def _high_water(self, direction: Direction) -> int:
        bucket = self._buckets[direction]
        if bucket is None:
            return _HIGH_WATER
        return int(bucket.rate * (self._delay + _RATE_QUEUE_SECONDS)) + _RATE_QUEUE_EXTRA

    # -- the loop (proxy thread) -------------------------------------------------------

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        deadline: float | None = None
        try:
            while not self._stopping:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                for key, mask in selector.select(timeout):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._drain_wake()
                    else:
                        conn, side = key.data
                        self._on_ready(conn, side, mask)
                self._run_calls()
                deadline = self._flush_all()
        except BaseException as error:  # noqa: BLE001 - recorded, then raised to every later caller
            self._failure = error
            raise
        finally:
            for conn in list(self._conns.values()):
                self._reset(conn)
            # Release anyone still waiting on a call that will never run now.
            with self._calls_lock:
                pending = list(self._calls)
                self._calls.clear()
            for _fn, done, _result in pending:
                done.set()

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                # EMFILE and the like: leave the connection in the backlog
                # rather than spin on it; the next accept retries.
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                raise
            self.connections += 1
            if self._refusing:
                _hard_close(client)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._serial += 1
            conn = _Conn(self._serial, client)
            self._conns[conn.serial] = conn
            self.active += 1
            for cut in self._cuts:
                if cut.count is not None:
                    pipe = conn.down if cut.direction == "server" else conn.up
                    pipe.counters[cut] = cut.count
            server = socket.socket(_family(self.target_host), socket.SOCK_STREAM)
            server.setblocking(False)
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.server = server
            code = server.connect_ex((self.target_host, self.target_port))
            if code == 0:
                conn.connecting = False
            elif code not in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                self._reset(conn)
                continue
            self._update_interest(conn)

    def _on_ready(self, conn: _Conn, side: Direction, mask: int) -> None:
        if conn.serial not in self._conns:
            return  # reset earlier in this round of events
        sock = conn.server if side == "server" else conn.client
        if sock is None:
            return
        if side == "server" and conn.connecting:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                self._reset(conn)  # target down: the client sees a reset
                return
            conn.connecting = False
            self._update_interest(conn)
            return
        # Writable: the pipe writing to this side may go on (flushed below).
        if mask & selectors.EVENT_WRITE:
            (conn.down if side == "client" else conn.up).blocked = False
        if mask & selectors.EVENT_READ:
            self._read(conn.down if side == "server" else conn.up)
        if conn.serial in self._conns:
            self._update_interest(conn)

    def _read(self, pipe: _Pipe) -> None:
        src = pipe.src
        assert src is not None
        now = time.monotonic()
        try:
            data = src.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # The sender reset (or worse): pass the reset on, in order after
            # what it sent before.
            pipe.eof_read = True
            self._enqueue(pipe, _Item(now + self._delay, _RESET))
            return
        if not data:
            pipe.eof_read = True
            if pipe.partial:
                self._enqueue(pipe, _Item(now + self._delay, _DATA, memoryview(pipe.partial)))
                pipe.partial = b""
            self._enqueue(pipe, _Item(now + self._delay, _EOF))
            return
        if pipe.direction == "server":
            self.bytes_from_server += len(data)
        else:
            self.bytes_from_client += len(data)
        data = self._rewritten(pipe, data)
        if not data:
            return
        matches = self._scan(pipe, data, now)
        pipe.tail = (pipe.tail + data)[-(MAX_PATTERN - 1) :] if len(data) < MAX_PATTERN - 1 else data[-(MAX_PATTERN - 1) :]
        if self._stalled:
            return  # into the black hole; cuts count forwarded bytes only
        cut_at, cut = self._cut_point(pipe, data, matches)
        if cut is not None:
            data = data[:cut_at]
            pipe.eof_read = True  # no more reading: the connection is about to go
            self._spend_cut(cut)
        if data:
            self._enqueue(pipe, _Item(now + self._delay, _DATA, memoryview(data)))
        if cut is not None:
            self._enqueue(pipe, _Item(now + self._delay, _RESET))

    def _rewritten(self, pipe: _Pipe, data: bytes) -> bytes:
        """``data`` up to its last LF, after the rewrites for ``pipe``'s direction; the rest is held."""
        rules = [(pattern, replacement) for direction, pattern, replacement in self._rewrites if direction == pipe.direction]
        if not rules and not pipe.partial:
            return data
        buffer = pipe.partial + data
        end = buffer.rfind(b"\n") + 1
        if not rules:
            pipe.partial = b""
            return buffer
        lines, pipe.partial = buffer[:end], buffer[end:]
        out = []
        for line in lines.splitlines(keepends=True):
            for pattern, replacement in rules:
                line = pattern.sub(replacement, line)
            out.append(line)
        return b"".join(out)

    def _scan(self, pipe: _Pipe, data: bytes, now: float) -> dict[_Cut, int]:
        """Fire watches matching ``data``; return, per pattern cut, where in ``data`` its pattern ends.

        The previous read's tail is searched along with ``data``, but only
        matches ending inside ``data`` count, so none is found twice.
        """
        watches = [w for w in self._watches if w.direction == pipe.direction]
        cuts = [c for c in self._cuts if c.pattern is not None and c.direction == pipe.direction and c not in pipe.counters]
        if not watches and not cuts:
            return {}
        buffer = pipe.tail + data
        offset = len(pipe.tail)

        def end_of(pattern: bytes) -> int | None:
            start = max(0, offset - len(pattern) + 1)
            found = buffer.find(pattern, start)
            return None if found < 0 else found + len(pattern) - offset

        for watch in watches:
            if end_of(watch.pattern) is not None:
                watch._fire(now)
                self._watches.remove(watch)
        ends: dict[_Cut, int] = {}
        for cut in cuts:
            assert cut.pattern is not None
            end = end_of(cut.pattern)
            if end is not None:
                ends[cut] = end
        return ends

    def _cut_point(self, pipe: _Pipe, data: bytes, matches: dict[_Cut, int]) -> tuple[int, _Cut | None]:
        """Find the earliest cut falling within ``data``; count the others down past it."""
        points: dict[_Cut, int] = dict(pipe.counters)
        for cut, end in matches.items():
            points[cut] = end + cut.after_bytes
        best: _Cut | None = None
        best_at = len(data) + 1
        for cut, at in points.items():
            if at <= len(data) and at < best_at:
                best, best_at = cut, at
        if best is not None:
            return best_at, best
        pipe.counters = {cut: at - len(data) for cut, at in points.items()}
        return len(data), None

    def _spend_cut(self, cut: _Cut) -> None:
        if cut.times is None:
            return
        cut.times -= 1
        if cut.times <= 0:
            self._remove_cuts([cut])

    def _enqueue(self, pipe: _Pipe, item: _Item) -> None:
        pipe.queue.append(item)
        if item.data is not None:
            pipe.queued += len(item.data)

    def _flush_all(self) -> float | None:
        """Write whatever is due on every pipe; return when something next falls due (None: nothing timed)."""
        now = time.monotonic()
        deadline: float | None = None
        for conn in list(self._conns.values()):
            for pipe in conn.pipes():
                if conn.serial not in self._conns:
                    break
                due = self._flush(pipe, now)
                if due is not None and (deadline is None or due < deadline):
                    deadline = due
            if conn.serial in self._conns:
                self._update_interest(conn)
        return deadline

    def _flush(self, pipe: _Pipe, now: float) -> float | None:
        conn = pipe.conn
        dst = pipe.dst
        if self._stalled or pipe.blocked or dst is None or conn.connecting:
            return None
        bucket = self._buckets[pipe.direction]
        while pipe.queue:
            item = pipe.queue[0]
            if item.due > now:
                return item.due
            if item.kind == _RESET:
                self._reset(conn)
                return None
            if item.kind == _EOF:
                pipe.queue.popleft()
                pipe.done = True
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                if conn.up.done and conn.down.done:
                    self._close(conn)
                return None
            assert item.data is not None
            allowed = len(item.data)
            if bucket is not None:
                allowed, retry = bucket.allowance(now, allowed)
                if retry is not None:
                    return retry
            try:
                sent = dst.send(item.data[:allowed])
            except (BlockingIOError, InterruptedError):
                pipe.blocked = True
                return None
            except OSError:
                self._reset(conn)  # the receiver is gone: so is the connection
                return None
            if bucket is not None:
                bucket.spend(sent)
            pipe.queued -= sent
            if sent < len(item.data):
                item.data = item.data[sent:]
                if sent < allowed:
                    pipe.blocked = True  # the kernel took less than offered: its buffer is full
                    return None
            else:
                pipe.queue.popleft()
        return None

    def _update_interest(self, conn: _Conn) -> None:
        """Register each socket for exactly what it is waiting for, so idle sockets never wake the loop."""
        selector = self._selector
        assert selector is not None
        for side, sock in (("client", conn.client), ("server", conn.server)):
            if sock is None:
                continue
            events = 0
            if side == "server" and conn.connecting:
                events = selectors.EVENT_WRITE
            else:
                reading = conn.down if side == "server" else conn.up
                writing = conn.up if side == "server" else conn.down
                if not reading.eof_read and (self._stalled or reading.queued < self._high_water(reading.direction)):
                    events |= selectors.EVENT_READ
                if writing.blocked:
                    events |= selectors.EVENT_WRITE
            fd = sock.fileno()
            current = conn.registered.get(fd, 0)
            if events == current:
                continue
            if current == 0:
                selector.register(sock, events, (conn, side))
            elif events == 0:
                selector.unregister(sock)
            else:
                selector.modify(sock, events, (conn, side))
            if events:
                conn.registered[fd] = events
            else:
                conn.registered.pop(fd, None)

    def _forget(self, conn: _Conn) -> list[socket.socket]:
        selector = self._selector
        sockets = [s for s in (conn.client, conn.server) if s is not None]
        for sock in sockets:
            if conn.registered.pop(sock.fileno(), 0) and selector is not None:
                selector.unregister(sock)
        conn.client = conn.server = None
        if self._conns.pop(conn.serial, None) is not None:
            self.active -= 1
        return sockets

    def _reset(self, conn: _Conn) -> None:
        for sock in self._forget(conn):
            _hard_close(sock)

    def _close(self, conn: _Conn) -> None:
        for sock in self._forget(conn):
            sock.close()

    def _close_plumbing(self) -> None:
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._listener = self._wake_r = self._wake_w = None
        if self._selector is not None:
            self._selector.close()
            self._selector = None


class _Raised:
    """Wraps an exception raised by a control call in the proxy thread, to re-raise in the caller."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error
