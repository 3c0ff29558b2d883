"""NOTIFY (RFC 5465): one connection that hears of changes in every mailbox without a watcher.

Where the server offers NOTIFY (Dovecot does), one more long-lived
connection asks for ``MessageNew MessageExpunge FlagChange`` on the
personal namespace, plus ``MailboxName`` and ``SubscriptionChange``. The
server then reports, on that one connection:

- ``* STATUS name (MESSAGES .. UIDNEXT .. HIGHESTMODSEQ ..)`` when mail
  arrives in, leaves or changes flags in a mailbox that is not selected
  (none is, here). Each goes to :meth:`StatusPoller.changed`, which syncs
  that mailbox when its figures moved, as its poll round would, only
  without waiting for the round. Events for mailboxes with a watcher of
  their own are ignored (the watcher has said it already).
- ``* LIST ...`` when a mailbox is created, renamed or deleted (Dovecot
  reports a deletion as ``\\NonExistent``, and a rename as nothing at all
  on 2.3): any of these has the daemon list the mailboxes again at once,
  which sets aside what went and re-matches renamed copies.

It never fetches and never selects: like a watcher, it only listens. The
poller keeps its (slow) rounds as the safety net, and after every
(re)connect a round and a re-listing run at once, since events sent while
the connection was down are lost. A server that refuses NOTIFY SET, or a
refusal as one too many connections, ends it: the poller alone remains.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from mirrord.protocol._parser import ProtocolError, Untagged
from mirrord.protocol.client import MirrordIMAP4Client, status_figures
from mirrord.protocol.errors import CommandFailed, ConnectFailed, LoginFailed, TooManyConnections, describe_failure
from mirrord.timers import coalesced_delay
from mirrord.watcher import Backoff

log = logging.getLogger("mirrord.notify")

EVENTS = b"(personal (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange))"
STABLE_AFTER = 60.0
"""A session that lasted this long resets the reconnect backoff."""


class NotifyService:
    """Keeps one NOTIFY connection for an account; see the module docstring."""

    def __init__(
        self,
        *,
        connect: Callable[[str], Awaitable[MirrordIMAP4Client]],
        clock: IReactorTime,
        label: str,
        keepalive: float,
        on_status: Callable[[bytes, dict[str, int]], None],
        on_names: Callable[[], None],
        on_connected: Callable[[], None],
        on_gone: Callable[[str], None],
    ) -> None:
        self._connect = connect
        self.clock = clock
        self.label = label
        self.keepalive = keepalive
        """Seconds between NOOPs, so that neither the server nor a NAT box drops a quiet connection."""
        self.on_status = on_status
        self.on_names = on_names
        self.on_connected = on_connected
        """After each (re)connect: events from while it was down are lost, so look now."""
        self.on_gone = on_gone
        """NOTIFY is given up for good (refused): the reason."""
        self.backoff = Backoff()
        self.state = "stopped"
        self.events = 0
        self._running = False
        self._client: MirrordIMAP4Client | None = None
        self._loop: defer.Deferred[None] | None = None
        self._sleep: defer.Deferred[None] | None = None
        self._ping: IDelayedCall | None = None
        self._waiter: defer.Deferred[None] | None = None

    def start(self) -> None:
        self._running = True
        self._loop = defer.Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: log.error("%s: NOTIFY stopped: %s", self.label, describe_failure(f)))

    async def stop(self) -> None:
        self._running = False
        self._cancel_ping()
        self._wake()  # the listening loop logs out
        if self._sleep is not None:
            self._sleep.cancel()
        if self._loop is not None:
            try:
                await self._loop
            except Exception:  # noqa: BLE001 - stopping anyway
                pass

    async def _run(self) -> None:
        while self._running:
            started = self.clock.seconds()
            self.state = "connecting"
            try:
                client = await self._connect(f"{self.label} notify")
                if not self._running:
                    await client.logout()
                    return
                self._client = client
                client.on_unsolicited = self._event
                client.on_lost = self._wake
                await client.notify_set(EVENTS)
                self.state = "listening"
                log.info("%s: NOTIFY: listening for changes in every mailbox on one connection", self.label)
                self.on_connected()
                await self._listen(client)
                if not self._running:
                    await client.logout()
                    return
            except TooManyConnections as e:
                self._give_up(f"no connection left for it ({describe_failure(e)})")
                return
            except CommandFailed as e:
                self._give_up(f"the server refused NOTIFY SET ({e.status} {e.text})")
                return
            except (LoginFailed, ConnectFailed, ConnectionLost, ConnectionDone, ProtocolError) as e:
                reason = describe_failure(e)
            except Exception as e:  # noqa: BLE001 - never let it die silently
                log.exception("%s: NOTIFY connection failed", self.label)
                reason = repr(e)
            finally:
                self._cancel_ping()
                self._client = None
            if not self._running:
                return
            if self.clock.seconds() - started >= STABLE_AFTER:
                self.backoff.reset()
            delay = self.backoff.next()
            self.state = "reconnecting"
            log.warning("%s: NOTIFY connection lost (%s); reconnecting in %.0f s", self.label, reason, delay)
            self._sleep = task.deferLater(self.clock, delay, lambda: None)
            try:
                await self._sleep
            except defer.CancelledError:
                if not self._running:
                    return
            finally:
                self._sleep = None

    async def _listen(self, client: MirrordIMAP4Client) -> None:
        """NOOP every ``keepalive`` seconds until the connection ends (the NOOP's error says how)."""
        while self._running:
            self._waiter = defer.Deferred()
            self._ping = self.clock.callLater(coalesced_delay(self.clock.seconds(), self.keepalive), self._wake)
            await self._waiter
            self._cancel_ping()
            if not self._running:
                return
            await client.noop()  # raises at once when the connection is gone

    def check_now(self) -> None:
        """After a suspend: prove the connection alive with a NOOP now (a dead one then reconnects)."""
        self._wake()

    def _wake(self) -> None:
        """Time for a NOOP, or the connection was lost (the NOOP then fails and says why)."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(None)

    def _cancel_ping(self) -> None:
        if self._ping is not None and self._ping.active():
            self._ping.cancel()
        self._ping = None

    def _give_up(self, why: str) -> None:
        self._running = False
        self.state = "stopped"
        log.warning("%s: NOTIFY not used: %s; the mailboxes without a watcher are polled", self.label, why)
        self.on_gone(why)

    def _event(self, response: Untagged) -> None:
        kind = response.kind
        if kind == "STATUS":
            try:
                raw, figures = status_figures(response)
            except ProtocolError as e:
                log.warning("%s: NOTIFY: ignoring a malformed STATUS: %s", self.label, e)
                return
            self.events += 1
            self.on_status(raw, figures)
        elif kind == "LIST":
            self.events += 1
            self.on_names()
        elif kind == "BYE":
            log.info("%s: NOTIFY: server is closing the connection: %s", self.label, response.text)
        elif kind in ("OK", "NO", "BAD") and response.text:
            log.debug("%s: NOTIFY: server says %s %s", self.label, kind, response.text)
