"""The fetch pipeline: message bodies from UID FETCH to durable, recorded files.

A plan's messages are cut into batches (:func:`batches`), one per worker at
a time; a catch-up's handful goes in one command on the worker that listed
(:meth:`FetchPipeline._fetch_few`). While a batch streams in, the syncer's
threads keep empty tmp/ files made ahead (the reserve) and fsync each body
as it completes, a few per thread call; every FLUSH_MESSAGES / FLUSH_BYTES
the bodies form a group that is recorded pending while their fsyncs run,
then renamed into place with one directory fsync, and promoted (``_receive``
-> ``_settle`` -> ``_record``). A retry after a cut connection fetches only what the state
does not have yet, and the state refuses a second file for one UID
(invariant 7): a body it refuses is aborted, never renamed into place.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from mirrord._fs import InlineSyncer, Syncer, give_back_free_memory
from mirrord.pool import Worker, WorkerPool
from mirrord.progress import Progress
from mirrord.protocol.client import FetchedMessage, ListEntry, ListingEntry, MirrordIMAP4Client
from mirrord.store.maildir import Maildir, TmpMessage
from mirrord.store.state import MessageRecord, StateDB
from mirrord.sync.engine import SyncPlan, UidValidityChanged
from mirrord.units import plural

if TYPE_CHECKING:
    from mirrord.flags import Flags
    from mirrord.sync.mailbox import MailboxResult

log = logging.getLogger("mirrord.sync")

BATCH_MESSAGES = 500
"""Most messages in one UID FETCH; bounds what a dropped connection costs."""
BATCH_BYTES = 32 * 1024 * 1024
"""Most bytes (by RFC822.SIZE) in one UID FETCH, so big mailboxes split across workers."""
RESERVE_TMP = 64
"""Empty tmp/ files kept made ahead, by the syncer's threads, while a batch is fetched."""
RESERVE_STEP = 16
"""Files one thread call makes: several calls run at once, and creation overlaps."""
SYNC_CHUNK = 8
"""Bodies fsynced by one thread call."""
NEW_MAIL_SYNC_CHUNK = 2
"""The same for a burst of new mail, where each millisecond is latency: more,
smaller calls spread its fsyncs over more of the syncer's threads. With the
pending rows committed beside them (``_settle``), a watcher's EXISTS to the
file under 50 arrivals a second went from 19.0-19.9 ms median to 14.0-14.8
(``bench_latency.py --scenario load``); either change alone made 17.5 and 19.9."""
DEFER_TAIL_BYTES = 1024 * 1024
"""A body's last buffered bytes (its tail, under 64 KB) are written by the
thread that fsyncs it rather than by the reactor thread, while the tails
waiting for such threads, across the process, stay under this many bytes.
A page-cache write takes CPU the reading thread can use; but a tail held
is memory, and counting calls instead of bytes (at most 32 calls of 8
tails) held 3 MB of a 10,000-message first sync's peak and could hold 16.
1 MB is about 64 messages of ordinary mail: enough to keep every fsync
thread's next call written for it."""
FLUSH_MESSAGES = 250
FLUSH_BYTES = 16 * 1024 * 1024
"""Within a batch, messages are renamed into place and recorded this often.
Each group costs two state commits on the reactor thread (the first
fsynced, 1-5 ms while the fsync threads keep the disk busy, and the
reactor reads nothing meanwhile) and two directory fsyncs; 250 messages or 16 MB keeps
that near 0.01 ms a message (a 10,000-message first sync: 43 groups instead
of 151), and what a crash makes us fetch again small."""
CATCHUP_FETCH_MESSAGES = BATCH_MESSAGES
"""At most this many messages (and BATCH_BYTES) to fetch in a catch-up go in one command,
on the worker that has the mailbox selected: one batch's worth. Spreading 100 new
messages over four workers cost three logins and three EXAMINEs, which Dovecot answers
by rescanning the whole Maildir for each new session (25-40 ms each at 10,000
messages), more than fetching them all on one connection (issue #15)."""


def batches(uids: Sequence[int], sizes: dict[int, int | None], workers: int = 1) -> list[list[int]]:
    """Split ``uids`` into UID FETCH batches bounded by count and by bytes.

    A mailbox smaller than a full batch per worker is still cut into one
    batch per worker, so that its first sync uses every connection.
    """
    total = len(uids)
    slots = max(1, min(workers, total))

    def limit(done: int, made: int) -> int:
        # What is left, spread over the workers not given a batch yet: 4
        # messages over 3 workers are 2 + 1 + 1, not 2 + 2.
        left = slots - made
        share = -(-(total - done) // left) if left > 0 else BATCH_MESSAGES
        return max(1, min(BATCH_MESSAGES, share))

    out: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    done = 0
    cap = limit(0, 0)
    for uid in uids:
        size = sizes.get(uid) or 0
        if current and (len(current) >= cap or current_bytes + size > BATCH_BYTES):
            out.append(current)
            done += len(current)
            current, current_bytes = [], 0
            cap = limit(done, len(out))
        current.append(uid)
        current_bytes += size
    if current:
        out.append(current)
    return out


def under_selection(
    worker: Worker, raw_name: bytes, uidvalidity: int, arrived: Callable[[FetchedMessage], None]
) -> Callable[[FetchedMessage], None]:
    """``arrived``, for bodies fetched behind an EXAMINE of ``raw_name`` expected at ``uidvalidity``.

    The EXAMINE's answer precedes the bodies; without it, or under another
    UIDVALIDITY, their UIDs name other mail, and nothing may be recorded.
    """

    def on_message(message: FetchedMessage) -> None:
        status = worker.status if worker.selected == raw_name else None
        if status is None:
            raise RuntimeError("the server sent messages before it answered EXAMINE")
        if status.uidvalidity != uidvalidity:
            raise UidValidityChanged(uidvalidity, status.uidvalidity)
        arrived(message)

    return on_message


def few(uids: Sequence[int], listing: dict[int, ListingEntry]) -> bool:
    """Whether ``uids`` are a catch-up's handful, fetched in one command (see ``_fetch_few``)."""
    if not uids or len(uids) > CATCHUP_FETCH_MESSAGES:
        return False
    return sum(listing[u].size or 0 for u in uids if u in listing) <= BATCH_BYTES


class _TailBudget:
    """Bytes of message tails held in memory for the syncer's threads to write (see DEFER_TAIL_BYTES).

    One for the process: every mailbox's fetch shares the bound. Touched on
    the reactor thread only (a syncer call's Deferred fires there).
    """

    def __init__(self) -> None:
        self.held = 0

    def hold(self, d: defer.Deferred[Any], size: int) -> None:
        """Count ``size`` bytes until the syncer call ``d`` has finished, one way or the other."""
        self.held += size

        def release(result: object) -> object:
            self.held -= size
            return result

        d.addBoth(release)


_tails = _TailBudget()


def _sync_all(bodies: list[Any]) -> list[tuple[Any, OSError]]:
    """fsync and close each body (in a syncer thread); returns those that failed, with why.

    One body's failure (no space for its tail, an fsync error) does not stop
    the others: each file is durable or not on its own, and the ones that
    are can be kept. On a nearly full disk that is the difference between
    a first sync that makes progress and one that never does (a group can
    hold more than the free space).
    """
    failed: list[tuple[Any, OSError]] = []
    for body in bodies:
        try:
            body.sync()
        except OSError as e:
            failed.append((body, e))
    return failed


def _sync_and_deliver(maildir: Maildir, items: list[tuple[Any, Flags]]) -> list[tuple[Any, OSError]]:
    """fsync the bodies not durable yet, then rename those that are into place (one syncer call).

    For new mail: one hand-off to a thread and back instead of two (an fsync
    call, then a delivery call): half a millisecond to a millisecond of the
    push path (issue #15). A body whose write or fsync fails is left out of
    the delivery (and returned, with why); the others are delivered.
    """
    failed = _sync_all([body for body, _ in items])
    if failed:
        bad = {id(body) for body, _ in failed}
        items = [(body, flags) for body, flags in items if id(body) not in bad]
    if items:
        maildir.deliver_many(items)
    return failed


class FetchPipeline:
    """The fetching half of :class:`~mirrord.sync.mailbox.MailboxSync` (a mixin: it shares its attributes)."""

    account: str
    name: str
    label: str
    entry: ListEntry
    maildir: Maildir
    state: StateDB
    pool: WorkerPool
    progress: Progress | None
    syncer: Syncer | InlineSyncer
    """Where message files are fsynced: threads, off the reactor."""
    _reserving: list[defer.Deferred[None]]
    """Calls making tmp/ files ahead, in the syncer's threads."""
    _fresh: set[Worker]
    """Workers whose selection of this mailbox shows every message of the
    current sync's listing: the worker that listed, and those that sent
    EXAMINE after the listing's answer came (so the server opened their
    view after the listing's). Reset at each sync."""

    async def _fetch_few(
        self, uids: list[int], uidvalidity: int, listing: dict[int, ListingEntry], result: MailboxResult, prefer: Worker
    ) -> None:
        """A catch-up's handful of messages: one command on ``prefer``, the worker that
        has the mailbox selected, rather than a batch per worker each needing its own EXAMINE."""
        if self.progress is not None:
            self.progress.planned(len(uids), sum(listing[u].size or 0 for u in uids if u in listing))

        async def job(worker: Worker) -> None:
            # A retry fetches only what the state does not have yet.
            todo = self._not_recorded(uids)
            if todo:
                await self._fetch_batch(worker, todo, uidvalidity, result, ahead=False)

        try:
            await self.pool.run(job, f"fetching {plural(len(uids), 'message')} of {self.label}", prefer=prefer)
        finally:
            await self._release_reserve()

    async def _fetch(
        self, plan: SyncPlan, uidvalidity: int, listing: dict[int, ListingEntry], result: MailboxResult
    ) -> None:
        """Fetch a plan's messages in batches, one per worker at a time (a first sync, a big catch-up).

        Each attempt of a batch (the first, or a retry after a cut
        connection) fetches only what the state does not have yet.
        """
        if not plan.fetch:
            return
        sizes = {uid: listing[uid].size for uid in plan.fetch if uid in listing}
        if self.progress is not None:
            self.progress.planned(len(plan.fetch), sum(s or 0 for s in sizes.values()))
        cut = batches(plan.fetch, sizes, self.pool.size)
        del sizes  # not held through the fetch: it grows with the mailbox

        async def fetch_batch(uids: list[int]) -> None:
            # This batch's own: a set for the whole mailbox would grow with it.
            recorded: set[int] = set()

            async def job(worker: Worker) -> None:
                # A retry on a new connection fetches only what the dropped
                # one did not bring: fetching a recorded message again would
                # leave its first file behind as a duplicate.
                todo = [uid for uid in self._not_recorded(uids) if uid not in recorded]
                if todo:
                    await self._fetch_batch(worker, todo, uidvalidity, result, recorded)

            await self.pool.run(job, f"fetching {plural(len(uids), 'message')} of {self.label}")

        try:
            outcomes = await defer.DeferredList(
                [defer.Deferred.fromCoroutine(fetch_batch(b)) for b in cut],
                consumeErrors=True,
            )
        finally:
            await self._release_reserve()
            give_back_free_memory()
        for ok, value in outcomes:
            if not ok:
                value.raiseException()

    async def _fetch_batch(
        self,
        worker: Worker,
        uids: list[int],
        uidvalidity: int,
        result: MailboxResult,
        recorded: set[int] | None = None,
        *,
        ahead: bool = True,
    ) -> None:
        """Fetch ``uids`` (all from this sync's listing) on ``worker``.

        ``ahead``: have the syncer's threads make tmp/ files ahead, which
        pays off over hundreds of messages; for a catch-up's handful in each
        of many mailboxes it would make (and then remove) dozens of unused
        files per mailbox.

        A worker whose selection is known to show every listed UID (see
        :attr:`_fresh`) fetches at once. Any other sends EXAMINE with the
        fetch pipelined behind it, one round trip instead of two: a fresh
        EXAMINE's view holds every listed message, as a NOOP would make
        sure of, but Dovecot answers a FETCH pipelined behind a NOOP from
        the view before it. Bodies are recorded only once the EXAMINE's
        UIDVALIDITY has been checked.
        """
        raw = self.entry.raw_name
        delivered: set[int] = set()

        def checked(arrived: Callable[[FetchedMessage], None]) -> Callable[[FetchedMessage], None]:
            def on_message(message: FetchedMessage) -> None:
                delivered.add(message.uid)
                arrived(message)

            return under_selection(worker, raw, uidvalidity, on_message)

        open_tmp = self._open_tmp if ahead else self.maildir.open_tmp

        async def fetch(client: MirrordIMAP4Client, wanted: list[int]) -> None:
            await self._receive(
                lambda arrived: client.uid_fetch_bodies(wanted, open_tmp, checked(arrived)),
                result,
                recorded=recorded,
            )

        if ahead:
            self._top_up()
        if worker in self._fresh and worker.selected == raw and worker.connected:
            await fetch(await worker.connection(), uids)
            return
        status, _ = await worker.examine_then(raw, lambda client: fetch(client, uids))
        if status.uidvalidity != uidvalidity:
            raise UidValidityChanged(uidvalidity, status.uidvalidity)
        self._fresh.add(worker)
        missing = [uid for uid in uids if uid not in delivered]
        if missing:
            # Expunged since the listing, or a server that answered the
            # pipelined FETCH from an older view: one more look on the
            # selection that is now fresh.
            await fetch(await worker.connection(), missing)

    def _not_recorded(self, uids: list[int]) -> list[int]:
        """``uids`` less those the state has: what a (re)try must still fetch."""
        have = self.state.messages(self.account, self.name, uids)
        return [uid for uid in uids if uid not in have]

    async def _release_reserve(self) -> None:
        """Remove the tmp/ files made ahead and not used: every path that tops up ends here."""
        # No thread may add to the reserve after it is released.
        while self._reserving:
            await defer.DeferredList(list(self._reserving), consumeErrors=True)
        self.maildir.release_reserve()

    def _open_tmp(self) -> TmpMessage:
        tmp = self.maildir.open_tmp()
        self._top_up()
        return tmp

    def _top_up(self) -> None:
        """Have the syncer's threads make tmp/ files ahead, up to RESERVE_TMP."""
        while self.maildir.reserved + RESERVE_STEP * len(self._reserving) < RESERVE_TMP:
            # Ahead of the fsyncs queued: a file made late is made by the reactor thread.
            d = self.syncer.run(functools.partial(self.maildir.reserve_tmp, RESERVE_STEP), first=True)
            if d.called:
                # Made in place (the syncer is busy, or inline): nothing to track;
                # an error here (disk full) is reported by the next open_tmp.
                d.addErrback(lambda _: None)
                return
            self._reserving.append(d)

            def done(result: object, d: defer.Deferred[None] = d) -> None:
                self._reserving.remove(d)

            d.addBoth(done)

    async def _record(
        self,
        messages: list[FetchedMessage],
        result: MailboxResult,
        recorded: set[int] | None = None,
        syncing: list[defer.Deferred[list[tuple[Any, OSError]]]] | None = None,
    ) -> list[tuple[Any, OSError]]:
        """Put complete messages in place and record them; returns the bodies that could not be made durable.

        Record first, rename second, promote third: a crash at any point
        leaves either nothing visible or a pending row that names the file
        (adopted by the next sync), never a file we would fetch again.
        ``deliver_many`` fsyncs any file not fsynced yet before its rename,
        and fsyncs the directories before it returns, so the promotion (the
        commit that makes the rows real) always follows both. It runs in the
        syncer's threads: the directory fsyncs are disk waits too. The state
        DB is only touched here, on the reactor thread.

        A body not fsynced yet (new mail: see ``fresh`` in :meth:`_receive`)
        is fsynced in the same syncer call, before its rename; one whose
        write or fsync fails is left out, its pending row dropped, and
        returned with why. ``syncing``: fsync calls already running for some
        of the bodies; the pending rows are committed while they run, and
        nothing is renamed before they are done.
        """
        if not messages:
            return []
        # Gathered at once: however this ends (a refused row, a failed
        # commit), the calls' own failures are consumed, never left unhandled.
        gathered = defer.DeferredList(syncing, consumeErrors=True) if syncing else None
        records = [MessageRecord(m.uid, m.body.key, m.flags, m.size, m.body.message_id) for m in messages]
        refused = self.state.add_pending(self.account, self.name, records)
        # The state has a file for these already (a retry or a race fetched
        # them again): the new bodies never reach new/ or cur/. They are
        # discarded once no fsync call is at work on them: aborted under a
        # call that has not reached them yet, they would fail it, and with
        # it the bodies it shares with others.
        again = [m for m in messages if m.uid in refused]
        if again:
            log.warning("%s: UIDs %s fetched again but already on disk; second copies discarded",
                        self.label, ",".join(map(str, sorted(refused))))
            messages = [m for m in messages if m.uid not in refused]
        uids = [m.uid for m in messages]
        early: list[tuple[Any, OSError]] = []
        try:
            outcomes = await gathered if gathered is not None else []
            for m in again:
                m.body.abort()
            crash = next((f.value for ok, f in outcomes if not ok), None)
            if crash is not None:
                raise crash
            early = [pair for ok, pairs in outcomes if ok for pair in pairs]
            messages = self._drop_failed(messages, early)
            uids = [m.uid for m in messages]
            if not messages:
                return early
            failed = await self.syncer.run(
                functools.partial(_sync_and_deliver, self.maildir, [(m.body, m.flags) for m in messages])
            )
        except BaseException:
            self.state.drop_pending(self.account, self.name, uids)
            raise
        messages = self._drop_failed(messages, failed)
        uids = [m.uid for m in messages]
        failed = early + failed
        if not messages:
            return failed
        self.state.promote_pending(self.account, self.name, uids)
        if recorded is not None:
            recorded.update(uids)
        size = sum(m.body.size for m in messages)
        result.fetched += len(messages)
        result.fetched_bytes += size
        if self.progress is not None:
            self.progress.done(len(messages), sum(m.size or m.body.size for m in messages))
        return failed

    def _drop_failed(
        self, messages: list[FetchedMessage], failed: list[tuple[Any, OSError]]
    ) -> list[FetchedMessage]:
        """``messages`` less those whose body could not be made durable: their pending rows and tmp/ files go."""
        if not failed:
            return messages
        bad = {id(body) for body, _ in failed}
        self.state.drop_pending(self.account, self.name, [m.uid for m in messages if id(m.body) in bad])
        for body, _ in failed:
            body.abort()
        return [m for m in messages if id(m.body) not in bad]

    async def _receive(
        self,
        fetch: Callable[[Callable[[FetchedMessage], None]], Awaitable[None]],
        result: MailboxResult,
        flush_every: int = FLUSH_MESSAGES,
        recorded: set[int] | None = None,
        flush_soon: IReactorTime | None = None,
    ) -> None:
        """Run one body-fetching command and make what it brought durable.

        ``flush_soon`` (new mail, ``flush_every=1``): a group closes on the
        next reactor turn, not at its first message, so the messages read
        from the socket together share one group (one fsynced commit, one
        directory fsync). Under 50 arrivals a second one EXISTS announces 25
        of them; one group each cost 1.3 ms per message, in series, and the
        last waited 35 ms. A lone message waits one reactor turn. Its
        fsync is not handed to a thread on its own: once the group's pending
        rows are committed, one syncer call fsyncs, renames and fsyncs the
        directory (one hand-off and one wake-up of the reactor, not two).

        Each body's last bytes are written as soon as it is complete, and its
        fsync handed to the syncer's threads, so that the reactor goes on
        reading while the disk works (and several fsyncs share the journal's
        commits). Every few messages, those handed over form a group; once
        all of a group's fsyncs are done it is renamed into place with one
        directory fsync and recorded (see :meth:`_record`). Returns when all
        of it is recorded. Messages that arrived complete are recorded even
        when the command fails later; a failed fsync fails the command with
        that error, and the rest of its bodies are discarded.
        """
        group: list[FetchedMessage] = []
        group_syncs: list[defer.Deferred[list[tuple[Any, OSError]]]] = []
        chunk: list[Any] = []
        group_bytes = 0
        settling: list[defer.Deferred[None]] = []
        failure: list[BaseException] = []
        closing: list[Any] = []  # the delayed call of close_soon, while pending
        chunk_tails = 0  # bytes of the chunk's tails left for its thread to write

        def send_chunk() -> None:
            # One thread call per few files: each call costs the reactor a
            # GIL hand-over and a wake-up, more than the fsync's own CPU.
            nonlocal chunk_tails
            if chunk:
                d = self.syncer.run(functools.partial(_sync_all, list(chunk)))
                if chunk_tails:
                    _tails.hold(d, chunk_tails)
                    chunk_tails = 0
                group_syncs.append(d)
                chunk.clear()

        def close_group() -> None:
            nonlocal group_bytes, chunk_tails
            if flush_soon is None:
                send_chunk()
            # New mail (flush_soon): the bodies not handed to a thread yet are
            # fsynced by the call that renames them, after their pending rows
            # are committed: one hand-off to a thread and back, not two.
            if group:
                settled = defer.Deferred.fromCoroutine(
                    self._settle(list(group), list(group_syncs), result, failure, recorded)
                )
                if chunk_tails:
                    _tails.hold(settled, chunk_tails)
                    chunk_tails = 0
                chunk.clear()
                settling.append(settled)
                group.clear()
                group_syncs.clear()
                group_bytes = 0

        def close_soon() -> None:
            closing.clear()
            close_group()

        def arrived(message: FetchedMessage) -> None:
            nonlocal group_bytes, chunk_tails
            if failure:
                raise failure[0]  # the client discards this body and the rest
            body = message.body
            # The tail's write goes to the fsync thread with the fsync, unless
            # the tails waiting for those threads already hold DEFER_TAIL_BYTES.
            tail = body.buffered
            later = _tails.held + chunk_tails + tail <= DEFER_TAIL_BYTES
            body.close_write(flush=not later)
            if later:
                chunk_tails += tail
            group.append(message)
            chunk.append(body)
            group_bytes += body.size
            if flush_soon is not None and len(group) >= flush_every and group_bytes < FLUSH_BYTES:
                if len(chunk) >= NEW_MAIL_SYNC_CHUNK:
                    send_chunk()
                if not closing:
                    closing.append(flush_soon.callLater(0, close_soon))
            elif len(group) >= flush_every or group_bytes >= FLUSH_BYTES:
                # Make a long batch's progress durable as it goes: an interrupted
                # first sync resumes from here instead of from the batch start.
                close_group()
            elif len(chunk) >= SYNC_CHUNK:
                send_chunk()

        try:
            await fetch(arrived)
        finally:
            # Complete messages are kept whatever happened to the command;
            # and the caller (or a retry) must see them recorded before it
            # decides what to fetch next.
            if closing:
                closing.pop().cancel()
            close_group()
            await defer.DeferredList(settling, consumeErrors=True)
        if failure:
            raise failure[0]

    async def _settle(
        self,
        group: list[FetchedMessage],
        syncs: list[defer.Deferred[list[tuple[Any, OSError]]]],
        result: MailboxResult,
        failure: list[BaseException],
        recorded: set[int] | None,
    ) -> None:
        """Record a group pending while its fsyncs run, then deliver and record what was made durable.

        The pending rows are committed beside the fsyncs, not after them:
        a pending row may name a file that is not durable yet (recovery
        drops a row whose file never reached new/ or cur/), and nothing is
        renamed before both are done. Under 50 arrivals a second, a burst
        of 25 waited for its fsyncs and then for the commit's own fsync,
        one after the other.

        A message whose own write or fsync failed is dropped (its tmp/ file
        removed) and the error reported when the command ends; the rest of
        the group is kept. Anything else going wrong aborts the whole group.
        """
        try:
            late = await self._record(group, result, recorded, syncing=syncs)
        except BaseException as e:  # noqa: BLE001 - reported when the command ends
            for message in group:
                message.body.abort()
            failure.append(e)
            return
        if late:
            failure.append(late[0][1])

