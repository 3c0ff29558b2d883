"""``mirrord run``: every account's workers, watchers and pollers, until stopped.

Per account: one worker pool; one IDLE watcher per watched mailbox, as many as
fit under the connection budget (``max_connections``, or fewer if the server
refused one: :mod:`mirrord.budget`) beside the workers, chosen by
:mod:`mirrord.watchset`; the other mailboxes are polled together every
``poll_interval`` by :mod:`mirrord.poller`. Each mailbox has a LiveMailbox that turns
its events into fetches and local changes. An account that cannot log in
keeps retrying with backoff; it never stops the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime

from mirrord import watchset
from mirrord.budget import ConnectionBudget
from mirrord.config import Account, PasswordError
from mirrord.localwatch import NewFolderWatcher, default_notifier
from mirrord.notify import NotifyService
from mirrord.poller import PolledMailbox, StatusPoller
from mirrord.pool import WorkerPool
from mirrord.protocol.client import MirrordIMAP4Client
from mirrord.protocol.connect import open_session
from mirrord.protocol.errors import LoginFailed, TooManyConnections, describe_failure
from mirrord.store.state import StateDB
from mirrord.sync.account import (
    Discovery,
    MailboxPlan,
    add_local_folders,
    discover,
    push_folders,
)
from mirrord.sync.folders import (
    MassFolderRemoval,
    adopt_renamed,
    check_folders,
    gone_folders,
    set_aside_folder,
)
from mirrord.sync.live import LiveMailbox
from mirrord.sync.livepush import LocalPush
from mirrord.sync.mailbox import MailboxResult, MailboxSync
from mirrord.sync.pushing import Pusher
from mirrord.timers import CoalescedLoop
from mirrord.units import plural
from mirrord.watcher import Backoff, WatcherService

log = logging.getLogger("mirrord.daemon")

LOGIN_RETRY_FIRST = 600.0
LOGIN_RETRY_CAP = 6 * 3600.0
"""A refused login is tried again after 5-10 minutes, the wait doubling up to 6 hours."""


def relist_interval(account: Account) -> float:
    """How often the account's mailboxes are listed anew, to mirror those created on the server.

    As often as the slowest of the daemon's own periodic work: the IDLE
    renewals and the polls. On the shared grid of :mod:`mirrord.timers` the
    listing then rides the wakeup that renews IDLE (or polls) anyway, instead
    of waking an idle daemon for itself; a mailbox created on the server is
    mirrored within ``idle_renew`` (20 minutes by default), or at once after
    SIGHUP.
    """
    return max(account.poll_interval, account.idle_renew)


def split_watched(
    account: Account, plans: list[MailboxPlan], room: int
) -> tuple[list[MailboxPlan], list[MailboxPlan]]:
    """Which mailboxes get one of ``room`` watchers and which are polled.

    Watchers go to the mailboxes ``watch`` names first, then INBOX, then in
    name order (see :mod:`mirrord.watchset`; activity re-orders them later).
    """
    named = (lambda n: False) if account.watch is None else account.wants_watched
    chosen = set(watchset.choose(watchset.candidates([p.local_name for p in plans], named, {}), room))
    return [p for p in plans if p.local_name in chosen], [p for p in plans if p.local_name not in chosen]


@dataclass
class MailboxRuntime:
    plan: MailboxPlan
    live: LiveMailbox
    watcher: WatcherService | None = None
    poller: PolledMailbox | None = None

    def display(self) -> tuple[str, float | None]:
        """(state, since) for `mirrord status`: idling, polling, reconnecting, error..."""
        if self.live.last_error and not self.live.busy:
            return "error", None
        if self.watcher is not None:
            return self.watcher.display_state, self.watcher.since
        return "polling", None

    def watched_by(self) -> str | None:
        """How changes are learnt, for `mirrord status`: IDLE, or how the poller polls."""
        if self.watcher is not None:
            return "IDLE"
        if self.poller is not None:
            return self.poller.describe()
        return None


@dataclass
class AccountRuntime:
    account: Account
    state: str = "starting"
    error: str | None = None
    mailboxes: dict[str, MailboxRuntime] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    """Mailboxes that could not be set up (local name -> why), retried at each listing."""


class AccountDaemon:
    """Mirrors one account continuously."""

    def __init__(
        self,
        reactor: Any,
        account: Account,
        state: StateDB,
        *,
        clock: IReactorTime | None = None,
        on_new_mail: Any = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.account = account
        self.state_db = state
        self.clock: IReactorTime = clock or reactor
        self.on_new_mail = on_new_mail
        self.on_change: Callable[[], None] = on_change or (lambda: None)
        """Called when anything `mirrord status` shows may have changed."""
        self.runtime = AccountRuntime(account)
        self.pool: WorkerPool | None = None
        self._password: str | None = None
        self._stopping = False
        self._starting: defer.Deferred[None] | None = None
        self._sleep: defer.Deferred[None] | None = None
        self._rediscover: CoalescedLoop | None = None
        self.budget = ConnectionBudget(account.name, account.max_connections, self.clock,
                                       on_change=lambda _: self._rebalance())
        self.status_poller: StatusPoller | None = None
        self._rebalancing: defer.Deferred[None] | None = None
        self._rebalance_again = False
        self._arrivals: dict[str, float] = {}
        """When new mail last landed in each mailbox (after its first sync): the watched set follows it."""
        self.notifier: NotifyService | None = None
        """NOTIFY for the mailboxes without a watcher, where the server offers it (one connection)."""
        self._relisting: defer.Deferred[None] | None = None
        self._relist_again = False
        self.local_push: LocalPush | None = None
        """Two-way accounts: the reader's changes, sent as they happen."""
        self.new_folders: NewFolderWatcher | None = None
        self.start_finished: defer.Deferred[None] = defer.Deferred()
        """Fires when start() does: the first catch-up is done (or the account gave up for now)."""

    @property
    def label(self) -> str:
        return self.account.name

    def start(self) -> defer.Deferred[None]:
        """Begin; fires once every mailbox had its first catch-up, or the first attempt failed.

        A failed account keeps retrying in the background: the daemon as a
        whole is up (systemd's READY=1), with this account's error logged
        and shown in `mirrord status`.
        """
        self._starting = defer.Deferred.fromCoroutine(self._start())
        self._starting.addErrback(lambda f: log.error("%s: %s", self.label, describe_failure(f)))
        self._starting.addBoth(lambda _: self._first_attempt_done())
        waiter: defer.Deferred[None] = defer.Deferred()
        self.start_finished.addBoth(lambda result: (waiter.callback(None), result)[1])
        return waiter

    def _first_attempt_done(self) -> None:
        if not self.start_finished.called:
            self.start_finished.callback(None)

    async def _start(self) -> None:
        backoff = Backoff(first=5.0, cap=600.0)
        # A refused login is retried rarely and ever more rarely: a server
        # that counts failures locks the account, and the password will not
        # fix itself in seconds. Said loudly once, quietly after.
        login_backoff = Backoff(first=LOGIN_RETRY_FIRST, cap=LOGIN_RETRY_CAP)
        refusals = 0
        while not self._stopping:
            try:
                await self._bring_up()
                self.runtime.state = "running"
                self.runtime.error = None
                self.on_change()
                return
            except PasswordError as e:
                self.runtime.error = str(e)
                delay = backoff.next()
            except LoginFailed as e:
                self.runtime.error = str(e)
                refusals += 1
                delay = login_backoff.next()
                # The password may have been changed in the store meanwhile.
                self._password = None
            except Exception as e:  # noqa: BLE001 - keep trying; other accounts go on
                self.runtime.error = str(e) or type(e).__name__
                delay = backoff.next()
            self.runtime.state = "error"
            self.on_change()
            self._log_failure(refusals, delay)
            self._first_attempt_done()
            if self.pool is not None:
                await self.pool.close()
                self.pool = None
            self._sleep = task.deferLater(self.clock, delay, lambda: None)
            try:
                await self._sleep
            except defer.CancelledError:
                return
            finally:
                self._sleep = None

    def _log_failure(self, refusals: int, delay: float) -> None:
        error = self.runtime.error
        if refusals == 1 and error and "refused the login" in error:
            what = "password" if self.account.auth == "password" else "token command's account"
            log.error("%s: %s. Check the %s (`mirrord check` tests it); trying again in %.0f s, "
                      "then less and less often", self.label, error.rstrip("."), what, delay)
        elif refusals > 1 and error and "refused the login" in error:
            log.info("%s: login still refused; next try in %.0f s", self.label, delay)
        else:
            log.error("%s: %s; trying again in %.0f s", self.label, error, delay)

    async def _bring_up(self) -> None:
        if self._password is None:
            self._password = await threads.deferToThread(self.account.password.resolve_once)
        if self.notifier is not None:  # from an attempt that failed
            await self.notifier.stop()
            self.notifier = None
        self.pool = WorkerPool(self.reactor, self.account, self._password, self.account.workers,
                               connect=self._connect_worker)
        if self.status_poller is None:
            self.status_poller = StatusPoller(self.pool, self.clock, self.account.poll_interval, label=self.label,
                                              on_round=self._rebalance, on_names=self._relist_soon)
        self.status_poller.pool = self.pool  # mailboxes set up by an attempt that failed keep being polled
        discovery = await discover(self.pool, self.account)
        room = self.budget.limit - self.account.workers
        if "NOTIFY" in discovery.capabilities and len(discovery.wanted) > room >= 2:
            # One connection hears of all the mailboxes left without a watcher;
            # not the last one, which goes to a watcher (INBOX, say).
            self._start_notify()
        if self.account.two_way and self.local_push is None:
            pusher = Pusher(self.account, self.state_db, self.pool, {})
            self.local_push = LocalPush(
                pusher, self.clock, lambda: {n: m.live for n, m in self.runtime.mailboxes.items()},
                default_notifier(), on_change=self.on_change,
            )
            # A folder a reader makes is created on the server at the next
            # listing, which a new directory under the root brings forward.
            self.new_folders = NewFolderWatcher(self.clock, self._new_local_folder, default_notifier())
            self.new_folders.watch_tree(self.account.maildir)
        elif self.local_push is not None:
            self.local_push.pusher.pool = self.pool
        for reason in discovery.skipped:
            log.warning("%s: not mirrored: %s", self.label, reason)
        set_aside = await self._folders_gone(discovery)
        if self.account.two_way:
            await add_local_folders(self.pool, self.account, self.state_db, discovery)
        await self._apply_discovery(discovery, first=True, set_aside=set_aside)
        # Re-list now and then: mailboxes created on the server get mirrored.
        self._rediscover = CoalescedLoop(self.clock, relist_interval(self.account), self._relist_soon,
                                         label=f"{self.label}: re-listing mailboxes")
        self._rediscover.start(now=False)
        await defer.DeferredList([m.live.first_sync for m in self.runtime.mailboxes.values()])

    async def _apply_discovery(self, discovery: Discovery, first: bool = False, set_aside: list[Path] = []) -> None:  # noqa: B006
        known = self.runtime.mailboxes
        fresh = [p for p in discovery.wanted if p.local_name not in known]
        if not fresh:
            return
        watched_now = sum(1 for m in known.values() if m.watcher is not None)
        account = self.account
        room = max(0, self.budget.limit - account.workers - self._notify_slots() - watched_now)
        ready: list[MailboxPlan] = []
        for plan in fresh:
            # A local folder that cannot be made (a name too long for the file
            # system, a file in its place) fails that mailbox alone: the others
            # still get their watchers. It is tried again at the next listing.
            try:
                sync = MailboxSync.for_account(account, plan.entry, plan.local_name, self.state_db, self.pool)  # type: ignore[arg-type]
                live = LiveMailbox(sync, self.clock, on_new_mail=self._new_mail, on_change=self.on_change)
            except Exception as e:  # noqa: BLE001 - one mailbox's local trouble stays its own
                error = f"cannot set up its local folder: {_describe(e)}"
                if self.runtime.failed.get(plan.local_name) != error:
                    log.error("%s/%s: FAILED: %s; trying again at the next listing", self.label, plan.local_name, error)
                self.runtime.failed[plan.local_name] = error
                continue
            self.runtime.failed.pop(plan.local_name, None)
            if set_aside and self.state_db.mailbox(account.name, plan.local_name) is None:
                try:
                    await adopt_renamed(sync, set_aside)
                except Exception as e:  # noqa: BLE001 - only a shortcut: the sync fetches the rest
                    log.warning("%s/%s: could not match set-aside copies: %s", self.label, plan.local_name, e)
            known[plan.local_name] = MailboxRuntime(plan, live)
            ready.append(plan)
            if self.local_push is not None:
                self.local_push.pusher.folders.update(push_folders(account, [plan], self.state_db))
                self.local_push.watch(plan.local_name)
        fresh = ready
        if not fresh:
            self.on_change()
            return
        watched, polled = split_watched(account, fresh, room)
        for plan in watched:
            self._watch(known[plan.local_name])
        for plan in polled:
            self._poll(known[plan.local_name])
        self.on_change()
        log.info(
            "%s: %s %s: %d watched with IDLE, %d polled together every %g s",
            self.label,
            plural(len(fresh), "mailbox", "mailboxes"),
            "to mirror" if first else "new on the server",
            len(watched),
            len(polled),
            account.poll_interval,
        )
        if polled and len(watched) == room:
            log.info(
                "%s: polled (no connection left under max_connections=%d): %s",
                self.label,
                self.budget.limit,
                ", ".join(p.local_name for p in polled[:20]) + (f" and {len(polled) - 20} more" if len(polled) > 20 else ""),
            )

    def _watch(self, runtime: MailboxRuntime) -> None:
        """Give the mailbox a watcher of its own (it stops being polled)."""
        if runtime.poller is not None:
            runtime.poller.stop()
            runtime.poller = None
        name = runtime.plan.local_name
        runtime.watcher = WatcherService(
            connect=self._connect,
            raw_name=runtime.plan.entry.raw_name,
            listener=runtime.live,
            clock=self.clock,
            label=f"{self.label}/{name}",
            idle_renew=self.account.idle_renew,
            poll_interval=self.account.poll_interval,
            on_change=self.on_change,
            on_too_many=lambda reason: self._watcher_refused(name, reason),
        )
        runtime.watcher.start()

    def _poll(self, runtime: MailboxRuntime) -> None:
        """Have the mailbox polled with the others (its first look comes at once)."""
        assert self.status_poller is not None
        runtime.poller = self.status_poller.add(runtime.plan.local_name, runtime.plan.entry.raw_name, runtime.live)

    def _watcher_refused(self, name: str, reason: str) -> None:
        """The server refused a watcher's connection as one too many: poll its mailbox instead."""
        runtime = self.runtime.mailboxes.get(name)
        if runtime is not None and not self._stopping:
            runtime.watcher = None  # it stopped itself
            self._poll(runtime)
            self.on_change()

    def _rebalance(self) -> None:
        """Fit the watched set to the budget and to recent arrivals (see :mod:`mirrord.watchset`).

        One change at a time: a watcher given up logs out before another
        connects, so a swap never needs a connection over the budget.
        """
        if self._rebalancing is not None:
            self._rebalance_again = True
            return
        running = defer.Deferred.fromCoroutine(self._rebalance_now())
        if not running.called:  # done at once when nothing had to change
            self._rebalancing = running

    async def _rebalance_now(self) -> None:
        try:
            while True:
                self._rebalance_again = False
                await self._rebalance_once()
                if not self._rebalance_again:
                    return
        except Exception:  # the watched set stays as it was
            log.exception("%s: could not re-choose the watched mailboxes", self.label)
        finally:
            self._rebalancing = None

    async def _rebalance_once(self) -> None:
        if self._stopping or self.status_poller is None or self.pool is None or self.budget.unsettled:
            return  # (an unsettled budget calls again once it knows the limit)
        mailboxes = self.runtime.mailboxes
        named = (lambda n: False) if self.account.watch is None else self.account.wants_watched
        pool = watchset.candidates(mailboxes, named, self._arrivals)
        watched = [n for n, r in mailboxes.items() if r.watcher is not None]
        room = self.budget.limit - self.pool.size - self._notify_slots()
        start, stop = watchset.rechoose(pool, watched, room, self.clock.seconds())
        if not start and not stop:
            return
        stopping = []
        for name in stop:
            runtime = mailboxes[name]
            watcher, runtime.watcher = runtime.watcher, None
            if watcher is not None:
                stopping.append(defer.Deferred.fromCoroutine(watcher.stop()))
            self._poll(runtime)
        await defer.DeferredList(stopping, consumeErrors=True)
        for name in start:
            runtime = mailboxes.get(name)
            if runtime is not None and runtime.watcher is None and not self._stopping:
                self._watch(runtime)
        log.info("%s: watched set changed (budget %d connections, %d workers): now watching %s; now polling %s",
                 self.label, self.budget.limit, self.pool.size, ", ".join(start) or "no other",
                 ", ".join(stop) or "no other")
        self.on_change()

    def _notify_slots(self) -> int:
        return 1 if self.notifier is not None else 0

    def _start_notify(self) -> None:
        """One NOTIFY connection for the mailboxes without a watcher (see :mod:`mirrord.notify`)."""
        poller = self.status_poller
        assert poller is not None
        connected = [0]

        def on_connected() -> None:
            connected[0] += 1
            poller.notified = True
            self.on_change()
            poller.soon()  # events sent while it was down are lost: look now
            if connected[0] > 1:
                self._relist_soon()

        def on_gone(_why: str) -> None:
            self.notifier = None
            poller.notified = False
            self._rebalance()  # its connection is free for a watcher

        self.notifier = NotifyService(
            connect=self._connect, clock=self.clock, label=self.label, keepalive=self.account.idle_renew,
            on_status=lambda raw, figures: poller.changed(raw, figures), on_names=self._relist_soon,
            on_connected=on_connected, on_gone=on_gone,
        )
        self.notifier.start()

    def _relist_soon(self) -> defer.Deferred[None]:
        """List the mailboxes again now (the timer, NOTIFY or a poll round asks); one listing at a time,
        so that two never set aside the same folder."""
        if self._relisting is not None:
            self._relist_again = True
            return self._relisting

        async def relist() -> None:
            try:
                while True:
                    self._relist_again = False
                    await self._relist()
                    if not self._relist_again or self._stopping:
                        return
            finally:
                self._relisting = None

        running = defer.Deferred.fromCoroutine(relist())
        if not running.called:
            self._relisting = running
        return running

    async def _relist(self) -> None:
        """One listing; call it through :meth:`_relist_soon`, which keeps them one at a time."""
        if self.pool is None or self._stopping:
            return
        try:
            discovery = await discover(self.pool, self.account)
            set_aside = await self._folders_gone(discovery)
            if self.account.two_way:
                await add_local_folders(self.pool, self.account, self.state_db, discovery)
            await self._apply_discovery(discovery, set_aside=set_aside)
        except Exception as e:  # noqa: BLE001 - next time, then
            log.warning("%s: could not re-list mailboxes: %s", self.label, e)

    async def _folders_gone(self, discovery: Discovery) -> list[Path]:
        """Folders gone from this complete LIST: their watchers stop, their copies are set aside.

        A LIST lacking too many folders is logged and changes nothing (see
        :mod:`mirrord.sync.folders`); one that fails never gets here.
        """
        recorded = [r.mailbox for r in self.state_db.mailboxes(self.account.name)]
        gone = set(gone_folders(self.account, discovery.listed, [*recorded, *self.runtime.mailboxes]))
        if not gone:
            return []
        try:
            check_folders(self.account, sorted(gone), len({*recorded, *self.runtime.mailboxes}))
        except MassFolderRemoval as e:
            log.error("%s", e)
            return []
        places: list[Path] = []
        for name in sorted(gone):
            runtime = self.runtime.mailboxes.pop(name, None)
            if runtime is not None:
                if runtime.poller is not None and runtime.poller.running:
                    runtime.poller.stop()
                if runtime.watcher is not None:
                    await runtime.watcher.stop()
                await runtime.live.stop()
            if self.local_push is not None:
                # The server deleted it: nothing of it goes up any more, and
                # the round in hand (if any) ends before its files move.
                await self.local_push.forget(name)
            try:
                where = set_aside_folder(self.account, self.state_db, name)
            except OSError as e:
                log.error("%s/%s: gone from the server, but cannot be set aside: %s", self.label, name, _describe(e))
                continue
            log.warning("%s/%s: gone from the server; watcher stopped, local copy set aside in %s",
                        self.label, name, where)
            places.append(where)
        self.on_change()
        return places

    async def _connect(self, label: str, bulk: bool = False) -> MirrordIMAP4Client:
        """A logged-in connection, counted against the budget (a refusal as one too many shrinks it)."""
        assert self._password is not None
        client: MirrordIMAP4Client | None = None
        refused: str | None = None
        self.budget.attempt()
        try:
            client = await open_session(self.reactor, self.account, self._password, label=label, clock=self.clock,
                                        bulk=bulk)
            return client
        except TooManyConnections as e:
            refused = describe_failure(e)
            raise
        finally:
            self.budget.done(client, refused)

    async def _connect_worker(self, label: str) -> MirrordIMAP4Client:
        return await self._connect(label, bulk=True)

    def check_connections(self) -> None:
        """After a suspend: test every watcher's connection now and start workers afresh."""
        if self.pool is not None:
            self.pool.discard_idle_connections()
        for runtime in self.runtime.mailboxes.values():
            if runtime.watcher is not None:
                runtime.watcher.check_now()
        if self.status_poller is not None:
            self.status_poller.soon()
        if self.notifier is not None:
            self.notifier.check_now()

    def _new_local_folder(self) -> None:
        if self.pool is not None and not self._stopping:
            self._relist_soon()

    def _new_mail(self, result: MailboxResult) -> None:
        self._arrivals[result.mailbox] = self.clock.seconds()
        if self.on_new_mail is not None:
            self.on_new_mail(self.account, result)

    async def stop(self) -> None:
        """Stop taking work, let writes in progress finish, log out."""
        self._stopping = True
        if self._sleep is not None:
            self._sleep.cancel()
        if self._rediscover is not None and self._rediscover.running:
            self._rediscover.stop()
        if self.status_poller is not None:
            self.status_poller.stop()
        self.budget.stop()
        if self.notifier is not None:
            await self.notifier.stop()
        await defer.DeferredList(
            [defer.Deferred.fromCoroutine(r.watcher.stop()) for r in self.runtime.mailboxes.values() if r.watcher],
            consumeErrors=True,
        )
        if self.new_folders is not None:
            self.new_folders.stop()
        if self.local_push is not None:
            await self.local_push.stop()
        await defer.DeferredList([r.live.stop() for r in self.runtime.mailboxes.values()], consumeErrors=True)
        if self.pool is not None:
            await self.pool.close()


def _describe(error: BaseException) -> str:
    """An error as one line for the log: an OSError with the path it concerns."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error) or type(error).__name__
