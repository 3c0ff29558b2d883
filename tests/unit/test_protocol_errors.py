"""Connection failures read as one clean clause: no Twisted boilerplate, no doubled stops."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone, ConnectionLost, TimeoutError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mirrord.protocol.client import MirrordIMAP4Client
from mirrord.protocol.errors import ConnectFailed, describe_failure, quote_server_text


def failure_after_bye(bye: bytes) -> Failure:
    client = MirrordIMAP4Client(label="test", clock=task.Clock())
    client.makeConnection(StringTransport())
    client.dataReceived(b"* OK ready\r\n")
    d = defer.Deferred.fromCoroutine(client.noop())
    client.dataReceived(bye)
    client.connectionLost(Failure(ConnectionDone()))
    results: list[Any] = []
    d.addBoth(results.append)
    assert isinstance(results[0], Failure)
    return results[0]


def test_bye_reads_as_one_sentence_with_the_servers_words_quoted() -> None:
    text = describe_failure(failure_after_bye(b"* BYE Server shutting down.\r\n"))
    assert text == 'the server closed the session: "Server shutting down."'
    assert "non-clean" not in text and ".." not in text


def test_bye_without_text() -> None:
    assert describe_failure(failure_after_bye(b"* BYE \r\n")) == "the server closed the session: (no text)"


def test_twisted_errors_without_reason_get_a_plain_clause() -> None:
    assert describe_failure(ConnectionDone()) == "the server closed the connection"
    assert describe_failure(Failure(ConnectionLost())) == "the connection was lost"
    assert describe_failure(TimeoutError()) == "the connection timed out"


def test_our_errors_keep_their_message_without_trailing_stop() -> None:
    assert describe_failure(ConnectFailed("cannot connect to h:143: refused.")) == "cannot connect to h:143: refused"
    assert describe_failure(ValueError()) == "ValueError"


def test_quote_server_text_folds_whitespace() -> None:
    assert quote_server_text(" Logged\r\n out ") == '"Logged out"'


def test_connect_errors_keep_the_os_reason() -> None:
    from twisted.internet.error import ConnectionRefusedError

    assert describe_failure(ConnectionRefusedError("111: Connection refused")) == "111: Connection refused"
    assert describe_failure(ConnectionRefusedError()) == "the connection was refused"
