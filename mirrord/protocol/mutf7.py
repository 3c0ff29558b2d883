"""Mailbox names on the wire (modified UTF-7, RFC 3501 5.1.3) and on disk (UTF-8).

Twisted ships the codec (registered as ``imap4-utf-7`` when
``twisted.mail.imap4`` is imported); this module only adds the policy for
names that are not valid modified UTF-7: keep them readable rather than fail
the whole account over one odd folder.
"""

from __future__ import annotations

import twisted.mail.imap4  # noqa: F401 - registers the imap4-utf-7 codec


def decode_mailbox_name(raw: bytes) -> str:
    """The Unicode name for a server's mailbox name.

    A name that is not valid modified UTF-7 (some servers send raw UTF-8) is
    taken as UTF-8, with undecodable bytes escaped.
    """
    try:
        return raw.decode("imap4-utf-7")
    except (UnicodeDecodeError, ValueError):
        return raw.decode("utf-8", "backslashreplace")


def encode_mailbox_name(name: str) -> bytes:
    return name.encode("imap4-utf-7")
