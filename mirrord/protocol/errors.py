"""Errors the protocol layer raises, in one place so callers can tell them apart.

Each message is meant for a person reading the log: it names what failed and
why, and never contains a secret.
"""

from __future__ import annotations

from mirrord.protocol._parser import ProtocolError

__all__ = [
    "CommandFailed",
    "ConnectFailed",
    "LoginFailed",
    "MissingCapability",
    "ProtocolError",
    "TLSFailed",
]


class CommandFailed(Exception):
    """The server answered one of our commands with NO or BAD."""

    def __init__(self, command: str, status: str, text: str) -> None:
        super().__init__(f"{command} failed: {status} {text}".rstrip())
        self.command = command
        self.status = status
        self.text = text


class ConnectFailed(Exception):
    """No IMAP session could be set up (refused, unreachable, timed out, closed early)."""


class TLSFailed(ConnectFailed):
    """The TLS handshake failed, most often because the certificate was not trusted.

    Never followed by a fallback to plaintext.
    """


class LoginFailed(ConnectFailed):
    """The server refused our credentials."""


class MissingCapability(ConnectFailed):
    """The server lacks something we cannot do without (e.g. STARTTLS when asked for)."""
