"""Errors the protocol layer raises, in one place so callers can tell them apart.

Each message is meant for a person reading the log: it names what failed and
why, and never contains a secret.
"""

from __future__ import annotations

import re

from twisted.internet import error as _net
from twisted.python.failure import Failure

from mirrord.protocol._parser import ProtocolError

__all__ = [
    "CommandFailed",
    "ConnectFailed",
    "LoginFailed",
    "MissingCapability",
    "OAuthRefused",
    "ProtocolError",
    "TooManyConnections",
    "TLSFailed",
    "TokenUnavailable",
    "describe_failure",
    "quote_server_text",
]

#: Twisted's fixed prefixes, which say nothing a reader of our log needs.
_BOILERPLATE = (
    "Connection to the other side was lost in a non-clean fashion",
    "Connection was closed cleanly",
    "An error occurred while connecting",
)

#: What to say when Twisted's error carries no reason of ours.
_PLAIN = (
    (_net.ConnectionDone, "the server closed the connection"),
    (_net.ConnectionLost, "the connection was lost"),
    (_net.ConnectionRefusedError, "the connection was refused"),
    (_net.TimeoutError, "the connection timed out"),
)


def quote_server_text(text: str) -> str:
    """The server's own words (a BYE or NO text), quoted so that its punctuation stays its own."""
    text = " ".join(text.split())
    return f'"{text}"' if text else "(no text)"


def describe_failure(problem: BaseException | Failure) -> str:
    """One clean clause for a log line about a lost or failed connection.

    Twisted's messages glue a fixed prefix to whatever reason was given, so a
    BYE came out as ``...lost in a non-clean fashion: server closed the
    session: Server shutting down..)``. This drops the prefix, keeps the
    reason (the server's words stay quoted, see :func:`quote_server_text`),
    and leaves no trailing full stop, since callers embed it in a sentence.
    """
    error = problem.value if isinstance(problem, Failure) else problem
    parts: list[str] = []
    for arg in getattr(error, "args", ()):
        if isinstance(arg, BaseException):
            parts.append(describe_failure(arg))
        elif isinstance(arg, str) and arg.strip():
            parts.append(arg.strip())
    os_error = getattr(error, "osError", None)
    if isinstance(os_error, (str, BaseException)) and str(os_error).strip():
        parts.insert(0, str(os_error).strip())
    text = ": ".join(parts)
    if isinstance(error, _net.ConnectError) or isinstance(error, (_net.ConnectionLost, _net.ConnectionDone)):
        # Twisted's own str() adds its class docstring; the args are the reason.
        for prefix in _BOILERPLATE:
            if text.startswith(prefix):
                text = text[len(prefix) :].lstrip(" :.")
        if not text:
            for kind, plain in _PLAIN:
                if isinstance(error, kind):
                    return plain
            return "the connection failed"
    elif not text:
        text = str(error).strip() or type(error).__name__
    text = " ".join(text.split())
    while text.endswith(".") and not text.endswith('."'):
        text = text[:-1].rstrip()
    return text.replace("..", ".")



class CommandFailed(Exception):
    """The server answered one of our commands with NO or BAD."""

    def __init__(self, command: str, status: str, text: str, code: str | None = None) -> None:
        super().__init__(f"{command} failed: {status} {text}".rstrip())
        self.command = command
        self.status = status
        self.text = text
        self.code = code
        """The response code's name (``LIMIT``, ``UNAVAILABLE``...), if the server gave one."""


class OAuthRefused(CommandFailed):
    """The server refused an OAuth2 token; ``error`` is its decoded error challenge, if it sent one."""

    def __init__(self, command: str, status: str, text: str, error: str | None) -> None:
        super().__init__(command, status, text)
        self.error = error


class ConnectFailed(Exception):
    """No IMAP session could be set up (refused, unreachable, timed out, closed early)."""


class TLSFailed(ConnectFailed):
    """The TLS handshake failed, most often because the certificate was not trusted.

    Never followed by a fallback to plaintext.
    """


class LoginFailed(ConnectFailed):
    """The server refused our credentials."""


class TokenUnavailable(LoginFailed):
    """The account's token command failed, so there was no OAuth2 token to log in with.

    A :class:`LoginFailed`, so that it is retried as rarely as a refused
    login: a command that fails (no network to the provider, a refresh token
    revoked) is not fixed by running it every few seconds either.
    """


class TooManyConnections(ConnectFailed):
    """The server refused one more connection: the account has as many as it allows.

    Not a wrong password (retrying soon would not help, and neither would
    waiting long), and not a network fault: the answer is to use fewer
    connections (see :mod:`mirrord.budget`).
    """


_TOO_MANY = re.compile(
    r"(too many|maximum number of|max(imum)?[ _-]?(userip[ _-]?)?conn|connection limit|"
    r"limit of .*connections|connections? (limit|exceeded))",
    re.IGNORECASE,
)


def says_too_many_connections(text: str, code: str | None = None) -> bool:
    """Whether a server's NO or BYE means "you have too many connections".

    Dovecot: ``NO [LIMIT] Maximum number of connections from user+IP
    exceeded (mail_max_userip_connections=10)``; Gmail: ``Too many
    simultaneous connections``; Cyrus and others: ``* BYE Too many open
    connections``. ``[LIMIT]`` (RFC 5530) alone is not enough: it also means
    a message too big or a quota, so the words must say connections too.
    """
    if _TOO_MANY.search(text) is None:
        return False
    return "connection" in text.lower() or code == "LIMIT"


class MissingCapability(ConnectFailed):
    """The server lacks something we cannot do without (e.g. STARTTLS when asked for)."""
