"""Opening a logged-in IMAP session: TCP, TLS with verification, greeting, login.

Twisted's IMAP4Client, left to itself, upgrades with an unverified STARTTLS
context and no SNI. Here every TLS path (implicit on 993, STARTTLS on 143)
uses ``optionsForClientTLS`` with the configured trust root, so a certificate
that does not match the host or is not trusted ends the attempt with a
:class:`TLSFailed` that says so; there is no fallback to plaintext.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import re
import select
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from twisted.internet import defer, threads
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import (
    ConnectError,
    ConnectionLost,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from mirrord.protocol import sasl
from mirrord.protocol.client import MirrordIMAP4Client
from mirrord.protocol.errors import (
    CommandFailed,
    ConnectFailed,
    LoginFailed,
    MissingCapability,
    OAuthRefused,
    TLSFailed,
    TokenUnavailable,
    TooManyConnections,
    says_too_many_connections,
)

log = logging.getLogger("mirrord.protocol")

CONNECT_TIMEOUT = 30.0

GREETING_TIMEOUT = 10.0
"""Seconds from connecting to the server's greeting (for ``implicit``: the TLS
handshake and the greeting). A server greets at once; one that says nothing
for this long is most often a TLS port spoken to in plaintext (``starttls``
or ``none`` on 993), where both sides wait for the other for ever. Waiting
the two-minute command deadline for that, three times, cost a newcomer six
minutes and a misleading "closed the connection" (issue 16)."""

TLS_PORTS = frozenset({993})
PLAIN_PORTS = frozenset({143})


class ServerSettings(Protocol):
    """What connecting needs from an account (``mirrord.config.Account`` has it)."""

    name: str
    host: str
    port: int
    tls: Literal["implicit", "starttls", "none"]
    ca_file: Path | None
    username: str
    compress: Literal["auto", "yes", "no"]
    # Also read, with defaults, so that simple stand-ins need not have them:
    # ``auth`` ("password" or an OAuth2 mode) and ``password`` (an object whose
    # ``resolve()`` runs the token command of an OAuth2 account).


TokenFetcher = Callable[[], Awaitable[str]]
"""Runs an OAuth2 account's token command and returns its token (or raises)."""


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def load_ca_bundle(path: Path) -> list[Any]:
    """Every certificate in a PEM file: a bundle trusts all of its CAs, not the first.

    (``Certificate.loadPEM`` reads only the first one, so a bundle with an
    unrelated CA first failed as "not trusted".)
    """
    from twisted.internet import ssl

    blocks = _PEM_CERTIFICATE.findall(path.read_bytes())
    if not blocks:
        raise ValueError(f"{path} holds no PEM certificate")
    return [ssl.Certificate.loadPEM(block) for block in blocks]


def tls_options(host: str, ca_file: Path | None) -> Any:
    """Client TLS options that verify ``host`` against ``ca_file`` or the system store.

    The TLS stack (pyOpenSSL, cryptography) is imported here, when an
    account first needs it: a run whose accounts all use ``tls: none`` never
    loads it (see ``mirrord.cli.without_tls``).
    """
    from twisted.internet import ssl

    if ca_file is not None:
        trust: Any = ssl.trustRootFromCertificates(load_ca_bundle(Path(ca_file)))
    else:
        trust = ssl.platformTrust()
    return ssl.optionsForClientTLS(host, trustRoot=trust)


def _tls_reason(failure: Failure) -> str | None:
    """A person's explanation of a TLS failure, or None if it was not TLS."""
    error = failure.value
    SSL = sys.modules.get("OpenSSL.SSL")  # not loaded: the error cannot be one of its
    if SSL is not None and isinstance(error, SSL.Error):
        text = str(error)
        if "certificate verify failed" in text:
            return "the server's certificate is not trusted (set ca_file to the CA that signed it)"
        if "wrong version number" in text or "record layer failure" in text or "packet length too long" in text:
            # What OpenSSL says when the other side answers a ClientHello
            # with plaintext: an IMAP greeting, "* OK ...".
            return ("the server answered in plaintext, not TLS: this port may expect plain IMAP "
                    "and STARTTLS (usually 143); try `tls: starttls`, or port 993 with `tls: implicit`")
        return f"TLS handshake failed: {text}"
    name = type(error).__name__
    if name in ("VerificationError", "CertificateError"):
        return f"the server's certificate does not match the host name: {error}"
    return None


def _is_local(address: str) -> bool:
    """Loopback, or a private or link-local network: a LAN, not the Internet."""
    if address.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_private or ip.is_link_local


def wants_compression(account: ServerSettings, peer: str | None = None) -> bool:
    """Whether to ask for COMPRESS=DEFLATE, by the account's ``compress`` setting.

    ``auto`` asks for it when the server is reached over the Internet, and not
    over loopback or a private network (``peer``, the address connected to,
    or else the configured host if it is an address). Measured with
    tests/bench/bench_link.py, 142 MB against Dovecot: on a 100 Mbit/s, 50 ms
    link compression took the first sync from 12.3 s to 8.3 s; at 1 Gbit/s
    (1 ms) from 2.3 s to 5.0 s, and on loopback from 3.0 s to 5.4 s, because
    then the server's compressor, not the link, sets the pace.
    """
    mode = getattr(account, "compress", "no")
    if mode == "yes":
        return True
    if mode != "auto":
        return False
    return not _is_local(peer if peer is not None else account.host)


async def open_session(
    reactor: Any,
    account: ServerSettings,
    password: str,
    *,
    label: str,
    clock: IReactorTime | None = None,
    bulk: bool = False,
    early: socket.socket | None = None,
    then: Callable[[MirrordIMAP4Client], None] | None = None,
) -> MirrordIMAP4Client:
    """Connect, secure, greet and log in; the result is ready for commands.

    ``early``: a socket already connecting (or connected) to the server
    (:mod:`mirrord.protocol.early`), taken instead of a new connection; if
    its connect failed, a new connection is made as usual.

    ``then``: starts the caller's first commands (by calling their
    coroutines, e.g. NAMESPACE and LIST) so that they go out with ENABLE, in
    the same round trip, once the login succeeded; it is called only then,
    and at most once. The caller awaits their results itself, and must
    consume their errors if this raises (they fail with the connection).

    ``bulk``: the connection will carry message bodies (a worker), so it is
    compressed when the account asks for it and the server offers
    COMPRESS=DEFLATE. Watchers, which carry a few lines an hour, are not:
    compression state costs memory per connection and saves them nothing.

    Errors come out as :class:`ConnectFailed` subclasses with a message that
    names the account and the server, never the password.
    """
    where = f"{account.host}:{account.port}"
    options = tls_options(account.host, account.ca_file) if account.tls != "none" else None
    endpoint: Any = tcp_endpoint(reactor, account.host, account.port)
    if account.tls == "implicit":
        endpoint = wrapClientTLS(options, endpoint)

    def build() -> MirrordIMAP4Client:
        return MirrordIMAP4Client(label=label, clock=clock or reactor)

    client: MirrordIMAP4Client | None = None
    if early is not None:
        client = await _adopt(reactor, early, build, options if account.tls == "implicit" else None, label)
    if client is None:
        try:
            client = await endpoint.connect(Factory.forProtocol(build))
        except (ConnectError, DNSLookupError, TimeoutError) as e:
            raise ConnectFailed(f"cannot connect to {where}: {e}") from None

    try:
        await _greeting(client, clock or reactor, account, where)
        if account.tls == "starttls":
            if "STARTTLS" not in client.capabilities:
                await client.capability()
            if "STARTTLS" not in client.capabilities:
                raise MissingCapability(
                    f"{where} does not offer STARTTLS; refusing to log in without TLS"
                )
            await client.starttls(options)
        await log_in(client, account, password, where)
        compress = bulk and wants_compression(account, _peer_address(client))
        if compress and "COMPRESS=DEFLATE" not in client.capabilities:
            log.debug("%s: %s does not offer COMPRESS=DEFLATE", label, where)
            compress = False
        # ENABLE, the caller's first commands and COMPRESS in one round trip.
        # A server runs pipelined commands in order (RFC 3501 5.5), so
        # ENABLE is in force for all that follows (RFC 5161); the caller's
        # commands must not depend on its outcome (NAMESPACE and LIST do
        # not; an EXAMINE with QRESYNC would). COMPRESS may follow other
        # commands, only nothing may follow it before its OK (RFC 4978).
        with client.pipeline():
            enabled = defer.Deferred.fromCoroutine(enable_resync(client))
            if then is not None:
                then(client)
            compressed = defer.Deferred.fromCoroutine(client.compress()) if compress else defer.succeed(None)
        try:
            await compressed
        except CommandFailed as e:
            # Not worth failing the session over: go on uncompressed.
            log.info("%s: %s refused COMPRESS DEFLATE (%s); going on without", label, where, e)
        finally:
            await enabled
    except ConnectionLost as e:
        _abort(client)
        if says_too_many_connections(str(e)):
            # A BYE before or after the login ("* BYE Too many connections").
            raise TooManyConnections(f"{where} refused one more connection: {e}") from None
        raise ConnectFailed(f"{where} closed the connection during setup: {e}") from None
    except ConnectFailed:
        _abort(client)
        raise
    except Exception as e:
        _abort(client)
        if says_too_many_connections(str(e)):
            # A greeting of BYE (the reader raises on it, naming the server's words).
            raise TooManyConnections(f"{where} refused one more connection: {e}") from None
        reason = _tls_reason(Failure(e))
        if reason is not None:
            raise TLSFailed(f"TLS with {where} failed: {reason}") from None
        raise ConnectFailed(f"{where}: session setup failed: {e}") from None
    log.debug(
        "%s: logged in to %s with %s; capabilities: %s",
        label, where, client.auth_mechanism, " ".join(sorted(client.capabilities)),
    )
    return client


class _Writable:
    """Fires ``done`` when a connecting socket becomes writable (its connect ended)."""

    def __init__(self, reactor: Any, sock: socket.socket, done: defer.Deferred[None]) -> None:
        self._reactor = reactor
        self._sock = sock
        self.done = done

    def fileno(self) -> int:
        return self._sock.fileno()

    def logPrefix(self) -> str:
        return "early connection"

    def doWrite(self) -> None:
        self._finish()

    def connectionLost(self, reason: Failure) -> None:
        self._finish()

    def _finish(self) -> None:
        self._reactor.removeWriter(self)
        if not self.done.called:
            self.done.callback(None)


async def _adopt(
    reactor: Any,
    sock: socket.socket,
    build: Callable[[], MirrordIMAP4Client],
    tls: Any,
    label: str,
) -> MirrordIMAP4Client | None:
    """The client on ``sock`` (see ``open_session``'s ``early``), or None if its connect failed.

    A connect still under way is waited for (at most :data:`CONNECT_TIMEOUT`);
    one that failed is dropped quietly: the caller connects anew, and it is
    that attempt whose failure, if any, is reported. ``tls``: the client TLS
    options for ``implicit`` TLS, put between the socket and the client.
    """
    try:
        if not select.select([], [sock], [], 0)[1]:
            writable: defer.Deferred[None] = defer.Deferred()
            watcher = _Writable(reactor, sock, writable)
            timer = reactor.callLater(CONNECT_TIMEOUT, watcher._finish)
            reactor.addWriter(watcher)
            try:
                await writable
            finally:
                if timer.active():
                    timer.cancel()
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            log.debug("%s: the connection begun early failed (%s); connecting anew", label, os.strerror(code))
            return None
        sock.getpeername()  # not connected yet (timed out): OSError
        built: list[MirrordIMAP4Client] = []

        def keep() -> MirrordIMAP4Client:
            client = build()
            client.adopted = True
            built.append(client)
            return client

        factory: Any = Factory.forProtocol(keep)
        if tls is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(tls, True, factory)
        # Twisted takes a duplicate of the descriptor; ours is closed below.
        reactor.adoptStreamConnection(sock.fileno(), sock.family, factory)
        if built:
            log.debug("%s: on the connection begun at start-up", label)
        return built[0] if built else None
    except (OSError, ValueError) as e:  # ValueError: select() and a descriptor above its limit
        log.debug("%s: the connection begun early is unusable (%s); connecting anew", label, e)
        return None
    finally:
        sock.close()


def tcp_endpoint(reactor: Any, host: str, port: int) -> Any:
    """Where to connect: an IP address straight, a host name through the resolver.

    ``HostnameEndpoint`` resolves even an IP address with ``getaddrinfo`` in
    the reactor's thread pool, whose start (a thread) and stop at exit (a
    join) cost a ``run --once`` catch-up a few milliseconds out of some
    thirty. An address needs no resolving, nor the racing of several
    addresses that ``HostnameEndpoint`` does for a name.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None or "%" in host:  # a name, or a scoped IPv6 address (getaddrinfo knows the scope)
        return HostnameEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
    if isinstance(ip, ipaddress.IPv6Address):
        return TCP6ClientEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
    return TCP4ClientEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)


def uses_oauth(account: ServerSettings) -> bool:
    return getattr(account, "auth", "password") != "password"


async def log_in(
    client: MirrordIMAP4Client,
    account: ServerSettings,
    password: str,
    where: str,
    fetch_token: TokenFetcher | None = None,
) -> None:
    """Log in with the password, or with a fresh OAuth2 token (``password`` unused then).

    An OAuth2 account runs its token command now, for this connection: a
    token lives about an hour, so one fetched for an earlier connection may
    be stale, and none is kept (on disk or here) once the login is done.
    When the server refuses the token, the command is run once more and the
    login tried again on the same connection before the refusal counts: the
    token may have expired between the command and the login, and the
    command's next run refreshes it. An unchanged token is not offered again
    (it would only add a failed login at the server). A failing command is a
    :class:`TokenUnavailable`, retried as rarely as a refused login.
    """
    if not uses_oauth(account):
        try:
            await client.login(account.username, password)
        except CommandFailed as e:
            if says_too_many_connections(e.text, e.code):
                raise TooManyConnections(f"{where} refused one more connection: {e.text}") from None
            raise LoginFailed(
                f"{where} refused the login of {account.username!r}: {e.text or e.status}"
            ) from None
        return
    if fetch_token is None:
        fetch_token = functools.partial(_run_token_command, account)
    try:
        mechanism = sasl.choose_mechanism(client.capabilities, getattr(account, "auth", "oauth2"))
    except sasl.NoOAuthMechanism as e:
        raise MissingCapability(f"{where} cannot take an OAuth2 token: {e}") from None
    token = await fetch_token()
    try:
        await client.authenticate_oauth(mechanism, account.username, token, account.host, account.port)
        return
    except OAuthRefused as e:
        first = e
    log.info(
        "%s: %s refused the OAuth2 token of %r (%s%s); running the token command again for a fresh one",
        client.label, where, account.username, mechanism, _said(first),
    )
    fresh = await fetch_token()
    if fresh == token:
        raise LoginFailed(
            f"{where} refused the login of {account.username!r} with {mechanism}: "
            f"{first.text or first.status}{_said(first)}; the token command gave the same token again"
        )
    del token
    try:
        await client.authenticate_oauth(mechanism, account.username, fresh, account.host, account.port)
    except OAuthRefused as e:
        raise LoginFailed(
            f"{where} refused the login of {account.username!r} with {mechanism}, also with a fresh "
            f"token: {e.text or e.status}{_said(e)}"
        ) from None


def _said(refusal: OAuthRefused) -> str:
    """The server's decoded error challenge, as a clause for a log line."""
    return f"; server said {refusal.error}" if refusal.error else ""


async def _run_token_command(account: ServerSettings) -> str:
    source = account.password  # type: ignore[attr-defined]  # see ServerSettings
    try:
        # A token command may open a browser or wait on a lock: keep it off the reactor.
        token: str = await threads.deferToThread(source.resolve)
    except Exception as e:  # noqa: BLE001 - PasswordError: its message names the account and the command, no secret
        raise TokenUnavailable(f"no OAuth2 token: {e}") from None
    return token


async def _greeting(client: MirrordIMAP4Client, clock: IReactorTime, account: ServerSettings, where: str) -> None:
    """Wait for the server's greeting, at most :data:`GREETING_TIMEOUT` seconds.

    A silent server is dropped with a message that says what most likely
    went wrong and which setting to try, rather than the command deadline's
    generic "no response" two minutes later.
    """
    timed_out = False

    def give_up() -> None:
        nonlocal timed_out
        timed_out = True
        _abort(client)

    timer = clock.callLater(GREETING_TIMEOUT, give_up)
    try:
        await client.greeting
    except Exception:
        if not timed_out:
            raise
    finally:
        if timer.active():
            timer.cancel()
    if not timed_out:
        return
    said = f"no IMAP greeting from {where} within {GREETING_TIMEOUT:g} s"
    if account.tls != "implicit":
        likely = " (it is the usual IMAPS port)" if account.port in TLS_PORTS else ""
        raise TLSFailed(f"{said}: this port may expect TLS from the start{likely}; try `tls: implicit`")
    if account.port in PLAIN_PORTS:
        raise TLSFailed(f"{said}: this port may expect plain IMAP and STARTTLS; try `tls: starttls`")
    raise ConnectFailed(f"{said}: is it an IMAP server?")


async def enable_resync(client: MirrordIMAP4Client) -> None:
    """Turn on QRESYNC (or CONDSTORE alone) where offered, for cheap catch-ups.

    With QRESYNC an EXAMINE can ask "what changed since modseq M" and gets
    VANISHED (EARLIER) plus the changed flags; the session then also reports
    expunges as VANISHED rather than EXPUNGE, which the watcher handles.
    CONDSTORE alone gives CHANGEDSINCE for flags. A server refusing ENABLE
    is not an error: the session just stays without them, and syncs use the
    full listing.
    """
    caps = client.capabilities
    if "QRESYNC" in caps:
        wanted = "QRESYNC"
    elif "CONDSTORE" in caps and "ENABLE" in caps:
        wanted = "CONDSTORE"
    else:
        return
    try:
        await client.enable(wanted)
    except CommandFailed as e:
        log.info("%s: server refused ENABLE %s (%s); catch-ups use full listings", client.label, wanted, e.text)


def _peer_address(client: MirrordIMAP4Client) -> str | None:
    try:
        return str(client.transport.getPeer().host)
    except Exception:  # noqa: BLE001 - not an IP transport: decide by the host name
        return None


def _abort(client: MirrordIMAP4Client) -> None:
    if client.transport is not None and not client.connected_transport_lost:
        client.transport.abortConnection()


__all__ = ["ServerSettings", "defer", "open_session", "tls_options"]
