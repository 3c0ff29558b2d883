"""``ca_file`` may be a bundle: every certificate in it is trusted, not only the first.

The handshake runs in memory (iosim, TLSMemoryBIOProtocol on both sides): no
sockets, no sleeps. The server's certificate is signed by the *second* CA of
the bundle; an unrelated CA comes first.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import protocol, ssl, task
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from mirrord.protocol.connect import load_ca_bundle, tls_options
from mirrord.testing.dovecot import _write_certificates


class Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: object = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data

    def connectionLost(self, reason: object) -> None:  # noqa: N802
        self.lost = reason


def handshake(tmp_path: Path, bundle: Path) -> tuple[Recorder, Recorder]:
    server_dir = tmp_path / "right"
    cert = ssl.PrivateCertificate.loadPEM(
        (server_dir / "server.pem").read_bytes() + (server_dir / "server.key").read_bytes()
    )
    client_app, server_app = Recorder(), Recorder()
    clock = task.Clock()  # TLS writes are aggregated until the next "reactor iteration"
    client_factory = TLSMemoryBIOFactory(
        tls_options("localhost", bundle), True, protocol.Factory.forProtocol(lambda: client_app), clock
    )
    server_factory = TLSMemoryBIOFactory(
        cert.options(), False, protocol.Factory.forProtocol(lambda: server_app), clock
    )
    client = client_factory.buildProtocol(None)
    server = server_factory.buildProtocol(None)
    pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), clock=clock)
    pump.flush()
    if client_app.lost is None:
        client_app.transport.write(b"hello over TLS")
        clock.advance(0)
        pump.flush()
    return client_app, server_app


@pytest.fixture()
def cas(tmp_path: Path) -> Path:
    for name in ("unrelated", "right"):
        (tmp_path / name).mkdir()
        _write_certificates(tmp_path / name, ["localhost"])
    return tmp_path


def test_second_certificate_of_a_bundle_is_trusted(cas: Path) -> None:
    bundle = cas / "bundle.pem"
    bundle.write_bytes((cas / "unrelated" / "ca.pem").read_bytes() + (cas / "right" / "ca.pem").read_bytes())
    assert len(load_ca_bundle(bundle)) == 2
    client_app, server_app = handshake(cas, bundle)
    assert client_app.lost is None, f"handshake failed: {client_app.lost}"
    assert server_app.data == b"hello over TLS"


def test_bundle_without_the_right_ca_is_still_refused(cas: Path) -> None:
    bundle = cas / "bundle.pem"
    bundle.write_bytes((cas / "unrelated" / "ca.pem").read_bytes())
    client_app, server_app = handshake(cas, bundle)
    assert server_app.data == b""
    assert client_app.lost is not None


def test_file_without_certificates_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"not a certificate\n")
    with pytest.raises(ValueError, match="no PEM certificate"):
        load_ca_bundle(empty)
