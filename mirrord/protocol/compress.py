"""COMPRESS=DEFLATE (RFC 4978): both directions of a connection as raw deflate streams.

Why it is worth having: message bodies are text (and base64), which deflate
shrinks to a third or so; on a link slower than the server and the client, the
first sync of a large mailbox is bound by bytes on the wire, and compression
cuts its time nearly in proportion (mbsync gets 8.99 s instead of 12.77 s on
a 100 Mbit/s, 50 ms link for the issue's 2,000 messages). On loopback it only
costs CPU, so whether to ask for it is the account's ``compress`` setting.

This module only transforms bytes; where the switch happens in the stream
(right after the CRLF of the tagged OK, in the middle of whatever chunk the
OK arrived in) is the client's business (:meth:`MirrordIMAP4Client.compress`).

* Each write is compressed and flushed with ``Z_SYNC_FLUSH``, as the RFC
  requires: a command must reach the server whole, not sit in our deflater.
* Inflated output comes out in pieces of at most :data:`INFLATE_PIECE` bytes,
  so that a small compressed chunk that expands enormously (a hostile or
  broken server) never has to exist in memory at once; the response parser
  streams literals to disk piece by piece anyway.
* A deflate stream may end (a final block): Dovecot ends it after its BYE
  to LOGOUT, just before closing. Anything after the end is an error:
  RFC 4978 has compression last for the rest of the connection.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from mirrord.protocol._parser import ProtocolError

INFLATE_PIECE = 256 * 1024
"""Most plain bytes handed to the parser at once."""

_RAW_DEFLATE = -15
"""Negative window bits: raw deflate (no zlib header), 32 KiB window, as RFC 4978 says."""

_LEVEL = 6
"""What we send is commands of a few dozen bytes: the level hardly matters; zlib's default."""

_MEM_LEVEL = 5
"""A smaller deflater (about 50 KiB instead of 260) for the few bytes we send."""


class CompressionError(ProtocolError):
    """The server's compressed stream cannot be decoded: the connection is unusable."""


class DeflateStream:
    """The compression state of one connection, both ways."""

    def __init__(self) -> None:
        self._deflater = zlib.compressobj(_LEVEL, zlib.DEFLATED, _RAW_DEFLATE, _MEM_LEVEL)
        self._inflater = zlib.decompressobj(_RAW_DEFLATE)
        self.bytes_in = 0
        """Compressed bytes received: with :attr:`plain_in`, the ratio the link saw."""
        self.plain_in = 0
        self.bytes_out = 0
        self.plain_out = 0

    def compress(self, data: bytes) -> bytes:
        """``data`` compressed and flushed: everything needed to decode it goes out now."""
        out = self._deflater.compress(data) + self._deflater.flush(zlib.Z_SYNC_FLUSH)
        self.plain_out += len(data)
        self.bytes_out += len(out)
        return out

    def decompress(self, data: bytes) -> Iterator[bytes]:
        """The plain bytes ``data`` completes, in order, in pieces of at most INFLATE_PIECE.

        A partial deflate block is fine: what it cannot yet decode stays in
        the inflater until the next chunk completes it.
        """
        self.bytes_in += len(data)
        if self._inflater.eof:
            if data:
                raise CompressionError("the server sent data after ending its compressed stream")
            return
        pending = data
        while True:
            try:
                out = self._inflater.decompress(pending, INFLATE_PIECE)
            except zlib.error as e:
                raise CompressionError(f"cannot decompress what the server sent: {e}") from None
            if out:
                self.plain_in += len(out)
                yield out
            if self._inflater.eof:
                if self._inflater.unused_data:
                    raise CompressionError("the server sent data after ending its compressed stream")
                return
            pending = self._inflater.unconsumed_tail
            # A full piece may leave output inside the inflater even with no
            # input left: ask again until it comes up short.
            if not pending and len(out) < INFLATE_PIECE:
                return

    @property
    def ratio(self) -> float | None:
        """Plain bytes per compressed byte received so far (None before any)."""
        return self.plain_in / self.bytes_in if self.bytes_in else None


__all__ = ["CompressionError", "DeflateStream", "INFLATE_PIECE"]
