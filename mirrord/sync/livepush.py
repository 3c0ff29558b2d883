"""The daemon's two-way half: a reader's change reaches the server within a second.

:class:`~mirrord.localwatch.LocalChangeWatcher` hears which folders a reader
touched (inotify, debounced); :class:`LocalPush` gathers them and runs one
:class:`~mirrord.sync.pushing.Pusher` round at a time over every folder
touched so far, so that a move's two halves (gone from one folder, new in
another) are seen in one round and become a ``UID MOVE``, not a deletion
and an upload.

A round holds the operation lock of each of its folders' LiveMailbox: no
fetch of those folders runs meanwhile. Without it a fetch that follows the
watcher's EXISTS for our own APPEND could record the message before the
round does, and the mirror would hold it twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from mirrord.localwatch import LocalChangeWatcher, Notifier
from mirrord.sync.live import LiveMailbox
from mirrord.sync.pushing import Pusher, PushResult
from mirrord.watcher import Backoff

log = logging.getLogger("mirrord.sync")

RETRY_FIRST = 5.0
RETRY_CAP = 300.0


class LocalPush:
    """One account's local changes, sent as they happen; see the module docstring."""

    def __init__(
        self,
        pusher: Pusher,
        clock: IReactorTime,
        mailboxes: Callable[[], Mapping[str, LiveMailbox]],
        notifier: Notifier | None,
        *,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.pusher = pusher
        self.clock = clock
        self.mailboxes = mailboxes
        self.on_change = on_change
        self.watcher = LocalChangeWatcher(clock, self.changed, notifier)
        self.refused: dict[str, str] = {}
        """Folder -> why its local changes wait for the user (shown by `status`)."""
        self.last_error: str | None = None
        self.last_round: PushResult | None = None
        self._dirty: set[str] = set()
        self._busy = False
        self._stopped = False
        self._retry: IDelayedCall | None = None
        self._backoff = Backoff(first=RETRY_FIRST, cap=RETRY_CAP)
        self._idle: list[defer.Deferred[None]] = []

    def watch(self, name: str) -> None:
        """Hear of a reader's changes to ``name``'s Maildir, and look at it once now."""
        folder = self.pusher.folders.get(name)
        if folder is None:
            return
        self.watcher.watch(name, folder.path)
        live = self.mailboxes().get(name)
        if live is not None:
            live.sync.own_changes = _OwnChanges(self.watcher, name)
        self.changed(name)

    async def forget(self, name: str) -> None:
        """``name`` is no longer mirrored (gone from the server): stop watching it,
        and return once no round that may look at it is running."""
        self.watcher.unwatch(name)
        self._dirty.discard(name)
        await self.when_idle()
        self.pusher.folders.pop(name, None)
        self.refused.pop(name, None)

    def changed(self, name: str) -> None:
        self._dirty.add(name)
        self._kick()

    def when_idle(self) -> defer.Deferred[None]:
        if not self._busy:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._idle.append(waiter)
        return waiter

    def stop(self) -> defer.Deferred[None]:
        self._stopped = True
        self.watcher.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        return self.when_idle()

    def _kick(self) -> None:
        if self._stopped or self._busy or not self._dirty:
            return
        if self._retry is not None and self._retry.active():
            return
        self._busy = True
        # On the next turn, not now: every folder the watcher names in this
        # turn joins the round (a move's two halves must be seen together).
        self.clock.callLater(0, self._start)

    def _start(self) -> None:
        defer.Deferred.fromCoroutine(self._work())

    async def _work(self) -> None:
        try:
            while self._dirty and not self._stopped:
                names = sorted(self._dirty)
                self._dirty.clear()
                if not await self._one(names):
                    break
        finally:
            self._busy = False
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)

    async def _one(self, names: list[str]) -> bool:
        """One round; False when it failed and a retry is scheduled."""
        lives = self.mailboxes()
        locks = [lives[n].lock for n in names if n in lives]
        held = []
        try:
            for lock in locks:  # always in name order: two holders never wait on each other
                await lock.acquire()
                held.append(lock)
            log.debug("%s: looking for local changes in %s", self.pusher.account.name, ", ".join(names))
            result = await self.pusher.round(names)
        except Exception as e:  # noqa: BLE001 - the next change, or the retry, tries again
            self._dirty.update(names)
            self.last_error = str(e) or type(e).__name__
            delay = self._backoff.next()
            log.warning("%s: could not send local changes (%s); trying again in %.0f s",
                        self.pusher.account.name, self.last_error, delay)
            self._retry = self.clock.callLater(delay, self._kick)
            self.on_change()
            return False
        finally:
            for lock in held:
                lock.release()
        self._backoff.reset()
        self.last_error = None
        self.last_round = result
        for name in names:
            if name not in result.refused:
                self.refused.pop(name, None)
        self.refused.update(result.refused)
        for name in result.refetch:
            live = lives.get(name)
            if live is not None:
                live.resync_needed("fetching back messages the server keeps")
        self.on_change()
        return True


class _OwnChanges:
    """One mailbox's announcements of the pull's own changes to the local change watcher."""

    def __init__(self, watcher: LocalChangeWatcher, name: str) -> None:
        self.watcher = watcher
        self.name = name

    def delivering(self, keys: Iterable[str]) -> None:
        self.watcher.delivering(self.name, keys)

    def ours(self, filenames: Iterable[str]) -> None:
        self.watcher.ours(self.name, filenames)
