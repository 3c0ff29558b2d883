"""Discovery's NAMESPACE and LIST go out with the login's ENABLE, in one round trip.

A real WorkerPool and open_session on MemoryReactorClock; the test plays the
server on StringTransport: the bytes the client sends, and what happens when
the server refuses a pipelined command or drops the connection between them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport

from mirrord.config import Account
from mirrord.pool import WorkerPool
from mirrord.protocol.errors import CommandFailed
from mirrord.sync.account import Discovery, discover

GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN ENABLE COMPRESS=DEFLATE] ready\r\n"
CAPS = b"IMAP4rev1 ENABLE QRESYNC CONDSTORE NAMESPACE COMPRESS=DEFLATE"
LOGGED_IN = b"M1 OK [CAPABILITY " + CAPS + b"] logged in\r\n"
PIPELINED = b'M2 ENABLE QRESYNC\r\nM3 NAMESPACE\r\nM4 LIST "" "*"\r\n'
ANSWERS = (
    b"* ENABLED QRESYNC\r\nM2 OK enabled\r\n"
    b'* NAMESPACE (("" "/")) NIL NIL\r\nM3 OK done\r\n'
    b'* LIST (\\HasNoChildren) "/" INBOX\r\n* LIST (\\HasNoChildren) "/" Lists\r\nM4 OK done\r\n'
)


def account(tmp_path: Path, compress: str = "no") -> Account:
    return Account(
        name="acct", host="127.0.0.1", port=143, tls="none", ca_file=None, username="me",
        password=None, maildir=tmp_path / "Mail", workers=1, compress=compress,  # type: ignore[arg-type]
    )


class Server:
    """One connection the pool opened, played from the server's side."""

    def __init__(self, reactor: MemoryReactorClock, index: int) -> None:
        factory = reactor.tcpClients[index][2]
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def say(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def heard(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def log_in(self) -> None:
        self.say(GREETING)
        assert self.heard().startswith(b"M1 AUTHENTICATE PLAIN ")
        self.say(LOGGED_IN)

    def drop(self) -> None:
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.protocol.connectionLost(Failure(ConnectionLost("gone")))


def start(tmp_path: Path, compress: str = "no") -> tuple[MemoryReactorClock, WorkerPool, defer.Deferred[Discovery]]:
    reactor = MemoryReactorClock()
    acct = account(tmp_path, compress)
    pool = WorkerPool(reactor, acct, "pw", 1)
    return reactor, pool, defer.Deferred.fromCoroutine(discover(pool, acct))


def outcome(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not finished"
    return results[0]


def test_namespace_and_list_go_out_with_enable_in_one_round_trip(tmp_path: Path) -> None:
    reactor, pool, found = start(tmp_path)
    server = Server(reactor, 0)
    server.log_in()
    # All three at once, before any answer: ENABLE first, so it is in force for what follows.
    assert server.heard() == PIPELINED
    assert not found.called
    server.say(ANSWERS)
    discovery = outcome(found)
    assert [p.local_name for p in discovery.wanted] == ["INBOX", "Lists"]
    assert pool._all[0].client.enabled >= {"QRESYNC", "CONDSTORE"}
    assert server.heard() == b""


def test_compress_comes_last_in_the_same_round_trip(tmp_path: Path) -> None:
    reactor, _pool, found = start(tmp_path, compress="yes")
    server = Server(reactor, 0)
    server.log_in()
    assert server.heard() == PIPELINED + b"M5 COMPRESS DEFLATE\r\n"
    server.say(ANSWERS + b"M5 NO not today\r\n")  # refused: the session goes on plain
    assert [p.local_name for p in outcome(found).wanted] == ["INBOX", "Lists"]


def test_a_refused_enable_still_lists(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mirrord")
    reactor, pool, found = start(tmp_path)
    server = Server(reactor, 0)
    server.log_in()
    assert server.heard() == PIPELINED
    server.say(b"M2 BAD not now\r\n" + ANSWERS.split(b"M2 OK enabled\r\n", 1)[1])
    discovery = outcome(found)
    assert [p.local_name for p in discovery.wanted] == ["INBOX", "Lists"]
    assert pool._all[0].client.enabled == frozenset()  # catch-ups list in full: nothing claims QRESYNC
    assert "refused ENABLE QRESYNC" in caplog.text


@pytest.mark.parametrize("status", [b"NO", b"BAD"])
def test_a_refused_namespace_fails_discovery_with_the_servers_words(tmp_path: Path, status: bytes) -> None:
    reactor, _pool, found = start(tmp_path)
    server = Server(reactor, 0)
    server.log_in()
    assert server.heard() == PIPELINED
    server.say(b"* ENABLED QRESYNC\r\nM2 OK enabled\r\nM3 " + status + b" no namespace for you\r\n"
               b'* LIST () "/" INBOX\r\nM4 OK done\r\n')
    failure = outcome(found)
    assert failure.check(CommandFailed) and "no namespace for you" in str(failure.value)
    assert len(reactor.tcpClients) == 1  # a refusal is not retried


@pytest.fixture
def unhandled() -> Any:
    """Errors of Deferreds nobody consumed (Twisted logs them when they are collected)."""
    import gc

    from twisted.logger import globalLogPublisher

    seen: list[Any] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or "Unhandled" in str(event.get("log_format", "")):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield lambda: (gc.collect(), seen)[1]
    globalLogPublisher.removeObserver(observe)


def test_a_connection_dropped_between_them_is_retried_on_a_new_one(tmp_path: Path, unhandled: Any) -> None:
    reactor, _pool, found = start(tmp_path)
    first = Server(reactor, 0)
    first.log_in()
    assert first.heard() == PIPELINED
    first.say(b"* ENABLED QRESYNC\r\nM2 OK enabled\r\n")  # then nothing more: gone
    first.drop()
    assert not found.called
    assert len(reactor.tcpClients) == 2  # the pool's retry
    second = Server(reactor, 1)
    second.log_in()
    assert second.heard() == PIPELINED  # asked again, on the new session's set-up
    second.say(ANSWERS)
    assert [p.local_name for p in outcome(found).wanted] == ["INBOX", "Lists"]
    assert unhandled() == []


def test_a_connection_dropped_before_enable_answers_is_retried_too(tmp_path: Path, unhandled: Any) -> None:
    reactor, _pool, found = start(tmp_path)
    first = Server(reactor, 0)
    first.log_in()
    assert first.heard() == PIPELINED
    first.drop()  # open_session fails: the pipelined commands fail with it, quietly
    second = Server(reactor, 1)
    second.log_in()
    assert second.heard() == PIPELINED
    second.say(ANSWERS)
    assert [p.local_name for p in outcome(found).wanted] == ["INBOX", "Lists"]
    assert unhandled() == []


def test_on_a_connection_already_open_they_go_out_by_themselves(tmp_path: Path) -> None:
    reactor, pool, found = start(tmp_path)
    server = Server(reactor, 0)
    server.log_in()
    server.heard()
    server.say(ANSWERS)
    outcome(found)
    again = defer.Deferred.fromCoroutine(discover(pool, account(tmp_path)))
    assert server.heard() == b'M5 NAMESPACE\r\nM6 LIST "" "*"\r\n'
    server.say(b'* NAMESPACE (("" "/")) NIL NIL\r\nM5 OK done\r\n* LIST () "/" INBOX\r\nM6 OK done\r\n')
    assert [p.local_name for p in outcome(again).wanted] == ["INBOX"]
