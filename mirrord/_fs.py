"""The fsync threads (private directories are in `_dirs`, which needs no Twisted)."""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure


T = TypeVar("T")

_LOOK: Any = object()
"""Queued by ``run(first=True)``: wakes a thread to look at the calls that go first."""

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

    A lean pool rather than Twisted's ThreadPool: a first sync fires
    thousands of these calls, and ThreadPool's per-call context, worker
    coordination and one ``callFromThread`` (one reactor wake-up) per
    result cost the reactor thread more CPU than the fsyncs themselves.
    Here results are collected in a list and the reactor is woken once for
    all that finished while it was busy.
    """

    def __init__(self, reactor: Any, threads: int = FSYNC_THREADS, max_pending: int = MAX_UNSYNCED) -> None:
        self._reactor = reactor
        self._threads = threads
        self._max_pending = max_pending
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Deferred[Any]] | None] | None = None
        self._first: collections.deque[tuple[Callable[[], Any], Deferred[Any]]] = collections.deque()
        """Calls to run before anything queued (``run(first=True)``); each thread looks here before each call."""
        self._workers: list[threading.Thread] = []
        self._done: list[tuple[Deferred[Any], bool, Any]] = []
        self._done_lock = threading.Lock()
        self.pending = 0
        """Calls submitted and not yet finished."""

    def run(self, fn: Callable[[], T], *, first: bool = False) -> Deferred[T]:
        """``fn()`` in a thread; in place (already fired) when too many are pending.

        ``first``: taken by the next thread that is or becomes free, ahead of
        the calls already queued. For work that keeps the reactor thread
        from waiting (tmp/ files made ahead), which behind a queue of fsyncs
        came too late: a first sync of 10,000 messages made a fifth of its
        files on the reactor thread, each creation 30-500 us it read nothing.
        """
        if self.pending >= self._max_pending:
            try:
                return succeed(fn())
            except BaseException:
                return fail()
        if self._queue is None:
            self._start()
        assert self._queue is not None
        self.pending += 1
        d: Deferred[T] = Deferred()
        if first:
            self._first.append((fn, d))
            self._queue.put(_LOOK)  # wakes a thread if all of them are idle
        else:
            self._queue.put((fn, d))
        return d

    def _start(self) -> None:
        self._queue = queue.SimpleQueue()
        for n in range(self._threads):
            # Daemon threads: code that used the syncer without ever running
            # the reactor to its shutdown (a test, a script) must still be
            # able to exit. Nothing is lost if one dies mid-fsync at exit:
            # its file was not renamed into place yet.
            t = threading.Thread(target=self._work, name=f"mirrord-fsync-{n}", daemon=True)
            t.start()
            self._workers.append(t)
        # Threads left running would keep the process from exiting.
        self._reactor.addSystemEventTrigger("during", "shutdown", self._stop)

    def _work(self) -> None:
        q = self._queue
        first = self._first
        assert q is not None
        while True:
            item = q.get()
            if item is None:
                return
            while first:
                try:
                    job = first.popleft()
                except IndexError:  # another thread took it
                    break
                self._call(job)
            if item is not _LOOK:
                self._call(item)  # type: ignore[arg-type]

    def _call(self, item: tuple[Callable[[], Any], Deferred[Any]]) -> None:
        fn, d = item
        try:
            outcome: tuple[Deferred[Any], bool, Any] = (d, True, fn())
        except BaseException:
            outcome = (d, False, Failure())
        with self._done_lock:
            wake = not self._done
            self._done.append(outcome)
        if wake:
            # The first result since the reactor last collected: one
            # wake-up brings it and all that finish before it runs.
            try:
                self._reactor.callFromThread(self._deliver)
            except BaseException:  # noqa: BLE001 - the reactor is gone: nobody waits for it
                pass

    def _deliver(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
        for d, ok, value in done:
            self.pending -= 1
            if ok:
                d.callback(value)
            else:
                d.errback(value)

    def join(self) -> None:
        """Stop the threads: calls in progress finish, those not started are dropped."""
        q, self._queue = self._queue, None
        workers, self._workers = self._workers, []
        if q is None:
            return
        while True:
            try:
                q.get_nowait()
            except queue.Empty:
                break
        self._first.clear()
        for _ in workers:
            q.put(None)
        for t in workers:
            t.join()

    def _stop(self) -> None:
        self.join()
        # Their results will never reach the stopped reactor: files that
        # were not delivered go, as a synchronous fsync's would have on
        # the connection's loss. Delivered ones wait for the next start's
        # recovery (pending rows), as always.
        from mirrord.store.maildir import abort_unfinished

        abort_unfinished()


class InlineSyncer:
    """A Syncer that runs every call in place: for tests and for code with no reactor."""

    pending = 0

    def run(self, fn: Callable[[], T], *, first: bool = False) -> Deferred[T]:
        try:
            return succeed(fn())
        except BaseException:
            return fail()


def give_back_free_memory() -> None:
    """Hand the C heap's free pages back to the system, where the C library can (glibc).

    A first sync's bodies pass through the heap in pieces of up to 512 KB (a read);
    once they are freed, glibc keeps the pages unless they are at its very
    top, and what Python allocates next (small objects, in arenas of their
    own) cannot use them. Given back after a mailbox's fetch, they no
    longer add to whatever comes next (a 10,000-message first sync: its
    peak RSS 3 MB lower). A few milliseconds at most, once per fetch.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes  # already loaded by Twisted's TLS; nothing new to import

        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError):  # not glibc (musl, macOS): nothing to do
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None

_syncer: Syncer | None = None


def default_syncer() -> Syncer:
    """The process's Syncer, on the global reactor."""
    global _syncer
    if _syncer is None:
        from twisted.internet import reactor

        _syncer = Syncer(reactor)
    return _syncer
