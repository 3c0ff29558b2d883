"""``mirrord run`` as a service: systemd notifications, signals, reloads, the status file.

The daemon proper (:mod:`mirrord.daemon`) mirrors accounts; this module is
what makes it a good citizen under systemd and in a terminal:

- READY=1 once every account has had its first catch-up (or failed it with
  a logged reason); until then, while the reactor is alive, the start
  timeout is extended so a large first sync is not killed as a hung start.
- STATUS= lines for ``systemctl --user status``; WATCHDOG=1 from the reactor
  only when systemd asks for it (``WATCHDOG_USEC``), at its period.
- SIGTERM/SIGINT: STOPPING=1, stop taking work, let writes finish, log out.
- SIGHUP: re-read the config and apply it without a restart: accounts that
  are new or changed are (re)started, removed ones stopped, the rest left
  alone. A config that does not load is logged and the old one kept.
- A status file that ``mirrord status`` reads.

An idle daemon sleeps: no timer here runs unless it has to. The status is
published when something changes (:class:`~mirrord.status.ChangePublisher`),
and a suspend and resume is noticed when the kernel says the clock was set
(:class:`~mirrord.watcher.ClockJumpDetector`), not by looking every few
seconds.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

from twisted.internet import defer, task

from mirrord.config import Account, Config, ConfigError, load_config
from mirrord.daemon import AccountDaemon
from mirrord.hooks import NewMailHook
from mirrord.locks import AccountLock, lock_accounts
from mirrord.sdnotify import Notifier, start_watchdog
from mirrord.watcher import ClockJumpDetector
from mirrord.status import STATE_DB_NAME, AccountStatus, ChangePublisher, DaemonStatus, MailboxStatus, StatusFile
from mirrord.store.state import StateDB
from mirrord.sync.mailbox import MailboxResult
from mirrord.units import plural

log = logging.getLogger("mirrord")

START_EXTEND_EVERY = 20.0
"""While the first sync runs, ask systemd for this much more start time, twice over."""
STATUS_MIN_GAP = 1.0
"""Seconds between two publications of the status during a burst of changes."""


class Service:
    """Everything ``mirrord run`` keeps running; see the module docstring."""

    def __init__(self, reactor: Any, config: Config, *, notifier: Notifier | None = None) -> None:
        self.reactor = reactor
        self.config = config
        self.notifier = notifier or Notifier.from_environment()
        self.state = StateDB(config.state_dir / STATE_DB_NAME)
        self.accounts: dict[str, AccountDaemon] = {}
        self.locks: dict[str, AccountLock] = {}
        self.started = time.time()
        self.last_mail: float | None = None
        self._loops: list[task.LoopingCall] = []
        self._reloading: defer.Deferred[None] | None = None
        self._status_file: Any = None
        self.hooks: dict[str, NewMailHook] = {}
        self._jumps: ClockJumpDetector | None = None
        self._publisher = ChangePublisher(reactor, self._publish, min_gap=STATUS_MIN_GAP,
                                          differs=lambda: self._content()[1] != self._published)
        self._published: tuple[str, Any] | None = None
        """The status line and snapshot (without its time) last published."""

    # -- starting -----------------------------------------------------------------

    async def start(self) -> None:
        """Start every account; returns once each had its first catch-up (READY)."""
        self.locks = lock_accounts(self.config, list(self.config.accounts))
        watchdog = start_watchdog(self.notifier, self.reactor)
        if watchdog is not None:
            self._loops.append(watchdog)
        extend = self._every(START_EXTEND_EVERY, self._extend_start)
        self.notifier.status(f"first sync of {plural(len(self.config.accounts), 'account')}")
        for account in self.config.accounts:
            self.accounts[account.name] = self._account(account)
        self._publish()
        await defer.DeferredList([d.start() for d in self.accounts.values()], consumeErrors=True)
        extend.stop()
        self._loops.remove(extend)
        self._publisher.flush()
        self._jumps = ClockJumpDetector(self._clock_jumped, self.reactor)
        self._jumps.start()
        self.notifier.ready(self.status_line())
        self._log_started()

    def _log_started(self) -> None:
        """Say what the start achieved: an account that never connected is not being mirrored."""
        failing = [d for d in self.accounts.values() if d.runtime.state == "error"]
        if not failing:
            log.info("first sync done; mirroring %s", plural(len(self.accounts), "account"))
            return
        log.warning(
            "first sync done for %d of %d accounts; not connected, retrying: %s",
            len(self.accounts) - len(failing),
            len(self.accounts),
            ", ".join(d.label for d in failing),  # each one's error was logged as it happened
        )

    def _account(self, account: Account) -> AccountDaemon:
        old = self.hooks.pop(account.name, None)
        if old is not None:
            old.stop()
        if account.on_new_mail:
            self.hooks[account.name] = NewMailHook(self.reactor, account.name, account.on_new_mail)
        return AccountDaemon(self.reactor, account, self.state, on_new_mail=self._new_mail,
                             on_change=self._publisher.changed)

    def _every(self, seconds: float, f: Any) -> task.LoopingCall:
        loop = task.LoopingCall(f)
        loop.clock = self.reactor
        loop.start(seconds, now=True).addErrback(lambda failure: log.error("%s", failure.getErrorMessage()))
        self._loops.append(loop)
        return loop

    def _clock_jumped(self, seconds: float) -> None:
        for daemon in self.accounts.values():
            daemon.check_connections()

    def _extend_start(self) -> None:
        # Only a live reactor gets here, so a wedged first sync still times out.
        self.notifier.send(f"EXTEND_TIMEOUT_USEC={int(START_EXTEND_EVERY * 2 * 1e6)}")

    def _new_mail(self, account: Account, result: MailboxResult) -> None:
        self.last_mail = time.time()
        self._publisher.changed()
        hook = self.hooks.get(account.name)
        if hook is not None:
            hook.new_mail(result.mailbox, result.fetched)

    # -- status -----------------------------------------------------------------------

    def status_line(self) -> str:
        """What ``systemctl --user status mirrord`` shows under the unit."""
        watched = polled = failing = 0
        for daemon in self.accounts.values():
            for runtime in daemon.runtime.mailboxes.values():
                if runtime.watcher is not None:
                    watched += 1
                else:
                    polled += 1
                if runtime.live.last_error:
                    failing += 1
            failing += len(daemon.runtime.failed)
        parts = [plural(len(self.accounts), "account"), f"{plural(watched, 'mailbox', 'mailboxes')} watched",
                 f"{polled} polled"]
        failing_accounts = [d.label for d in self.accounts.values() if d.runtime.state == "error"]
        if failing_accounts:
            parts.append(f"not connected, retrying: {', '.join(failing_accounts)}")
        if failing:
            parts.append(f"{plural(failing, 'mailbox', 'mailboxes')} with errors")
        if self.last_mail is not None:
            parts.append("last mail " + time.strftime("%H:%M", time.localtime(self.last_mail)))
        return ", ".join(parts)

    def _content(self) -> tuple[DaemonStatus, tuple[str, Any]]:
        """The snapshot, and what of it is compared with the last publication (all but its time)."""
        snapshot = self.snapshot()
        content = snapshot.to_json()
        content.pop("updated", None)
        return snapshot, (self.status_line(), content)

    def _publish(self) -> None:
        """Publish the status line and the status file, unless neither changed since last time."""
        snapshot, (line, content) = self._content()
        last, self._published = self._published, (line, content)
        if last is not None and last[0] == line and last[1] == content:
            return
        if last is None or last[0] != line:
            self.notifier.status(line)
        if self._status_file is not None:
            try:
                self._status_file.write(snapshot)
            except OSError as e:
                log.warning("cannot write the status file: %s", e)

    def snapshot(self) -> DaemonStatus:
        """The status the daemon publishes for ``mirrord status``."""

        accounts = []
        for daemon in self.accounts.values():
            mailboxes = []
            for name, runtime in sorted(daemon.runtime.mailboxes.items()):
                live = runtime.live
                state, since = runtime.display()
                error = live.last_error
                held = daemon.local_push.refused.get(name) if daemon.local_push is not None else None
                if held is not None:
                    # Two-way: the folder's local changes wait for the user (--allow-delete).
                    state, since = "error", None
                    error = (f"local changes not sent: {held}; allow with "
                             f"`mirrord run --once --allow-delete {daemon.account.name}/{name}`")
                mailboxes.append(
                    MailboxStatus(
                        name=name,
                        state=state,
                        since=since,
                        last_change=live.last_change,
                        last_error=error,
                        watched_by=runtime.watched_by(),
                    )
                )
            for name, error in daemon.runtime.failed.items():
                if name not in daemon.runtime.mailboxes:
                    mailboxes.append(MailboxStatus(name=name, state="error", last_error=error))
            mailboxes.sort(key=lambda m: m.name)
            accounts.append(
                AccountStatus(
                    name=daemon.account.name,
                    state=daemon.runtime.state,
                    error=daemon.runtime.error,
                    mailboxes=mailboxes,
                )
            )
        snapshot = DaemonStatus.for_this_process(self.config.path, started=self.started)
        snapshot.accounts = accounts
        snapshot.updated = time.time()
        return snapshot

    def enable_status_file(self) -> None:
        self._status_file = StatusFile.for_config(self.config)

    # -- reloading --------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGHUP re-reads the config (SIGTERM and SIGINT are Twisted's: they stop the reactor)."""

        def on_hup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reload)

        signal.signal(signal.SIGHUP, on_hup)

    def reload(self) -> defer.Deferred[None]:
        if self._reloading is not None:
            return self._reloading  # one at a time; the running one reads the newest file
        self._reloading = defer.Deferred.fromCoroutine(self._reload())

        def done(result: Any) -> Any:
            self._reloading = None
            return result

        return self._reloading.addBoth(done)

    async def _reload(self) -> None:
        self.notifier.reloading("reloading the config")
        log.info("SIGHUP: reloading %s", self.config.path)
        try:
            new = load_config(self.config.path)
        except ConfigError as e:
            log.error("the new config is not valid; keeping the old one: %s", e)
            self.notifier.ready(self.status_line())
            return
        for warning in new.warnings:
            log.warning("%s", warning)
        if new.state_dir != self.config.state_dir:
            log.error("state_dir cannot change while running; restart mirrord to move it (keeping %s)",
                      self.config.state_dir)
            new = Config(new.path, self.config.state_dir, new.accounts, new.warnings)
        old = {a.name: a for a in self.config.accounts}
        fresh = {a.name: a for a in new.accounts}
        going = [name for name in old if name not in fresh or fresh[name] != old[name]]
        coming = [fresh[name] for name in fresh if name not in old or fresh[name] != old[name]]
        for name in going:
            log.info("%s: %s", name, "removed from the config" if name not in fresh else "settings changed; restarting it")
            await self.accounts.pop(name).stop()
            hook = self.hooks.pop(name, None)
            if hook is not None:
                hook.stop()
            if name not in fresh:
                self.locks.pop(name).release()
        new_locks = lock_accounts(new, [a for a in coming if a.name not in self.locks])
        self.locks.update(new_locks)
        self.config = new
        starting = []
        for account in coming:
            self.accounts[account.name] = self._account(account)
            starting.append(self.accounts[account.name].start())
        self._publish()
        await defer.DeferredList(starting, consumeErrors=True)
        log.info("config reloaded: %s (%d restarted or added, %d removed)",
                 plural(len(self.accounts), "account"), len(coming), len([n for n in going if n not in fresh]))
        self._publisher.flush()
        self.notifier.ready(self.status_line())

    # -- stopping ----------------------------------------------------------------------

    async def stop(self) -> None:
        self.notifier.stopping("stopping")
        log.info("stopping")
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        self._publisher.stop()
        for hook in self.hooks.values():
            hook.stop()
        if self._jumps is not None:
            self._jumps.stop()
        await defer.DeferredList(
            [defer.Deferred.fromCoroutine(d.stop()) for d in self.accounts.values()], consumeErrors=True
        )
        if self._status_file is not None:
            self._status_file.remove()
        self.state.close()
        for lock in self.locks.values():
            lock.release()
        log.info("stopped")
