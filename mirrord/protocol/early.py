"""A connection begun before the imports: the server greets while Python loads Twisted.

A ``run --once`` catch-up spends most of its life importing (Twisted, its
TLS stack, ours: ~200 ms) and then waits several milliseconds for the
server's greeting (Dovecot starts a login process for each connection).
Opening the first connection of each account right after the config is
read, before those imports, puts that wait inside them: by the time the
reactor runs, the greeting is in the socket. The socket is then handed to
Twisted (:func:`mirrord.protocol.connect.open_session`, ``early=``), and
the session is set up exactly as on any other connection (TLS, STARTTLS,
login; the certificate is checked against the configured name); only the
TCP connect came first.

An IP address connects with a non-blocking ``connect`` that costs nothing
to start. A host name needs a DNS lookup, which may block: a thread of its
own looks it up and connects (each address in the resolver's order, as a
plain client would), and the imports run meanwhile. If that thread has not
finished when the first worker wants its connection, the worker does not
wait for it: it connects the ordinary way, and the thread's socket, should
it still come, is closed. Anything unusual (a failed lookup, a refused or
failed connect) is left to the ordinary path, which reports it as it
always did.

This module imports no Twisted: it runs before Twisted is loaded.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
from collections.abc import Callable
from typing import Any

NAME_CONNECT_TIMEOUT = 5.0
"""Seconds each address of a host name gets to accept the early connect.

Only the early attempt waits this long, in its own thread; the worker
that wants the connection before then connects the ordinary way."""

Resolver = Callable[..., list[tuple[Any, ...]]]


class EarlyConnection:
    """A TCP connect to an account's server, begun at start-up."""

    def __init__(self, sock: socket.socket | None, host: str, port: int) -> None:
        self._sock: socket.socket | None = sock
        self._taken = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.host = host
        self.port = port

    @classmethod
    def begin(cls, host: str, port: int, *, resolve: Resolver = socket.getaddrinfo) -> EarlyConnection | None:
        """Start connecting to ``host`` now; None if that cannot even start.

        ``resolve``: ``socket.getaddrinfo``, replaced in tests.
        """
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return cls._begin_name(host, port, resolve)
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

    @classmethod
    def _begin_name(cls, host: str, port: int, resolve: Resolver) -> EarlyConnection | None:
        connection = cls(None, host, port)
        thread = threading.Thread(
            target=connection._look_up_and_connect, args=(resolve,), name=f"early connect to {host}", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: the ordinary path will do
            return None
        connection._thread = thread
        return connection

    def _look_up_and_connect(self, resolve: Resolver) -> None:
        """In the thread: the first address of the name that accepts, handed over if still wanted."""
        try:
            addresses = resolve(self.host, self.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return
        for family, kind, proto, _, address in addresses:
            if self._taken:
                return
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue
            try:
                sock.settimeout(NAME_CONNECT_TIMEOUT)
                sock.connect(address)
                sock.setblocking(False)
            except OSError:
                sock.close()
                continue
            with self._lock:
                if not self._taken:
                    self._sock = sock
                    return
            sock.close()  # the worker went the ordinary way meanwhile
            return

    def wait(self, timeout: float) -> bool:
        """For tests: wait for a host name's thread; True once it has finished."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def take(self) -> socket.socket | None:
        """The socket, once (the first worker's connection); None after that,
        and None if a host name's connect has not finished yet."""
        with self._lock:
            self._taken = True
            sock, self._sock = self._sock, None
        return sock

    def close(self) -> None:
        """Close the socket if nobody took it (the run ended early, or the account failed)."""
        sock = self.take()
        if sock is not None:
            sock.close()


def begin_all(accounts: object) -> dict[str, EarlyConnection]:
    """One early connection per account of ``accounts``."""
    early: dict[str, EarlyConnection] = {}
    for account in accounts:  # type: ignore[attr-defined]
        connection = EarlyConnection.begin(account.host, account.port)
        if connection is not None:
            early[account.name] = connection
    return early


def close_all(early: dict[str, EarlyConnection]) -> None:
    for connection in early.values():
        connection.close()
