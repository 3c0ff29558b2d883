"""STARTTLS response injection (CVE-2011-0411 and kin), at the byte level.

A man in the middle appends forged responses to the plaintext ``OK`` of
STARTTLS, in the same TCP segment. Nothing of that may be read as if it had
come over TLS: the client drops the connection, and the capabilities it had
before TLS are never trusted after it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mirrord.protocol.client import MirrordIMAP4Client


class TLSStringTransport(StringTransport):
    """Records when TLS starts; bytes written after that are 'encrypted'."""

    def __init__(self) -> None:
        super().__init__()
        self.tls_options: Any = None
        self.tls_at: int | None = None

    def startTLS(self, options: Any) -> None:  # noqa: N802 - Twisted's name
        self.tls_options = options
        self.tls_at = len(self.value())


def connected() -> tuple[MirrordIMAP4Client, TLSStringTransport]:
    client = MirrordIMAP4Client(label="test", clock=task.Clock())
    transport = TLSStringTransport()
    client.makeConnection(transport)
    client.dataReceived(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n")
    return client, transport


def outcome(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results
    return results[0]


def test_bytes_after_starttls_ok_in_same_read_drop_the_connection() -> None:
    client, transport = connected()
    options = object()
    d = defer.Deferred.fromCoroutine(client.starttls(options))
    assert transport.value() == b"M1 STARTTLS\r\n"
    # One chunk: the OK, then a forged capability list, LOGIN OK and LIST.
    client.dataReceived(
        b"M1 OK Begin TLS\r\n"
        b"* CAPABILITY IMAP4rev1 AUTH=PLAIN IDLE\r\n"
        b"M2 OK [CAPABILITY IMAP4rev1 QRESYNC] forged\r\n"
        b"* LIST () \"/\" Forged\r\n"
    )
    assert transport.disconnecting or not transport.connected
    client.connectionLost(Failure(ConnectionDone()))  # what the reactor does next
    result = outcome(d)
    assert hasattr(result, "check"), f"starttls succeeded on injected bytes: {result!r}"
    # Nothing forged was believed.
    assert "AUTH=PLAIN" not in client.capabilities
    assert "QRESYNC" not in client.capabilities
    # TLS had started before the injected bytes were looked at.
    assert transport.tls_options is options


def test_capabilities_from_before_tls_are_not_trusted_after() -> None:
    client, transport = connected()
    d = defer.Deferred.fromCoroutine(client.starttls(object()))
    client.dataReceived(b"M1 OK Begin TLS\r\n")
    assert transport.tls_options is not None
    assert client.capabilities == frozenset()
    # Asked again, over TLS.
    assert transport.value().endswith(b"M2 CAPABILITY\r\n")
    client.dataReceived(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nM2 OK done\r\n")
    assert outcome(d) is None
    assert client.capabilities == {"IMAP4REV1", "AUTH=PLAIN"}
    assert "STARTTLS" not in client.capabilities and "LOGINDISABLED" not in client.capabilities


def test_clean_starttls_reads_later_chunks() -> None:
    client, transport = connected()
    d = defer.Deferred.fromCoroutine(client.starttls(object()))
    client.dataReceived(b"M1 OK Begin TLS\r\n")
    client.dataReceived(b"* CAPABILITY IMAP4rev1\r\n")
    client.dataReceived(b"M2 OK done\r\n")
    assert outcome(d) is None
    assert transport.connected and not transport.disconnecting
