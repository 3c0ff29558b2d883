"""Keeping one mailbox current from its watcher's events.

A :class:`LiveMailbox` is the watcher's listener. Events may arrive at any
moment, including while a fetch or a full sync of the same mailbox runs; it
queues them and works through them one operation at a time, so two plans for
one mailbox never overlap (two overlapping fetches could both deliver the
same message). Local-only work (expunges, flag changes) goes first; then new
mail; a full sync when the watcher (re)connected or asked for one.

Expunges and flag changes wait a moment (``CHANGE_WINDOW``) before they are
applied: a burst of them (a reader marking a thread read, a filter moving
mail) then becomes one batch, one state transaction and one log line, not
one of each per message. Any other operation starting meanwhile takes them
along.

Events are idempotent against the state: an expunge of a UID we do not have
is nothing, a fetch starts above the highest UID we have. So applying them
after an operation that already saw their effect is harmless, and the queue
never has to reason about which came first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from mirrord.flags import Flags
from mirrord.protocol.errors import LoginFailed
from mirrord.sync.mailbox import LOGIN_RETRY_AFTER, MailboxResult, MailboxSync
from mirrord.watcher import Backoff

log = logging.getLogger("mirrord.sync")

RETRY_DELAY = 5.0
"""Seconds before the first retry of a failed operation; doubling up to RETRY_CAP."""
RETRY_CAP = 300.0
CHANGE_WINDOW = 0.1
"""Seconds that expunges and flag changes are gathered before being applied together."""


class LiveMailbox:
    """A mailbox's listener and operation queue; see the module docstring."""

    def __init__(
        self,
        sync: MailboxSync,
        clock: IReactorTime,
        *,
        on_new_mail: Callable[[MailboxResult], None] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.sync = sync
        self.label = sync.label
        self.clock = clock
        self.on_new_mail = on_new_mail
        self.on_change: Callable[[], None] = on_change or (lambda: None)
        """Called when busy, last_change or last_error may have changed (for `mirrord status`)."""
        self.last_change: float | None = None
        self.last_error: str | None = None
        self._full = False
        self._new = False
        self._expunged: set[int] = set()
        self._flags: dict[int, Flags] = {}
        self._busy = False
        self._retry: Any = None
        self._window: Any = None
        self._backoff = Backoff(first=RETRY_DELAY * 2, cap=RETRY_CAP)
        self._stopped = False
        self._idle_waiters: list[defer.Deferred[None]] = []
        self.lock = defer.DeferredLock()
        """Held for each operation, and by a two-way round over this mailbox
        (:mod:`mirrord.sync.livepush`): the two never overlap."""
        self.first_sync: defer.Deferred[None] = defer.Deferred()
        """Fires after the first full sync, or the first failure to get one going."""

    # -- MailboxEvents --------------------------------------------------------

    def watching(self) -> None:
        self._want_full()

    def new_messages(self) -> None:
        self._new = True
        self._kick()

    def expunged(self, uids: Sequence[int]) -> None:
        self._expunged.update(uids)
        for uid in uids:
            self._flags.pop(uid, None)
        self._gather()

    def flags_changed(self, changes: Mapping[int, Flags]) -> None:
        self._flags.update(changes)
        self._gather()

    def _gather(self) -> None:
        """Apply local changes when the window that this one opens (or joined) closes."""
        if self._window is None or not self._window.active():
            self._window = self.clock.callLater(CHANGE_WINDOW, self._window_closed)

    def _window_closed(self) -> None:
        self._window = None
        self._kick()

    def resync_needed(self, reason: str) -> None:
        log.info("%s: full sync: %s", self.label, reason)
        self._want_full()

    def disconnected(self, reason: str) -> None:
        self.last_error = reason
        self.on_change()
        self._first_done()

    def _first_done(self) -> None:
        if not self.first_sync.called:
            self.first_sync.callback(None)

    # -- polling (mailboxes without a watcher) ---------------------------------

    def poll(self) -> None:
        self._want_full()

    # -- the queue ------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._busy

    def when_idle(self) -> defer.Deferred[None]:
        """Fires when the operation in hand and those queued behind it are done."""
        if not self._busy:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def stop(self) -> defer.Deferred[None]:
        """Take no new work; fires when the operation in hand (a write, say) is done."""
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._window is not None and self._window.active():
            # Not lost: the next start's full sync compares every flag.
            self._window.cancel()
        return self.when_idle()

    def _want_full(self) -> None:
        self._full = True
        self._new = False  # a full sync fetches everything new too
        self._kick()

    def _pending(self) -> bool:
        return self._full or self._new or bool(self._expunged) or bool(self._flags)

    def _kick(self) -> None:
        if self._stopped or self._busy or (self._retry is not None and self._retry.active()):
            return
        if not self._pending():
            return
        # _busy, not the Deferred, says whether work is in hand: an operation
        # that needs no I/O completes inside fromCoroutine, before it returns.
        self._busy = True
        self.on_change()
        defer.Deferred.fromCoroutine(self._work())

    async def _work(self) -> None:
        try:
            while self._pending() and not self._stopped:
                await self.lock.acquire()
                try:
                    await self._one()
                finally:
                    self.lock.release()
                self.on_change()
        except Exception as e:  # noqa: BLE001 - one mailbox's trouble stays its own
            self._first_done()
            self.last_error = str(e) or type(e).__name__
            floor = e.retry_after if isinstance(e, _Retry) else LOGIN_RETRY_AFTER if isinstance(e, LoginFailed) else 0.0
            delay = self._backoff.next(floor=floor)
            if isinstance(e, _Retry):  # already logged by the sync
                log.info("%s: retrying in %.0f s", self.label, delay)
            else:
                log.error("%s: %s; retrying in %.0f s", self.label, self.last_error, delay)
            self._full = True
            self._retry = self.clock.callLater(delay, self._kick)
        finally:
            self._busy = False
            self.on_change()
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    async def _one(self) -> None:
        if self._expunged or self._flags:
            expunged, self._expunged = sorted(self._expunged), set()
            flags, self._flags = self._flags, {}
            result = self.sync.apply_changes(expunged, flags)
            if result.removed or result.flags_changed:
                self.last_change = self.clock.seconds()
            return
        if self._full:
            self._full = False
            self._new = False
            try:
                result = await self.sync.run()
            except BaseException:
                self._first_done()
                raise
            # What the first sync brought is reported before the first sync
            # counts as done: whoever waits for it sees it as old news.
            self._noticed(result)
            self._first_done()
            self.last_error = result.error
            if result.error and not result.needs_user:
                raise _Retry(result.error, result.retry_after)
            self._backoff.reset()
            return
        if self._new:
            self._new = False
            result = await self.sync.fetch_new()
            self._noticed(result)

    def _noticed(self, result: MailboxResult) -> None:
        if result.fetched or result.removed or result.flags_changed:
            self.last_change = self.clock.seconds()
        # Not for the first sync: a fresh mirror (or one that was down a
        # week) is not "new mail" to notify about or index message by message.
        if result.fetched and self.on_new_mail is not None and self.first_sync.called:
            self.on_new_mail(result)


class _Retry(Exception):
    """A full sync failed in a way that retrying may fix."""

    def __init__(self, error: str, retry_after: float = 0.0) -> None:
        super().__init__(error)
        self.retry_after = retry_after
