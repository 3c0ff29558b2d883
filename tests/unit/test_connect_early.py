"""Connecting without the resolver, and on a connection begun before the imports.

On MemoryReactorClock and StringTransport; the only real sockets are on
127.0.0.1, where the kernel completes or refuses a connect at once.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport

from mirrord.protocol import connect
from mirrord.protocol.client import MirrordIMAP4Client
from mirrord.protocol.connect import CONNECT_TIMEOUT, open_session, tcp_endpoint
from mirrord.protocol.early import EarlyConnection, begin_all

GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN ENABLE] ready\r\n"


@dataclass
class Settings:
    name: str = "acct"
    host: str = "127.0.0.1"
    port: int = 143
    tls: str = "none"
    ca_file: Path | None = None
    username: str = "me"
    compress: str = "no"


class AdoptingReactor(MemoryReactorClock):
    """Builds the protocol of an adopted connection on a StringTransport, as the real reactor would on the socket."""

    def __init__(self) -> None:
        super().__init__()
        self.adopted: list[tuple[Any, StringTransport]] = []

    def adoptStreamConnection(self, fileDescriptor: int, addressFamily: Any, factory: Any) -> None:
        super().adoptStreamConnection(fileDescriptor, addressFamily, factory)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.adopted.append((protocol, transport))


@pytest.mark.parametrize(
    "host, kind",
    [
        ("127.0.0.1", TCP4ClientEndpoint),
        ("::1", TCP6ClientEndpoint),
        ("imap.example.org", HostnameEndpoint),
        ("fe80::1%eth0", HostnameEndpoint),
    ],
)
def test_an_address_is_connected_to_straight_a_name_through_the_resolver(host: str, kind: type) -> None:
    assert isinstance(tcp_endpoint(MemoryReactorClock(), host, 143), kind)


def _session(reactor: MemoryReactorClock, **kw: Any) -> defer.Deferred[MirrordIMAP4Client]:
    return defer.Deferred.fromCoroutine(open_session(reactor, Settings(), "secret", label="acct worker 1", **kw))


def _log_in(client_side: Any, transport: StringTransport, session: defer.Deferred[MirrordIMAP4Client]) -> MirrordIMAP4Client:
    """Play the server from the greeting to a finished login (no ENABLE: no CONDSTORE offered)."""
    client_side.dataReceived(GREETING)
    assert transport.value().startswith(b"M1 AUTHENTICATE PLAIN ")
    transport.clear()
    client_side.dataReceived(b"M1 OK [CAPABILITY IMAP4rev1 NAMESPACE] logged in\r\n")
    results: list[Any] = []
    session.addBoth(results.append)
    assert results and isinstance(results[0], MirrordIMAP4Client), results
    return results[0]


def test_an_ip_address_needs_no_thread_pool() -> None:
    reactor = MemoryReactorClock()
    session = _session(reactor)
    # connectTCP straight away: no getaddrinfo in the reactor's thread pool.
    [(host, port, factory, timeout, _)] = reactor.tcpClients
    assert (host, port, timeout) == ("127.0.0.1", 143, CONNECT_TIMEOUT)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    client = _log_in(protocol, transport, session)
    assert client.state == "auth"


@pytest.fixture
def listener() -> Any:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    yield server
    server.close()


def test_an_early_connection_is_adopted_and_set_up_like_any_other(listener: socket.socket) -> None:
    early = EarlyConnection.begin("127.0.0.1", listener.getsockname()[1])
    assert early is not None
    reactor = AdoptingReactor()
    session = _session(reactor, early=early.take())
    assert reactor.tcpClients == []  # no second connection
    [(protocol, transport)] = reactor.adopted
    client = _log_in(protocol, transport, session)
    assert client.state == "auth"
    assert early.take() is None  # given out once


def test_a_refused_early_connection_falls_back_to_a_new_one() -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", port))
    reactor = AdoptingReactor()
    _session(reactor, early=sock)
    assert reactor.adopted == []
    assert [c[:2] for c in reactor.tcpClients] == [("127.0.0.1", 143)]  # the ordinary path, which reports
    assert sock.fileno() == -1  # closed


def test_an_early_connect_still_pending_is_waited_for_then_given_up(listener: socket.socket) -> None:
    # A listener whose queue is full drops further SYNs: the connect stays pending.
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    pending = None
    for _ in range(8):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        if not _writable(s):
            pending = s
            break
        fillers.append(s)
    if pending is None:
        pytest.skip("the kernel accepted every connect at once")
    reactor = AdoptingReactor()
    _session(reactor, early=pending)
    assert reactor.tcpClients == [] and len(reactor.writers) == 1  # waiting for the connect to end
    reactor.advance(CONNECT_TIMEOUT)
    assert reactor.writers == set()
    assert reactor.adopted == []
    assert [c[:2] for c in reactor.tcpClients] == [("127.0.0.1", 143)]
    for s in fillers:
        s.close()


def _writable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([], [sock], [], 0.2)[1])


def test_early_connections_are_begun_for_addresses_and_names(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    early = begin_all([Settings(name="a", port=port), Settings(name="b", host="localhost", port=port)])
    assert list(early) == ["a", "b"]
    early["a"].close()
    assert early["a"].take() is None
    assert early["b"].wait(5)
    early["b"].close()


def _refused_port() -> int:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    return port


def _resolving_to(*ports: int) -> Any:
    def resolve(host: str, port: int, **kw: Any) -> list[tuple[Any, ...]]:
        assert host == "imap.test" and kw == {"type": socket.SOCK_STREAM}
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p)) for p in ports]

    return resolve


def test_a_host_name_is_looked_up_in_a_thread_and_its_first_accepting_address_connected(
    listener: socket.socket,
) -> None:
    port = listener.getsockname()[1]
    # The resolver's first address refuses (as ::1 does for a server on
    # 127.0.0.1 only); the next one is taken, as a plain client would.
    early = EarlyConnection.begin("imap.test", port, resolve=_resolving_to(_refused_port(), port))
    assert early is not None
    assert early.wait(5)
    sock = early.take()
    assert sock is not None
    try:
        assert sock.getpeername()[1] == port
        assert not sock.getblocking()  # ready for the reactor
    finally:
        sock.close()
    assert early.take() is None  # given out once


def test_a_worker_does_not_wait_for_a_host_name_still_being_looked_up(listener: socket.socket) -> None:
    import threading

    port = listener.getsockname()[1]
    answer = threading.Event()

    def slow(host: str, port_: int, **kw: Any) -> list[tuple[Any, ...]]:
        answer.wait(5)
        return _resolving_to(port)(host, port_, **kw)

    early = EarlyConnection.begin("imap.test", port, resolve=slow)
    assert early is not None
    assert early.take() is None, "the ordinary path connects; nobody waits for the lookup"
    answer.set()
    assert early.wait(5)
    assert early.take() is None
    import select

    # The thread has finished: had it connected, the connection would be queued by now.
    assert select.select([listener], [], [], 0)[0] == [], "no needless connection to the server"


@pytest.mark.parametrize("error", [socket.gaierror(socket.EAI_NONAME, "unknown name"), UnicodeError("label too long")])
def test_a_name_that_cannot_be_looked_up_is_left_to_the_ordinary_path(error: Exception) -> None:
    def failing(host: str, port: int, **kw: Any) -> list[tuple[Any, ...]]:
        raise error

    early = EarlyConnection.begin("imap.test", 143, resolve=failing)
    assert early is not None
    assert early.wait(5)
    assert early.take() is None


def test_a_name_whose_every_address_refuses_is_left_to_the_ordinary_path() -> None:
    early = EarlyConnection.begin("imap.test", 143, resolve=_resolving_to(_refused_port(), _refused_port()))
    assert early is not None
    assert early.wait(5)
    assert early.take() is None


def test_the_pool_gives_the_early_socket_to_its_first_connection_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from mirrord.pool import WorkerPool

    given: list[Any] = []

    async def fake_open_session(reactor: Any, account: Any, password: str, **kw: Any) -> Any:
        given.append(kw.get("early"))
        raise connect.ConnectFailed("not in this test")

    monkeypatch.setattr("mirrord.pool.open_session", fake_open_session)

    class Early:
        def __init__(self) -> None:
            self.sock: object | None = object()

        def take(self) -> object | None:
            sock, self.sock = self.sock, None
            return sock

        def close(self) -> None:
            self.sock = None

    early = Early()
    first = early.sock
    pool = WorkerPool(MemoryReactorClock(), Settings(), "pw", 2, early=early)  # type: ignore[arg-type]
    for _ in range(2):
        d = defer.Deferred.fromCoroutine(pool.connect("acct worker 1"))
        d.addErrback(lambda f: f.trap(connect.ConnectFailed))
    assert given == [first, None]
