"""The worker pool: a fixed number of logged-in connections per account.

Workers do the fetching and listing; they never IDLE (that is the watcher's
job). A job borrows one worker for its duration, so one connection is never
used by two jobs that could disagree about the selected mailbox. Connections
are opened on first use and re-opened after a loss; a job that lost its
connection is retried on a fresh one a few times before it fails.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from mirrord.protocol.client import MailboxStatus, MirrordIMAP4Client
from mirrord.protocol.connect import ServerSettings, open_session
from mirrord.protocol.early import EarlyConnection
from mirrord.protocol.errors import ConnectFailed, LoginFailed, ProtocolError, TLSFailed, describe_failure

log = logging.getLogger("mirrord.pool")

T = TypeVar("T")

RETRIES = 3
"""Attempts a job gets when its connection drops under it."""

_CONNECTION_ERRORS = (ConnectionLost, ConnectionDone, ConnectFailed, ProtocolError)


class Worker:
    """One connection and what is selected on it."""

    def __init__(self, pool: WorkerPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.label = f"{pool.label} worker {number}"
        self.client: MirrordIMAP4Client | None = None
        self._opening: list[defer.Deferred[MirrordIMAP4Client]] = []
        """Who waits for the connection being opened (a job, or connecting ahead)."""
        self.selected: bytes | None = None
        self.status: MailboxStatus | None = None

    async def connection(self, then: Callable[[MirrordIMAP4Client], None] | None = None) -> MirrordIMAP4Client:
        """The worker's logged-in connection, opened (or joined, if opening) as needed.

        ``then``: when this call opens the connection, the first commands to
        send with the session's set-up, in its last round trip (see
        ``open_session``); it is not called otherwise, and the caller then
        sends them itself.
        """
        if self.client is not None and not self.client.connected_transport_lost:
            return self.client
        waiter: defer.Deferred[MirrordIMAP4Client] = defer.Deferred()
        self._opening.append(waiter)
        if len(self._opening) == 1:
            self.client = None
            self.selected = None
            defer.Deferred.fromCoroutine(self.pool.connect(self.label, then)).addBoth(self._opened)
        return await waiter

    def _opened(self, result: MirrordIMAP4Client | Failure) -> None:
        waiters, self._opening = self._opening, []
        if isinstance(result, Failure):
            for waiter in waiters:
                waiter.errback(result)
            return
        if self.pool.closed:
            if result.transport is not None:  # opened too late: nobody will use or log it out
                result.transport.abortConnection()
            for waiter in waiters:
                waiter.errback(RuntimeError("the worker pool is closed"))
            return
        self.client = result
        for waiter in waiters:
            waiter.callback(result)
        self.pool._connected()

    @property
    def connected(self) -> bool:
        return self.client is not None and not self.client.connected_transport_lost

    async def examine(self, raw_name: bytes, **params: Any) -> MailboxStatus:
        """EXAMINE ``raw_name`` now, for a fresh view of its state (``params``: see the client's)."""
        client = await self.connection()
        self.selected = None
        self.status = await client.examine(raw_name, **params)
        self.selected = raw_name
        return self.status

    async def examine_then(
        self, raw_name: bytes, then: Callable[[MirrordIMAP4Client], Awaitable[T]], **params: Any
    ) -> tuple[MailboxStatus, T]:
        """EXAMINE ``raw_name`` and run ``then``'s command pipelined behind it: one round trip.

        This is how new mail is fetched the moment a watcher hears of it.
        Re-using a selection would not save the round trip: a session sees
        mail that arrived since its last command only after a command syncs
        its view, Dovecot answers ``UID FETCH`` from the old view (no error,
        just nothing), and it runs a UID command pipelined behind a NOOP in
        parallel with the NOOP, on the view from before it. A command after
        EXAMINE must run in the mailbox EXAMINE opened, on every server
        (RFC 3501 5.5), and EXAMINE's view is fresh. ``then`` must send its
        one command as soon as it is called.

        :attr:`status` and :attr:`selected` are set the moment EXAMINE's OK is
        read, before any response to ``then``'s command, so a callback
        handling those can check what was selected. ``params`` go to the
        client's ``examine`` (``qresync=``, ``condstore=``).
        """
        client = await self.connection()
        self.selected = None
        self.status = None

        def examined(status: MailboxStatus) -> MailboxStatus:
            self.status = status
            self.selected = raw_name
            return status

        with client.pipeline():
            opened = defer.Deferred.fromCoroutine(client.examine(raw_name, **params)).addCallback(examined)
            done = defer.Deferred.fromCoroutine(then(client))
        try:
            status = await opened
        except BaseException:
            # Without a mailbox the pipelined command fails too; that is not news.
            done.addErrback(lambda _: None)
            raise
        return status, await done

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None and not client.connected_transport_lost:
            await client.logout()


class WorkerPool:
    """``size`` workers for one account; see the module docstring."""

    def __init__(
        self,
        reactor: Any,
        account: ServerSettings,
        password: str,
        size: int,
        *,
        connect: Callable[[str], Awaitable[MirrordIMAP4Client]] | None = None,
        ahead: int | None = None,
        early: EarlyConnection | None = None,
    ) -> None:
        """``ahead``: how many workers to have logged in after the first login
        (default: all); see :meth:`_connected`. ``early``: a connection to the
        server begun at start-up, for the first worker to log in on."""
        self.reactor = reactor
        self._ahead = size if ahead is None else max(1, min(size, ahead))
        self.account = account
        self.label = account.name
        self._password = password
        self._connect = connect
        self._idle: list[Worker] = [Worker(self, n) for n in range(1, size + 1)]
        self._all = list(self._idle)
        self._waiters: list[defer.Deferred[Worker]] = []
        self._drained: list[defer.Deferred[None]] = []
        self._closed = False
        self._warmed = False
        self._early = early

    @property
    def size(self) -> int:
        return len(self._all)

    async def connect(self, label: str, then: Callable[[MirrordIMAP4Client], None] | None = None) -> MirrordIMAP4Client:
        """A new logged-in connection; ``then``: see :meth:`Worker.connection` (not called by a custom ``connect``)."""
        if self._connect is not None:
            return await self._connect(label)
        sock = self._early.take() if self._early is not None else None
        return await open_session(
            self.reactor, self.account, self._password, label=label, bulk=True, early=sock, then=then
        )

    def _connected(self) -> None:
        """A login worked: log the other workers in now, in parallel, once.

        Jobs come in waves (discovery, then a listing, then a batch per
        worker): without this, each worker's connect, greeting, login and
        COMPRESS (three or four round trips) would come just when its first
        batch is due, which on a 50 ms link is 0.2 s of an idle link.
        Only after one login succeeded, so that a wrong password costs one
        refused login, not one per worker. Only up to ``ahead`` workers: a
        catch-up of one mailbox needs one connection, and three more logins
        would cost the server (and this process) more than the whole
        catch-up; a job that finds no free worker still opens one.
        """
        if self._warmed or self._closed:
            return
        self._warmed = True
        wanted = self._ahead - sum(1 for worker in self._all if worker.connected or worker._opening)
        for worker in self._all:
            if wanted <= 0:
                break
            if not worker.connected and not worker._opening:
                wanted -= 1
                defer.Deferred.fromCoroutine(self._warm(worker))

    async def _warm(self, worker: Worker) -> None:
        """Open a worker's connection ahead of need.

        The worker stays free meanwhile: a job that takes it joins the
        connection being opened, so which worker runs which job is as
        without this. A failure is left for the worker's first job to meet
        (and retry, and report).
        """
        try:
            await worker.connection()
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.debug("%s: connecting ahead failed: %s", worker.label, e)

    @property
    def closed(self) -> bool:
        return self._closed

    async def _acquire(self, prefer: Worker | None = None) -> Worker:
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        if prefer is not None and prefer in self._idle:
            self._idle.remove(prefer)
            return prefer
        if self._idle:
            # A worker already logged in runs the job now; one still logging
            # in (connecting ahead) would make it wait three round trips.
            worker = next((w for w in self._idle if w.connected), self._idle[0])
            self._idle.remove(worker)
            return worker
        waiter: defer.Deferred[Worker] = defer.Deferred()
        self._waiters.append(waiter)
        return await waiter

    def _release(self, worker: Worker) -> None:
        if self._closed:
            self._idle.append(worker)
            if len(self._idle) == len(self._all):
                drained, self._drained = self._drained, []
                for d in drained:
                    d.callback(None)
            return
        if self._waiters:
            self._waiters.pop(0).callback(worker)
        else:
            self._idle.append(worker)

    async def run(
        self, job: Callable[[Worker], Awaitable[T]], what: str = "job", prefer: Worker | None = None
    ) -> T:
        """Run ``job`` on a free worker, retrying on a fresh connection if it drops.

        ``prefer``: take this worker if it is free (it has the job's mailbox
        selected already, which saves an EXAMINE). A refused login is not
        retried: trying again at once is how accounts get locked.
        """
        attempt = 0
        while True:
            attempt += 1
            worker = await self._acquire(prefer if attempt == 1 else None)
            try:
                return await job(worker)
            except (LoginFailed, TLSFailed):
                raise
            except _CONNECTION_ERRORS as e:
                worker.client = None
                worker.selected = None
                if attempt >= RETRIES:
                    raise
                log.warning("%s: %s interrupted (%s); retrying on a new connection", worker.label, what, describe_failure(e))
            finally:
                self._release(worker)

    def discard_idle_connections(self) -> None:
        """Drop the connections no job is using: after a suspend they are likely dead,
        and a fresh one is cheaper than a command timing out on a stale one."""
        for worker in self._idle:
            client, worker.client = worker.client, None
            worker.selected = None
            if client is not None and client.transport is not None and not client.connected_transport_lost:
                client.transport.abortConnection()

    async def close(self) -> None:
        """Log out every connection; waiters get an error."""
        await (await self.stop())

    async def stop(self) -> defer.Deferred[Any]:
        """Close the pool as :meth:`close` does, but return as soon as no job
        runs and the LOGOUTs are sent; the Deferred returned fires when the
        servers have answered them.

        ``run --once`` closes its state database meanwhile: nothing it has
        to do waits for those answers, only the exit does.
        """
        self._closed = True
        if self._early is not None:
            self._early.close()  # never needed (no job ran)
        for waiter in self._waiters:
            waiter.errback(RuntimeError("the worker pool is closed"))
        self._waiters.clear()
        if len(self._idle) < len(self._all):
            # Jobs still running finish first: a fetch's last messages are
            # made durable and recorded after its command ends (the state DB
            # is closed once we return), and its LOGOUT would wait for the
            # command anyway.
            drained: defer.Deferred[None] = defer.Deferred()
            self._drained.append(drained)
            await drained
        return defer.DeferredList(
            [defer.Deferred.fromCoroutine(w.close()) for w in self._all], consumeErrors=True
        )
