"""Polling the mailboxes that have no watcher: one command for all of them, a sync only where something moved.

An account with 200 folders and a cap of 10 connections cannot give each
its own IDLE watcher. The old way (a full sync of every unwatched mailbox
every ``poll_interval``) costs an EXAMINE and a listing per mailbox per
round. Here one worker asks the server for every polled mailbox's figures
at once:

- ``LIST "" "*" RETURN (STATUS (...))`` (RFC 5819 LIST-STATUS) where the
  server offers it: one command, one round trip;
- otherwise one ``STATUS`` per mailbox, all pipelined: still one round trip.

The figures are ``MESSAGES UIDNEXT UIDVALIDITY``, plus ``HIGHESTMODSEQ``
where the server has CONDSTORE (it moves on every flag change and expunge,
too). A mailbox whose figures differ from the last round's gets a full sync
(:meth:`LiveMailbox.poll`: with QRESYNC one EXAMINE that brings what
changed). A mailbox seen for the first time has nothing to compare with and
is synced: its figures are read before its sync starts, so a change in
between is seen by the sync or by the next round.

Without HIGHESTMODSEQ a flag change moves none of the figures: such a
mailbox is also synced in full when its last sync is ``full_every`` old
(the old poll interval, 5 minutes), so flags still follow.

The poller borrows a worker for each round (it uses no connection of its
own, so the watchers keep the budget), and never fetches: the mailbox's
sync does, on the worker pool, as for a watcher's events.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from mirrord.pool import Worker, WorkerPool
from mirrord.protocol.errors import describe_failure
from mirrord.timers import CoalescedLoop

log = logging.getLogger("mirrord.poller")

FULL_EVERY = 300.0
"""Seconds after which a polled mailbox is synced in full even if its figures did not move,
where the server has no HIGHESTMODSEQ to show flag changes."""

BASE_ITEMS = ("MESSAGES", "UIDNEXT", "UIDVALIDITY")


class Pollable(Protocol):
    """What the poller needs of a mailbox's listener (:class:`~mirrord.sync.live.LiveMailbox` has it)."""

    def poll(self) -> None: ...


Figures = tuple[tuple[str, int], ...]


def moved(before: Figures | None, now: Figures | None) -> bool:
    """Whether a mailbox needs a sync: no earlier figures, none now (so: ask), or any differs."""
    return before is None or now is None or before != now


@dataclass
class _Entry:
    raw_name: bytes
    listener: Pollable
    figures: Figures | None = None
    last_sync: float | None = None
    running: bool = True


class PolledMailbox:
    """One mailbox's place in the poller; ``running``/``stop()`` as a periodic loop's, for the daemon."""

    def __init__(self, poller: StatusPoller, name: str) -> None:
        self._poller = poller
        self.name = name

    @property
    def running(self) -> bool:
        entry = self._poller._entries.get(self.name)
        return entry is not None and entry.running

    def stop(self) -> None:
        self._poller.remove(self.name)

    def describe(self) -> str:
        return self._poller.describe()


class StatusPoller:
    """Polls an account's unwatched mailboxes with one command per round; see the module docstring."""

    def __init__(
        self,
        pool: WorkerPool,
        clock: IReactorTime,
        interval: float,
        *,
        label: str,
        full_every: float = FULL_EVERY,
        on_round: Callable[[], None] | None = None,
        on_names: Callable[[], None] | None = None,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.interval = interval
        self.label = label
        self.full_every = max(full_every, interval)
        self.on_round: Callable[[], None] = on_round or (lambda: None)
        """Called after each round (the daemon re-chooses its watched set then)."""
        self.on_names: Callable[[], None] = on_names or (lambda: None)
        """Called when a round suggests mailboxes were created, renamed or deleted: the daemon lists them anew."""
        self._listed: frozenset[bytes] | None = None
        self._entries: dict[str, _Entry] = {}
        self._loop = CoalescedLoop(clock, interval, self.round, label=f"{label}: polling")
        self._soon: IDelayedCall | None = None
        self._round: defer.Deferred[None] | None = None
        self._again = False
        self.method: str | None = None
        """LIST-STATUS or STATUS, once a round has run: `mirrord status` shows it."""
        self.rounds = 0
        self.notified = False
        """A NOTIFY connection reports these mailboxes' changes as they happen (`mirrord status` says so)."""

    # -- membership ---------------------------------------------------------------

    def add(self, name: str, raw_name: bytes, listener: Pollable) -> PolledMailbox:
        """Poll this mailbox from now on; its first look (figures, then a sync) comes at once."""
        self._entries[name] = _Entry(raw_name, listener)
        if not self._loop.running:
            self._loop.start(now=False)
        self.soon()
        return PolledMailbox(self, name)

    def remove(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            entry.running = False
        if not self._entries and self._loop.running:
            self._loop.stop()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> str:
        """How the polled mailboxes are polled, for `mirrord status`."""
        polled = f"{self.method or 'STATUS'} every {self.interval:g} s"
        return f"NOTIFY, {polled}" if self.notified else polled

    def changed(self, raw_name: bytes, figures: dict[str, int]) -> bool:
        """A server's word (a NOTIFY ``* STATUS``) that this mailbox's figures are now ``figures``.

        Figures of a polled mailbox that differ from the last ones known get
        it synced at once, as a round would. ``figures`` may be partial (a
        flag change reports HIGHESTMODSEQ alone): they are merged into what
        is known. True if the mailbox is polled here.
        """
        for name, entry in self._entries.items():
            if entry.raw_name == raw_name and entry.running:
                break
        else:
            return False
        known = dict(entry.figures or ())
        merged = {**known, **figures}
        if entry.figures is None or merged != known:
            entry.figures = tuple(sorted(merged.items()))
            entry.last_sync = self.clock.seconds()
            log.debug("%s/%s: changed on the server: %s", self.label, name, figures)
            entry.listener.poll()
        return True

    # -- rounds ------------------------------------------------------------------------

    def soon(self) -> None:
        """A round at the next turn of the reactor: many mailboxes added together share it."""
        if self._soon is None or not self._soon.active():
            self._soon = self.clock.callLater(0, self.round)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        for entry in self._entries.values():
            entry.running = False
        self._entries.clear()

    def round(self) -> defer.Deferred[None]:
        """Look at every polled mailbox once; a round asked for while one runs follows it."""
        if self._round is not None:
            self._again = True
            return self._round
        running = defer.Deferred.fromCoroutine(self._rounds())
        if not running.called:  # (a round without I/O is over before fromCoroutine returns)
            self._round = running
        return running

    async def _rounds(self) -> None:
        try:
            while True:
                self._again = False
                await self._one_round()
                if not self._again or not self._entries:
                    break
        finally:
            self._round = None

    async def _one_round(self) -> None:
        entries = dict(self._entries)
        if not entries or self.pool.closed:
            return
        try:
            found = await self.pool.run(lambda worker: self._ask(worker, entries), f"polling {len(entries)} mailboxes")
        except Exception as e:  # noqa: BLE001 - next round, then; the mailboxes' own syncs say more
            log.warning("%s: could not poll %d mailboxes: %s", self.label, len(entries), describe_failure(e))
            return
        self.rounds += 1
        self._names_moved(entries, found)
        now = self.clock.seconds()
        synced = []
        for name, entry in entries.items():
            if not entry.running:
                continue  # removed while the round ran
            figures = found.get(entry.raw_name)
            now_figures: Figures | None = tuple(sorted(figures.items())) if figures is not None else None
            stale = (
                entry.last_sync is not None
                and now_figures is not None
                and "HIGHESTMODSEQ" not in dict(now_figures)
                and now - entry.last_sync >= self.full_every
            )
            if moved(entry.figures, now_figures) or stale:
                entry.figures = now_figures
                entry.last_sync = now
                synced.append(name)
                entry.listener.poll()
        if synced:
            log.debug("%s: %s: figures moved in %d of %d polled mailboxes: %s", self.label, self.method,
                      len(synced), len(entries), ", ".join(synced[:20]))
        self.on_round()

    def _names_moved(self, entries: dict[str, _Entry], found: dict[bytes, dict[str, int]]) -> None:
        """A LIST-STATUS that lists other names than the last one, or a polled mailbox STATUS did not
        find: a mailbox was created, renamed or deleted on the server."""
        if self.method == "LIST-STATUS":
            listed = frozenset(found)
            moved_names = self._listed is not None and listed != self._listed
            self._listed = listed
        else:
            moved_names = any(e.raw_name not in found for e in entries.values() if e.running)
        if moved_names:
            log.debug("%s: the server's mailboxes changed: listing them again", self.label)
            self.on_names()

    async def _ask(self, worker: Worker, entries: dict[str, _Entry]) -> dict[bytes, dict[str, int]]:
        client = await worker.connection()
        items = [*BASE_ITEMS, *(["HIGHESTMODSEQ"] if "CONDSTORE" in client.capabilities else [])]
        method = "LIST-STATUS" if "LIST-STATUS" in client.capabilities else "STATUS"
        if method != self.method:
            self.method = method
            log.info("%s: polling the mailboxes without a watcher with %s every %g s", self.label,
                     "one LIST-STATUS" if method == "LIST-STATUS" else "pipelined STATUS", self.interval)
        if method == "LIST-STATUS":
            return await client.list_status(items)
        return await client.status_many([e.raw_name for e in entries.values()], items)
