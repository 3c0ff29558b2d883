"""The fault proxy: every fault must happen exactly where and when a test asks for it.

Tests of mirrord's recovery are only as precise as the faults they inject,
so these check each fault at byte level against a tiny threaded server, then
through the real private Dovecot with stdlib imaplib and raw IMAP, the way
mirrord's tests will use it.
"""

from __future__ import annotations

import imaplib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from mirrord.testing.faultproxy import FaultProxy
from mirrord.testing import ImapAccount, make_message

Handler = Callable[[socket.socket], None]


class LoopbackServer:
    """A minimal TCP server: ``handler(sock)`` runs in a thread per connection.

    Records how each connection ended as seen by the server ("eof" or
    "reset") and everything it received, so tests can check what reached the
    far side of the proxy.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = int(self.listener.getsockname()[1])
        self.received = bytearray()
        self.endings: list[str] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(5)
        with sock:
            try:
                self.handler(sock)
            except (ConnectionResetError, BrokenPipeError):
                self.endings.append("reset")
            except (OSError, TimeoutError):
                self.endings.append("error")

    def drain(self, sock: socket.socket) -> None:
        """Read until the client goes away, noting how."""
        while True:
            data = sock.recv(65536)
            if not data:
                self.endings.append("eof")
                return
            self.received += data

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(2)
        self.listener.close()
        for thread in self._threads:
            thread.join(2)


def echo(server: LoopbackServer) -> Handler:
    def handle(sock: socket.socket) -> None:
        sock.sendall(b"* hello\r\n")
        while True:
            data = sock.recv(65536)
            if not data:
                server.endings.append("eof")
                return
            server.received += data
            sock.sendall(data)

    return handle


def greets_when_asked(server: LoopbackServer) -> Handler:
    """Like :func:`echo`, but greets only after the client's first byte.

    A server that greets at once races the client's own connect(): a proxy
    that cuts two bytes into the greeting can reset the connection before the
    client's connect() has returned, and the client then sees the reset at
    connect and never the two bytes. Waiting for the client takes the race out.
    """

    def handle(sock: socket.socket) -> None:
        if not sock.recv(1):
            server.endings.append("eof")
            return
        echo(server)(sock)

    return handle


def sends(*script: bytes | float) -> Callable[[LoopbackServer], Handler]:
    """A server that sends each bytes item and sleeps for each float, then reads until the end."""

    def make(server: LoopbackServer) -> Handler:
        def handle(sock: socket.socket) -> None:
            for step in script:
                if isinstance(step, bytes):
                    sock.sendall(step)
                else:
                    time.sleep(step)
            server.drain(sock)

        return handle

    return make


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[LoopbackServer], Handler]], LoopbackServer]]:
    servers: list[LoopbackServer] = []

    def start(make: Callable[[LoopbackServer], Handler]) -> LoopbackServer:
        server = LoopbackServer(lambda sock: None)
        server.handler = make(server)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def echo_proxy(serve: Callable[[Callable[[LoopbackServer], Handler]], LoopbackServer]) -> Iterator[tuple[FaultProxy, LoopbackServer]]:
    server = serve(echo)
    with FaultProxy("127.0.0.1", server.port) as proxy:
        yield proxy, server


def connect(proxy: FaultProxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def recv_until_reset(sock: socket.socket) -> bytes:
    """Everything the client gets before the connection is reset; fails if it ends any other way."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data)
        assert chunk, f"clean EOF after {len(data)} bytes, expected a reset"
        data += chunk


def assert_refused(proxy: FaultProxy) -> None:
    """The client sees a reset: at connect if it lands before the handshake is checked, else on first read."""
    try:
        refused = connect(proxy)
    except ConnectionResetError:
        return
    with refused:
        assert recv_until_reset(refused) == b""


def eventually(check: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# --------------------------------------------------------------------------
# Plain forwarding and life cycle


def test_forwards_both_ways_and_counts(echo_proxy: tuple[FaultProxy, LoopbackServer]) -> None:
    proxy, server = echo_proxy
    with connect(proxy) as client:
        assert recv_exactly(client, 9) == b"* hello\r\n"
        client.sendall(b"a NOOP\r\n")
        assert recv_exactly(client, 8) == b"a NOOP\r\n"
        assert (proxy.connections, proxy.active) == (1, 1)
        assert eventually(lambda: proxy.bytes_from_server == 17 and proxy.bytes_from_client == 8)
        client.shutdown(socket.SHUT_WR)
        assert client.recv(10) == b""  # the half-close went through, and the server's came back
    assert eventually(lambda: proxy.active == 0)
    assert server.endings == ["eof"]


def test_close_resets_connections_and_joins_its_thread(serve: Callable[[Callable[[LoopbackServer], Handler]], LoopbackServer]) -> None:
    server = serve(echo)
    proxy = FaultProxy("127.0.0.1", server.port)
    proxy.start()
    name = f"FaultProxy:{proxy.port}"
    client = connect(proxy)
    assert recv_exactly(client, 9) == b"* hello\r\n"
    started = time.monotonic()
    proxy.close()
    assert time.monotonic() - started < 0.5
    assert not [t for t in threading.enumerate() if t.name == name]
    with client, pytest.raises(ConnectionResetError):
        client.recv(10)
    with pytest.raises(OSError):
        connect(proxy, timeout=0.5)  # nobody listens any more
    proxy.close()  # idempotent


def test_idle_proxy_uses_no_cpu(echo_proxy: tuple[FaultProxy, LoopbackServer]) -> None:
    proxy, _ = echo_proxy
    proxy.shape(delay=0.01, rate_bytes_per_second=1e6)
    thread = next(t for t in threading.enumerate() if t.name == f"FaultProxy:{proxy.port}")

    def cpu_ticks() -> int:
        with open(f"/proc/self/task/{thread.native_id}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    with connect(proxy) as client:
        recv_exactly(client, 9)
        before = cpu_ticks()
        time.sleep(0.5)
        assert cpu_ticks() - before <= 2  # clock ticks are 10 ms: a busy loop would use ~50


def test_only_loopback() -> None:
    # A documentation address (RFC 5737), refused before anything connects.
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("203.0.113.9", 143)
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("127.0.0.1", 143, listen_host="0.0.0.0")


def test_listens_on_ipv6_loopback(serve: Callable[[Callable[[LoopbackServer], Handler]], LoopbackServer]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    server = serve(echo)
    try:
        proxy = FaultProxy("localhost", server.port, listen_host="::1")
        proxy.start()
    except OSError as error:
        pytest.skip(f"no ::1 here: {error}")
    with proxy, socket.create_connection(("::1", proxy.port), timeout=2) as client:
        assert recv_exactly(client, 9) == b"* hello\r\n"


def test_target_down_resets_the_client() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        dead_port = placeholder.getsockname()[1]  # bound, never listening: connections are refused
        with FaultProxy("127.0.0.1", dead_port) as proxy:
            assert_refused(proxy)
            assert eventually(lambda: proxy.active == 0)
            assert proxy.connections == 1


# --------------------------------------------------------------------------
# Faults, byte by byte


def test_reset_all_resets_both_sides(echo_proxy: tuple[FaultProxy, LoopbackServer]) -> None:
    proxy, server = echo_proxy
    with connect(proxy) as first, connect(proxy) as second:
        recv_exactly(first, 9)
        recv_exactly(second, 9)
        proxy.reset_all()
        assert proxy.active == 0
        for client in (first, second):
            assert recv_until_reset(client) == b""
        assert eventually(lambda: server.endings == ["reset", "reset"])
    with connect(proxy) as third:  # new connections are fine
        assert recv_exactly(third, 9) == b"* hello\r\n"


def test_stall_drops_bytes_but_keeps_the_connection_open(echo_proxy: tuple[FaultProxy, LoopbackServer]) -> None:
    proxy, server = echo_proxy
    with connect(proxy) as client:
        recv_exactly(client, 9)
        proxy.stall()
        client.sendall(b"lost\r\n")
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recv(10)
        assert proxy.active == 1 and server.endings == []
        assert proxy.bytes_from_client == 6  # it arrived, and went nowhere
        proxy.resume()
        client.settimeout(2)
        client.sendall(b"kept\r\n")
        assert recv_exactly(client, 6) == b"kept\r\n"
    assert bytes(server.received) == b"kept\r\n"


def test_refuse_resets_new_connections_only(echo_proxy: tuple[FaultProxy, LoopbackServer]) -> None:
    proxy, _ = echo_proxy
    with connect(proxy) as live:
        recv_exactly(live, 9)
        proxy.refuse(True)
        assert_refused(proxy)
        live.sendall(b"x")
        assert recv_exactly(live, 1) == b"x"
        proxy.refuse(False)
        with connect(proxy) as accepted:
            assert recv_exactly(accepted, 9) == b"* hello\r\n"
    assert proxy.connections == 3


def test_cut_after_delivers_exactly_that_many_bytes(serve: Callable[[Callable[[LoopbackServer], Handler]], LoopbackServer]) -> None:
    blob = bytes(range(256)) * 2000
    server = serve(sends(b"greeting\r\n", 0.1, blob))
    with FaultProxy("127.0.0.1", server.port) as proxy, connect(proxy) as client:
        assert recv_exactly(client, 10) == b"greeting\r\n"
        proxy.cut_after(123_457)
        assert recv_until_reset(client) == blob[:123_457]
        assert eventually(lambda: server.endings == ["reset"])


def test_cut_after_counts_from_the_start_of_later_connections_and_disarms(
    serve: Callable[[Callable[[LoopbackServer], Handler]], LoopbackServer],
) -> None:
    server = serve(greets_when_asked)
    with FaultProxy("127.0.0.1", server.port) as proxy:

        def ask(proxy: FaultProxy) -> socket.socket:
            client = connect(proxy)
            client.sendall(b"?")
            return client

        proxy.cut_after(4)
        with ask(proxy) as cut:
            assert recv_until_reset(cut) == b"* he"
        with ask(proxy) as spared:  # times=1: the rule is spent
            assert recv_exactly(spared, 9) == b"* hello\r\n"
        proxy.cut_after(2, times=None)
        for _ in range(2):
            with ask(proxy) as cut:
                assert recv_until_reset(cut) == b"* "
        proxy.heal()
        with ask(proxy) as spared:
            assert recv_exactly(spared, 9) == b"* hello\r\n"


def test_cut_when_finds_a_pattern_split_across_reads(serve: Callable[[Callable[[LoopbackServer], Handler]], LoopbackServer]) -> None:
    server = serve(sends(b"* 1 FETCH (BODY[] {10}\r\nsome", 0.1, b" body)\r\na OK\r\n"))
    with FaultProxy("127.0.0.1", server.port) as proxy:
        proxy.cut_when(b"some body", after_bytes=1)
        with connect(proxy) as client:
            assert recv_until_reset(client) == b"* 1 FETCH (BODY[] {10}\r\nsome body)"


def test_rewrite_edits_whole_lines_even_when_split_across_reads(
    serve: Callable[[Callable[[LoopbackServer], Handler]], LoopbackServer],
) -> None:
    server = serve(sends(b"a OK [APPEND", 0.1, b"UID 7 42] done\r\nb OK [APPENDUID 7 43] x\r\nrest", 0.1, b""))
    with FaultProxy("127.0.0.1", server.port) as proxy:
        proxy.rewrite(rb"\[APPENDUID [^]]*\] ", b"")
        with connect(proxy) as client:
            assert recv_exactly(client, 19) == b"a OK done\r\nb OK x\r\n"
            # The unterminated tail waits for its LF, and is delivered at the end all the same.
            client.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := client.recv(100):
                received += chunk
    assert received == b"rest"


def test_cut_when_client_sends_a_pattern(echo_proxy: tuple[FaultProxy, LoopbackServer]) -> None:
    proxy, server = echo_proxy
    proxy.cut_when(b"DONE", direction="client")
    with connect(proxy) as client:
        recv_exactly(client, 9)
        client.sendall(b"idle\r\n")
        assert recv_exactly(client, 6) == b"idle\r\n"
        client.sendall(b"DONE\r\nb LOGOUT\r\n")
        assert recv_until_reset(client) == b""
    assert eventually(lambda: server.endings == ["reset"])
    assert bytes(server.received) == b"idle\r\nDONE"


def test_drip_trickles(serve: Callable[[Callable[[LoopbackServer], Handler]], LoopbackServer]) -> None:
    server = serve(sends(b"x" * 20))
    with FaultProxy("127.0.0.1", server.port) as proxy:
        proxy.drip(100)
        with connect(proxy) as client:
            started = time.monotonic()
            pieces = []
            while sum(map(len, pieces)) < 20:
                pieces.append(client.recv(100))
            elapsed = time.monotonic() - started
    assert 0.18 < elapsed < 1.0
    assert len(pieces) >= 10  # a trickle, not one late burst


def test_delay_keeps_many_chunks_in_flight(serve: Callable[[Callable[[LoopbackServer], Handler]], LoopbackServer]) -> None:
    """1 MB is sixteen reads: if each waited out the delay in turn, it would take 0.4 s."""
    blob = b"y" * 1_000_000
    server = serve(sends(blob))
    with FaultProxy("127.0.0.1", server.port) as proxy:
        proxy.shape(delay=0.025)
        started = time.monotonic()
        with connect(proxy) as client:
            assert recv_exactly(client, len(blob)) == blob
        elapsed = time.monotonic() - started
    assert 0.025 <= elapsed < 0.2


def test_wait_for_returns_when_the_pattern_passes(serve: Callable[[Callable[[LoopbackServer], Handler]], LoopbackServer]) -> None:
    server = serve(sends(b"* OK ready\r\n", 0.3, b"* 3 EXI", 0.05, b"STS\r\n"))
    with FaultProxy("127.0.0.1", server.port) as proxy, connect(proxy) as client:
        started = time.monotonic()
        assert recv_exactly(client, 12) == b"* OK ready\r\n"
        assert proxy.wait_for(b"EXISTS", 2)
        elapsed = time.monotonic() - started
        assert 0.33 <= elapsed < 1.0
        assert recv_exactly(client, 12) == b"* 3 EXISTS\r\n"
        assert not proxy.wait_for(b"EXISTS", 0.1)  # only bytes after the call count


# --------------------------------------------------------------------------
# Through the real Dovecot


@pytest.fixture
def proxy(imap_account: ImapAccount) -> Iterator[FaultProxy]:
    with FaultProxy(imap_account.host, imap_account.port) as proxy:
        yield proxy


def imap(proxy: FaultProxy, account: ImapAccount, timeout: float = 5.0) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", proxy.port, timeout=timeout)
    client.login(account.user, account.password)
    return client


class RawImap:
    """IMAP over a bare socket, for checks on the exact bytes a client receives."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buffer = b""
        self.line()  # greeting

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("EOF")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line + b"\r\n"

    def command(self, tag: str, text: str) -> list[bytes]:
        self.sock.sendall(f"{tag} {text}\r\n".encode())
        lines = []
        while True:
            lines.append(self.line())
            if lines[-1].startswith(tag.encode() + b" "):
                assert lines[-1].startswith(tag.encode() + b" OK"), lines
                return lines

    def login(self, account: ImapAccount) -> None:
        self.command("a", f'LOGIN "{account.user}" "{account.password}"')


def test_imap_login_and_reset(proxy: FaultProxy, imap_account: ImapAccount) -> None:
    client = imap(proxy, imap_account)
    assert client.noop()[0] == "OK"
    proxy.reset_all()
    with pytest.raises((imaplib.IMAP4.abort, ConnectionResetError)):
        client.noop()
    client.shutdown()
    again = imap(proxy, imap_account)  # the server is still there for the reconnect
    assert again.noop()[0] == "OK"
    again.logout()


def test_imap_stall_times_out_with_the_connection_open(proxy: FaultProxy, imap_account: ImapAccount) -> None:
    client = imap(proxy, imap_account, timeout=1.0)
    proxy.stall()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.noop()
    assert time.monotonic() - started >= 0.9
    # No FIN, no RST: the socket is neither readable nor in error; the link is just silent.
    readable, _, errored = select.select([client.sock], [], [client.sock], 0)
    assert readable == [] and errored == [] and proxy.active == 1
    proxy.reset_all()
    client.shutdown()


def test_imap_cut_after_cuts_a_fetch_mid_body(proxy: FaultProxy, imap_account: ImapAccount) -> None:
    message = make_message(1, size=60_000)
    imap_account.client.append("INBOX", message)
    raw = RawImap(proxy.port)
    raw.login(imap_account)
    raw.command("b", "SELECT INBOX")
    assert raw.buffer == b""
    proxy.cut_after(20_000)
    raw.sock.sendall(b"c FETCH 1 BODY[]\r\n")
    received = recv_until_reset(raw.sock)
    raw.sock.close()
    assert len(received) == 20_000
    header, body = received.split(b"}\r\n", 1)
    assert header.endswith(b"BODY[] {%d" % len(message))
    assert message.startswith(body) and 0 < len(body) < len(message)


def test_imap_refuse(proxy: FaultProxy, imap_account: ImapAccount) -> None:
    proxy.refuse(True)
    with pytest.raises((imaplib.IMAP4.abort, ConnectionResetError)):
        imaplib.IMAP4("127.0.0.1", proxy.port, timeout=2)
    proxy.refuse(False)
    imap(proxy, imap_account).logout()


def test_imap_delay_sets_the_round_trip(proxy: FaultProxy, imap_account: ImapAccount) -> None:
    client = imap(proxy, imap_account)
    proxy.shape(delay=0.025)
    started = time.monotonic()
    client.noop()
    assert 0.05 <= time.monotonic() - started < 0.5
    client.logout()


def test_imap_rate_limit(proxy: FaultProxy, imap_account: ImapAccount) -> None:
    message = make_message(2, size=2000, attachment_bytes=150_000)  # about 200 KB
    assert 190_000 < len(message) < 220_000
    imap_account.client.append("INBOX", message)
    client = imap(proxy, imap_account)
    client.select("INBOX")
    proxy.shape(rate_bytes_per_second=1_000_000)
    started = time.monotonic()
    status, data = client.fetch("1", "(BODY[])")
    elapsed = time.monotonic() - started
    assert status == "OK" and data[0][1] == message  # type: ignore[index]
    assert len(message) / 1e6 - 0.01 <= elapsed < 0.5
    client.logout()


def test_imap_wait_for_and_cut_when_at_idle(proxy: FaultProxy, imap_account: ImapAccount) -> None:
    raw = RawImap(proxy.port)
    raw.login(imap_account)
    raw.command("b", "SELECT INBOX")
    idling = proxy.watch(b"+ idling")
    raw.sock.sendall(b"c IDLE\r\n")
    assert idling.wait(2)
    assert raw.line().startswith(b"+ idling")

    # Another client delivers in 0.3 s; the proxy sees the untagged EXISTS then.
    deliver = threading.Timer(0.3, lambda: imap_account.client.append("INBOX", make_message(3)))
    started = time.monotonic()
    deliver.start()
    try:
        assert proxy.wait_for(b"EXISTS", 5)
        assert time.monotonic() - started >= 0.3
    finally:
        deliver.join()
    assert raw.line() == b"* 1 EXISTS\r\n"
    raw.sock.close()

    # A connection that dies just as IDLE starts: the client gets "+ idling\r\n", then a reset.
    proxy.cut_when(b"+ idling", after_bytes=2)
    second = RawImap(proxy.port)
    second.login(imap_account)
    second.command("b", "SELECT INBOX")
    second.sock.sendall(b"c IDLE\r\n")
    assert recv_until_reset(second.sock) == b"+ idling\r\n"
    second.sock.close()
