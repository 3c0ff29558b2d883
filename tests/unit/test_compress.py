"""COMPRESS=DEFLATE (RFC 4978) on StringTransport: the switch point, partial blocks, both directions.

The server side here is plain zlib with raw deflate, as Dovecot's imap_zlib
uses it: what it sends is flushed with Z_SYNC_FLUSH, and the client's
output must inflate back to the exact command lines.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from mirrord.config import Account, PasswordSource
from mirrord.protocol.compress import INFLATE_PIECE, CompressionError, DeflateStream
from mirrord.protocol.connect import wants_compression
from mirrord.protocol.errors import CommandFailed
from tests.unit.test_protocol_client import MemorySink, connected, fetch_response, result_of, run, sent


class Server:
    """The server's half of a compressed connection."""

    def __init__(self) -> None:
        self.deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.inflater = zlib.decompressobj(-15)

    def say(self, data: bytes) -> bytes:
        return self.deflater.compress(data) + self.deflater.flush(zlib.Z_SYNC_FLUSH)

    def hear(self, data: bytes) -> bytes:
        return self.inflater.decompress(data)


def compressed_client(chunk_after_ok: bytes = b"") -> tuple[Any, Any, Server, list[Any]]:
    client, transport, _ = connected()
    events: list[Any] = []
    client.on_unsolicited = events.append
    d = run(client.compress())
    assert sent(transport) == b"M1 COMPRESS DEFLATE\r\n"
    server = Server()
    client.dataReceived(b"M1 OK Begin compression.\r\n" + chunk_after_ok)
    assert result_of(d) is None
    return client, transport, server, events


def test_stream_round_trip_and_partial_blocks() -> None:
    stream = DeflateStream()
    server = Server()
    text = b"* 1 FETCH (UID 7 BODY[] {11}\r\nhello world)\r\n" * 50
    wire = server.say(text)
    # One byte at a time: every partial block is kept until completed.
    out = b"".join(piece for i in range(len(wire)) for piece in stream.decompress(wire[i : i + 1]))
    assert out == text
    assert server.hear(stream.compress(b"M2 NOOP\r\n")) == b"M2 NOOP\r\n"
    assert stream.ratio is not None and stream.ratio > 1


def test_large_expansion_comes_out_in_bounded_pieces() -> None:
    stream = DeflateStream()
    text = b"a" * (INFLATE_PIECE * 5 + 17)
    pieces = list(stream.decompress(Server().say(text)))
    assert b"".join(pieces) == text
    assert max(len(p) for p in pieces) <= INFLATE_PIECE


def test_a_stream_may_end_but_nothing_may_follow_it() -> None:
    # Dovecot ends its deflate stream after the BYE to LOGOUT.
    deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
    ended = deflater.compress(b"* BYE bye\r\nM9 OK done\r\n") + deflater.flush(zlib.Z_FINISH)
    stream = DeflateStream()
    assert b"".join(stream.decompress(ended)) == b"* BYE bye\r\nM9 OK done\r\n"
    assert list(stream.decompress(b"")) == []
    with pytest.raises(CompressionError):
        list(stream.decompress(b"more"))
    with pytest.raises(CompressionError):
        list(DeflateStream().decompress(ended + b"trailing"))
    with pytest.raises(CompressionError):
        list(DeflateStream().decompress(b"\xff\xff\xff garbage"))


def test_logout_on_a_compressed_connection_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    client, transport, server, _ = compressed_client()
    d = run(client.logout())
    assert server.hear(sent(transport)) == b"M2 LOGOUT\r\n"
    client.dataReceived(server.say(b"* BYE Logging out\r\n") + server.deflater.compress(b"M2 OK Logout completed.\r\n")
                        + server.deflater.flush(zlib.Z_FINISH))
    result_of(d)
    assert transport.connected and not transport.disconnecting
    assert "dropping" not in caplog.text


def test_compressed_bytes_in_the_same_chunk_as_the_ok_are_inflated() -> None:
    server = Server()
    client, transport, _, events = compressed_client(server.say(b"* 3 EXISTS\r\n"))
    assert [(e.kind, e.number) for e in events] == [("EXISTS", 3)]
    assert client.compression is not None


def test_commands_after_the_switch_go_out_compressed() -> None:
    client, transport, server, _ = compressed_client()
    d = run(client.noop())
    wire = sent(transport)
    assert b"NOOP" not in wire
    assert server.hear(wire) == b"M2 NOOP\r\n"
    client.dataReceived(server.say(b"M2 OK done\r\n"))
    assert result_of(d) is None


def test_a_fetch_split_anywhere_in_the_deflate_stream_streams_the_body() -> None:
    client, transport, server, _ = compressed_client()
    sinks: list[MemorySink] = []
    got: list[Any] = []

    def open_sink() -> MemorySink:
        sinks.append(MemorySink())
        return sinks[-1]

    d = run(client.uid_fetch_bodies([7], open_sink, got.append))
    server.hear(sent(transport))
    body = b"Subject: x\r\n\r\n" + bytes(range(256)) * 300
    wire = server.say(fetch_response(1, 7, body) + b"M2 OK done\r\n")
    for i in range(0, len(wire), 7):
        client.dataReceived(wire[i : i + 7])
    result_of(d)
    assert [m.uid for m in got] == [7]
    assert bytes(sinks[0].data) == body


def test_corrupt_compressed_data_drops_the_connection() -> None:
    client, transport, _, _ = compressed_client()
    d = run(client.noop())
    client.dataReceived(b"\xff\xfe not deflate at all")
    assert transport.disconnecting or not transport.connected
    client.connectionLost(Failure(ConnectionLost("aborted")))
    with pytest.raises(ConnectionLost):
        result_of(d)


def test_refused_compress_leaves_the_connection_plain() -> None:
    client, transport, _ = connected()
    d = run(client.compress())
    sent(transport)
    client.dataReceived(b"M1 NO not now\r\n")
    with pytest.raises(CommandFailed):
        result_of(d)
    assert client.compression is None
    run(client.noop())
    assert sent(transport) == b"M2 NOOP\r\n"


def test_compress_waits_for_commands_in_flight_and_holds_the_next() -> None:
    client, transport, _ = connected()
    fetch = run(client.uid_search())
    d = run(client.compress())
    assert sent(transport) == b"M1 UID SEARCH ALL\r\n"
    client.dataReceived(b"* SEARCH 1\r\nM1 OK\r\n")
    assert result_of(fetch) == [1]
    assert sent(transport) == b"M2 COMPRESS DEFLATE\r\n"
    after = run(client.noop())
    assert sent(transport) == b""  # nothing goes out until we know which encoding
    server = Server()
    client.dataReceived(b"M2 OK go\r\n")
    result_of(d)
    assert server.hear(sent(transport)) == b"M3 NOOP\r\n"
    client.dataReceived(server.say(b"M3 OK\r\n"))
    result_of(after)


def _account(host: str, compress: str) -> Account:
    from pathlib import Path

    return Account(
        name="a", host=host, port=143, tls="starttls", ca_file=None, username="u",
        password=PasswordSource("a", inline="p"), maildir=Path("/m"), compress=compress,  # type: ignore[arg-type]
    )


# Only loopback addresses and names here (tests name no other address). The
# private and link-local cases are the stdlib's ``is_private`` /
# ``is_link_local``; what is ours is the shape handling (zone, IPv4-mapped
# IPv6, "localhost", a name that is no address) and which of host and peer
# decides.
@pytest.mark.parametrize(
    ("host", "peer", "mode", "wanted"),
    [
        ("imap.example.org", None, "auto", True),  # a name, no peer known: over the Internet
        ("imap.example.org", "127.0.0.1", "auto", False),  # the address connected to decides
        ("imap.example.org", "::1%lo", "auto", False),  # a zone is not part of the address
        ("imap.example.org", "::ffff:127.0.0.1", "auto", False),  # IPv4-mapped IPv6
        ("127.0.0.1", None, "auto", False),
        ("localhost", None, "auto", False),
        ("localhost.", None, "auto", False),
        ("::1", None, "auto", False),
        ("127.0.0.1", "127.0.0.1", "yes", True),
        ("imap.example.org", None, "no", False),
    ],
)
def test_compression_policy(host: str, peer: str | None, mode: str, wanted: bool) -> None:
    assert wants_compression(_account(host, mode), peer) is wanted
