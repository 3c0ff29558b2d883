"""Small filesystem helpers shared by the store and the status file, and the fsync threads."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool

T = TypeVar("T")

PRIVATE_DIR_MODE = 0o700


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents 0700; leave existing ones alone.

    An existing parent may be ``$XDG_RUNTIME_DIR`` or the user's home, whose
    modes are not ours to change. The chmod is needed because mkdir's mode
    is filtered by the umask.
    """
    missing: list[Path] = []
    p = Path(path)
    while not p.exists() and p.parent != p:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(d, PRIVATE_DIR_MODE)


FSYNC_THREADS = 8
"""Threads that fsync message files. An fsync waits for the disk, not the CPU,
and concurrent ones share journal commits (ext4: 1 thread ~0.7 ms per small
file, 8 threads ~0.15 ms), so a handful of threads multiplies throughput."""

MAX_UNSYNCED = 256
"""Most files waiting for a thread's fsync; beyond it the caller fsyncs in
place. This keeps open descriptors bounded when the disk is slower than the
network, and slows the reader down the way a synchronous fsync always did."""


class Syncer:
    """Runs blocking durability calls (fsync) in a small pool of threads.

    The reactor thread must not wait for the disk: while it does, no
    connection is read. Results come back as Deferreds fired on the reactor
    thread, so the caller's ordering (rename after fsync, commit after the
    directory fsync) is expressed by chaining on them.
    """

    def __init__(self, reactor: Any, threads: int = FSYNC_THREADS, max_pending: int = MAX_UNSYNCED) -> None:
        self._reactor = reactor
        self._threads = threads
        self._max_pending = max_pending
        self._pool: Any = None
        self.pending = 0
        """Calls submitted and not yet finished."""

    def run(self, fn: Callable[[], T]) -> Deferred[T]:
        """``fn()`` in a thread; in place (already fired) when too many are pending."""
        if self.pending >= self._max_pending:
            try:
                return succeed(fn())
            except BaseException:
                return fail()
        if self._pool is None:
            self._start()
        self.pending += 1

        def done(result: object) -> object:
            self.pending -= 1
            return result

        d: Deferred[T] = deferToThreadPool(self._reactor, self._pool, fn)
        d.addBoth(done)
        return d

    def _start(self) -> None:
        from twisted.python.threadpool import ThreadPool

        self._pool = ThreadPool(minthreads=0, maxthreads=self._threads, name="mirrord-fsync")
        # Daemon threads: code that used the syncer without ever running the
        # reactor to its shutdown (a test, a script) must still be able to
        # exit. Nothing is lost if one dies mid-fsync at exit: its file was
        # not renamed into place yet.
        self._pool.threadFactory = _daemon_thread
        self._pool.start()
        # Threads left running would keep the process from exiting.
        self._reactor.addSystemEventTrigger("during", "shutdown", self._stop)

    def _stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()  # waits for the calls in progress
            # Their results will never reach the stopped reactor: files that
            # were not delivered go, as a synchronous fsync's would have on
            # the connection's loss. Delivered ones wait for the next start's
            # recovery (pending rows), as always.
            from mirrord.store.maildir import abort_unfinished

            abort_unfinished()


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    return threading.Thread(*args, daemon=True, **kwargs)


class InlineSyncer:
    """A Syncer that runs every call in place: for tests and for code with no reactor."""

    pending = 0

    def run(self, fn: Callable[[], T]) -> Deferred[T]:
        try:
            return succeed(fn())
        except BaseException:
            return fail()


_syncer: Syncer | None = None


def default_syncer() -> Syncer:
    """The process's Syncer, on the global reactor."""
    global _syncer
    if _syncer is None:
        from twisted.internet import reactor

        _syncer = Syncer(reactor)
    return _syncer
