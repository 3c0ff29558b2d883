"""Noticing what mail readers do to the Maildir, as it happens.

A two-way mirror has to hear about a reader's rename (a flag change), unlink
(a deletion) or new file (a saved copy) within a second, and a daemon should
not list thousands of files every second to find out. The kernel tells us:
one inotify watch on each mirrored folder's ``new/`` and ``cur/``.

This module only *notices*. What a change means is decided by comparing a
scan of the folder with the state (the sync engine's job), so an event here
carries no more than "look at this mailbox". That keeps it robust against
what inotify cannot promise: a queue overflow, a rename whose two halves
land in different reads, a directory removed and made again. Each of those
simply asks for a look.

Bursts are debounced: a reader that renames 200 files as you tag a thread
gets one look, ``DEBOUNCE`` after the last event and never later than
``MAX_WAIT`` after the first (a steady stream does not starve the server of
changes). Files mirrord itself is about to create, rename or remove can be
announced with :meth:`LocalChangeWatcher.ours`; their events are consumed
without asking for a look. That is an economy, not a correctness need: a
look after mirrord's own change finds nothing to do, because the mailbox's
operations run one at a time and the state is current when the look runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.filepath import FilePath

log = logging.getLogger("mirrord.localwatch")

DEBOUNCE = 0.2
"""Seconds of quiet after a reader's last change before the mailbox is looked at."""
MAX_WAIT = 1.0
"""A look happens at most this long after the first change of a burst, quiet or not."""
OURS_TTL = 30.0
"""How long an announced own change waits for its event before it is forgotten."""

# inotify masks, as the kernel defines them (linux/inotify.h); repeated here
# so that importing this module works where twisted.internet.inotify cannot.
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ISDIR = 0x40000000

WATCH_MASK = (
    IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT
)
_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED


class Notifier(Protocol):
    """The part of :class:`twisted.internet.inotify.INotify` we use (a fake in tests)."""

    def watch(
        self, path: FilePath[Any], mask: int = ..., autoAdd: bool = ..., callbacks: Any = ..., recursive: bool = ...
    ) -> Any: ...

    def ignore(self, path: FilePath[Any]) -> None: ...

    def loseConnection(self) -> None: ...


def default_notifier() -> Notifier | None:
    """The kernel's inotify through Twisted, or None where there is none (not Linux)."""
    try:
        from twisted.internet import inotify

        notifier = inotify.INotify()
        notifier.startReading()
        return notifier
    except Exception as e:  # noqa: BLE001 - no inotify: the caller falls back to polling
        log.warning("cannot watch the Maildir for local changes (%s); they are noticed at each sync", e)
        return None


class LocalChangeWatcher:
    """Tells ``changed(mailbox)`` when a reader touched that mailbox's Maildir."""

    def __init__(
        self,
        clock: IReactorTime,
        changed: Callable[[str], None],
        notifier: Notifier | None,
        *,
        debounce: float = DEBOUNCE,
        max_wait: float = MAX_WAIT,
    ) -> None:
        self.clock = clock
        self.changed = changed
        self.notifier = notifier
        self.debounce = debounce
        self.max_wait = max_wait
        self._dirs: dict[bytes, str] = {}
        """Watched directory (as bytes, the way inotify names it) -> mailbox."""
        self._by_mailbox: dict[str, list[FilePath[Any]]] = {}
        self._timer: IDelayedCall | None = None
        """One timer for the account, not one per mailbox: a move's two halves
        (gone from one folder, new in another) are told in one go, and become
        one round that sees a move rather than a deletion and an upload."""
        self._first: float | None = None
        self._pending: set[str] = set()
        self._ours: dict[tuple[str, str], float] = {}
        """(mailbox, file name) -> until when an event for it is ours to ignore."""
        self._delivering: dict[tuple[str, str], float] = {}
        """(mailbox, key) -> until when the first event for a file of that key is ours to ignore."""

    @property
    def active(self) -> bool:
        return self.notifier is not None

    def watch(self, mailbox: str, path: Path) -> None:
        """Watch ``path``'s ``new/`` and ``cur/`` on behalf of ``mailbox``."""
        if self.notifier is None or mailbox in self._by_mailbox:
            return
        watched: list[FilePath[Any]] = []
        for sub in ("new", "cur"):
            fp = FilePath(str(path / sub)).asBytesMode()
            try:
                self.notifier.watch(fp, mask=WATCH_MASK, callbacks=[self._event])
            except Exception as e:  # noqa: BLE001 - e.g. the per-user watch limit
                log.warning("%s: cannot watch %s for local changes (%s); they are noticed at each sync",
                            mailbox, fp.path.decode(errors="replace"), e)
                continue
            self._dirs[fp.path] = mailbox
            watched.append(fp)
        self._by_mailbox[mailbox] = watched

    def unwatch(self, mailbox: str) -> None:
        for fp in self._by_mailbox.pop(mailbox, []):
            self._dirs.pop(fp.path, None)
            if self.notifier is not None:
                try:
                    self.notifier.ignore(fp)
                except KeyError:
                    pass  # the kernel dropped the watch already (directory gone)
        self._pending.discard(mailbox)
        if not self._pending and self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._timer = None
            self._first = None
        self._ours = {k: v for k, v in self._ours.items() if k[0] != mailbox}
        self._delivering = {k: v for k, v in self._delivering.items() if k[0] != mailbox}

    def stop(self) -> None:
        for mailbox in list(self._by_mailbox):
            self.unwatch(mailbox)
        if self.notifier is not None:
            self.notifier.loseConnection()
            self.notifier = None

    def ours(self, mailbox: str, filenames: Iterable[str]) -> None:
        """mirrord is about to create, rename or remove these files of ``mailbox``."""
        until = self.clock.seconds() + OURS_TTL
        for name in filenames:
            self._ours[(mailbox, name)] = until

    def delivering(self, mailbox: str, keys: Iterable[str]) -> None:
        """mirrord is about to put new files with these keys into ``mailbox``'s new/ or cur/.

        By key, not by name: where a delivery lands and what letters its
        name carries is the Maildir's business. One rename into place is one
        event; the first event naming the key consumes the announcement, so
        a reader's later rename or deletion of that file is the reader's.
        Without this, every message a daemon fetched made the two-way round
        list the folder and read all its rows: at 100,000 messages, about
        1 s of CPU and 90 MB at each new message (issue #15).
        """
        now = self.clock.seconds()
        if len(self._delivering) > 4096:  # bodies aborted before delivery leave theirs behind
            self._delivering = {k: v for k, v in self._delivering.items() if v >= now}
        until = now + OURS_TTL
        for key in keys:
            self._delivering[(mailbox, key)] = until

    # -- events ---------------------------------------------------------------

    def _event(self, _watch: Any, path: FilePath[Any], mask: int) -> None:
        if mask & IN_Q_OVERFLOW:
            # Events were lost: every mailbox may have changed.
            for mailbox in self._by_mailbox:
                self._schedule(mailbox)
            return
        path_bytes = path.asBytesMode()
        parent = path_bytes.parent().path
        mailbox = self._dirs.get(path_bytes.path) if mask & _GONE else self._dirs.get(parent)
        if mailbox is None:
            return
        if mask & _GONE:
            # new/ or cur/ itself went away: the look finds out what that means
            # (and the guard against a vanished folder applies there).
            self._schedule(mailbox)
            return
        if mask & IN_ISDIR:
            return
        name = path_bytes.basename().decode("utf-8", "surrogateescape")
        key = (mailbox, name)
        until = self._ours.get(key)
        if until is not None:
            if until >= self.clock.seconds():
                # One of ours: a rename reports both halves, each with its own name.
                del self._ours[key]
                return
            del self._ours[key]
        if self._delivering:
            until = self._delivering.pop((mailbox, name.split(":", 1)[0]), None)
            if until is not None and until >= self.clock.seconds():
                return
        self._schedule(mailbox)

    def _schedule(self, mailbox: str) -> None:
        now = self.clock.seconds()
        self._pending.add(mailbox)
        if self._first is None:
            self._first = now
        when = min(now + self.debounce, self._first + self.max_wait)
        if self._timer is not None and self._timer.active():
            self._timer.reset(max(0.0, when - now))
            return
        self._timer = self.clock.callLater(max(0.0, when - now), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._first = None
        now = self.clock.seconds()
        self._ours = {k: v for k, v in self._ours.items() if v >= now}
        if self._delivering:
            self._delivering = {k: v for k, v in self._delivering.items() if v >= now}
        pending, self._pending = self._pending, set()
        for mailbox in sorted(pending):
            if mailbox in self._by_mailbox:
                self.changed(mailbox)

NEW_FOLDER_DELAY = 1.0
"""Seconds after a directory appears before the tree is looked at: a reader
makes ``Projects/new/{cur,new,tmp}`` in several steps."""

_DIR_MASK = IN_CREATE | IN_MOVED_TO


class NewFolderWatcher:
    """Tells ``appeared()`` when a directory is made under the mirror root (two-way: a new folder).

    One watch on the root and on each directory below it that is not a
    Maildir's own ``cur``/``new``/``tmp`` (so message files, which come and
    go all the time, cause no events here); a directory made later gets its
    watch when it appears. The look itself (which folders are new, whether
    to create them) is :mod:`mirrord.sync.newfolders`'s.
    """

    def __init__(
        self, clock: IReactorTime, appeared: Callable[[], None], notifier: Notifier | None,
        *, delay: float = NEW_FOLDER_DELAY,
    ) -> None:
        self.clock = clock
        self.appeared = appeared
        self.notifier = notifier
        self.delay = delay
        self._watched: set[bytes] = set()
        self._timer: IDelayedCall | None = None

    def watch_tree(self, root: Path) -> None:
        if self.notifier is None:
            return
        self._watch_dir(FilePath(str(root)).asBytesMode())

    def _watch_dir(self, fp: FilePath[Any]) -> None:
        if self.notifier is None or fp.path in self._watched or not fp.isdir():
            return
        try:
            self.notifier.watch(fp, mask=_DIR_MASK, callbacks=[self._event])
        except Exception as e:  # noqa: BLE001 - e.g. the per-user watch limit
            log.warning("cannot watch %s for new folders (%s); they are noticed at the next listing",
                        fp.path.decode(errors="replace"), e)
            return
        self._watched.add(fp.path)
        try:
            children = fp.children()
        except OSError:
            return
        for child in children:
            if child.basename() not in (b"cur", b"new", b"tmp") and not child.basename().startswith(b"."):
                self._watch_dir(child)

    def _event(self, _watch: Any, path: FilePath[Any], mask: int) -> None:
        if not mask & IN_ISDIR and not mask & IN_Q_OVERFLOW:
            return
        path = path.asBytesMode()
        if path.basename() not in (b"cur", b"new", b"tmp"):
            self._watch_dir(path)
        if self._timer is None or not self._timer.active():
            self._timer = self.clock.callLater(self.delay, self.appeared)
        else:
            self._timer.reset(self.delay)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.notifier is not None:
            self.notifier.loseConnection()
            self.notifier = None
