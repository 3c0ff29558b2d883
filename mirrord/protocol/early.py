"""A connection begun before the imports: the server greets while Python loads Twisted.

A ``run --once`` catch-up spends most of its life importing (Twisted, its
TLS stack, ours: ~200 ms) and then waits several milliseconds for the
server's greeting (Dovecot starts a login process for each connection).
Opening the first connection of each account right after the config is
read, before those imports, puts that wait inside them: by the time the
reactor runs, the greeting is in the socket. The socket is then handed to
Twisted (:func:`mirrord.protocol.connect.open_session`, ``early=``), and
the session is set up exactly as on any other connection (TLS, STARTTLS,
login); only the TCP connect came first.

Only for an IP address: a host name would need a DNS lookup here, which
may block, and ``HostnameEndpoint`` tries every address the name has; an
address connects with a non-blocking ``connect`` that costs nothing to
start. Anything unusual (a refused or failed connect) is left to the
ordinary path, which reports it as it always did.

This module imports no Twisted: it runs before Twisted is loaded.
"""

from __future__ import annotations

import errno
import ipaddress
import socket


class EarlyConnection:
    """A non-blocking TCP connect to an account's server, begun at start-up."""

    def __init__(self, sock: socket.socket, host: str, port: int) -> None:
        self._sock: socket.socket | None = sock
        self.host = host
        self.port = port

    @classmethod
    def begin(cls, host: str, port: int) -> EarlyConnection | None:
        """Start connecting to ``host`` (an IP address) now; None if it is a name or fails at once."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        if "%" in host:  # a scoped IPv6 address: the ordinary path resolves its scope
            return None
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            return None
        try:
            sock.setblocking(False)
            code = sock.connect_ex((host, port))
        except OSError:
            sock.close()
            return None
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            return None
        return cls(sock, host, port)

    def take(self) -> socket.socket | None:
        """The socket, once (the first worker's connection); None after that."""
        sock, self._sock = self._sock, None
        return sock

    def close(self) -> None:
        """Close the socket if nobody took it (the run ended early, or the account failed)."""
        sock = self.take()
        if sock is not None:
            sock.close()


def begin_all(accounts: object) -> dict[str, EarlyConnection]:
    """One early connection per account of ``accounts`` whose server is an IP address."""
    early: dict[str, EarlyConnection] = {}
    for account in accounts:  # type: ignore[attr-defined]
        connection = EarlyConnection.begin(account.host, account.port)
        if connection is not None:
            early[account.name] = connection
    return early


def close_all(early: dict[str, EarlyConnection]) -> None:
    for connection in early.values():
        connection.close()
