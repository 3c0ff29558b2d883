"""What mirrord reads in a message's header: its Message-ID.

Used by the store (as a fetched body streams by), by the re-matching after a
UIDVALIDITY change and by two-way sync (a moved or renamed file is known by
Message-ID and size). No other module of mirrord parses mail.
"""

from __future__ import annotations

__all__ = ["message_id"]


def message_id(headers: bytes) -> str | None:
    """The Message-ID in a message's header block (CRLF or LF), unfolded; None if absent."""
    lines = headers.replace(b"\r\n", b"\n").split(b"\n")
    for i, line in enumerate(lines):
        if not line:
            break
        if line[:11].lower() == b"message-id:":
            value = line[11:]
            for more in lines[i + 1 :]:
                if more[:1] in (b" ", b"\t"):
                    value += more
                else:
                    break
            text = value.decode("utf-8", "replace").strip()
            return " ".join(text.split()) or None
    return None
