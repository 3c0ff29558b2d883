"""One complete sync of one mailbox: list, decide, apply.

This is glue: the server facts come from a worker (EXAMINE and a UID/FLAGS
listing), the local facts from the state DB and a scan of the Maildir, the
decision from :func:`mirrord.sync.engine.plan_sync`, and the doing from the
store and from workers fetching batches in parallel.

Ordering keeps the invariants: a file is delivered (durable, renamed,
directory synced) before its state row is committed; a local file is removed
before its row, so a crash in between leaves a row without a file, which the
next sync re-fetches or forgets, never an orphan file that would come back as
a duplicate.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task

from mirrord._fs import InlineSyncer, Syncer, default_syncer
from mirrord.flags import Flags, maildir_info
from mirrord.pool import Worker, WorkerPool
from mirrord.progress import Progress
from mirrord.protocol.client import FetchedMessage, ListEntry, ListingEntry, MailboxStatus, MirrordIMAP4Client
from mirrord.protocol.errors import CommandFailed, LoginFailed
from mirrord.config import Account
from mirrord.store.maildir import LocalFile, Maildir, TmpMessage, Trash
from mirrord.store.state import MailboxRecord, MessageRecord, StateDB
from mirrord.sync.names import maildir_path
from mirrord.sync.rematch import Identity, message_id, rematch
from mirrord.sync.engine import (
    KnownMessage,
    LocalSnapshot,
    LocalSummary,
    ServerChanges,
    ServerListing,
    SyncPlan,
    MassRemoval,
    UidValidityChanged,
    check_removal,
    plan_catchup,
    plan_changes,
    plan_sync,
)

log = logging.getLogger("mirrord.sync")

BATCH_MESSAGES = 500
"""Most messages in one UID FETCH; bounds what a dropped connection costs."""
BATCH_BYTES = 32 * 1024 * 1024
"""Most bytes (by RFC822.SIZE) in one UID FETCH, so big mailboxes split across workers."""
LOGIN_RETRY_AFTER = 600.0
"""A worker's refused login is not retried sooner than this (lockout risk)."""
STAMP_MARGIN_NS = 20_000_000
"""A Maildir stamp is trusted only once its mtimes are this much older than
the moment we read them: longer than a kernel clock tick (1-10 ms), so a
later change cannot carry the same mtime."""
RESERVE_TMP = 64
"""Empty tmp/ files kept made ahead, by the syncer's threads, while a batch is fetched."""
RESERVE_STEP = 16
"""Files one thread call makes: several calls run at once, and creation overlaps."""
SYNC_CHUNK = 8
"""Bodies fsynced by one thread call."""
DEFER_WRITES_BELOW = 32
"""While fewer syncer calls than this are pending, a body's last buffered
bytes are written by the thread that fsyncs it, not by the reactor thread:
at most this many x SYNC_CHUNK x 64 KB held in memory."""
FLUSH_MESSAGES = 250
FLUSH_BYTES = 16 * 1024 * 1024
"""Within a batch, messages are renamed into place and recorded this often.
Each group costs two state commits on the reactor thread (the first
fsynced, 1-5 ms while the fsync threads keep the disk busy, and the
reactor reads nothing meanwhile) and two directory fsyncs; 250 messages or 16 MB keeps
that near 0.01 ms a message (a 10,000-message first sync: 43 groups instead
of 151), and what a crash makes us fetch again small."""


@dataclass
class MailboxResult:
    """What one sync of a mailbox did, for the log and the exit status."""

    account: str
    mailbox: str
    messages: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    removed: int = 0
    flags_changed: int = 0
    error: str | None = None
    needs_user: bool = False
    """The error will not go away by retrying: wait for the user."""
    retry_after: float = 0.0
    """At least this long before retrying (a refused login: do not hammer the server)."""

    def summary(self) -> str:
        if self.error:
            return f"{self.account}/{self.mailbox}: FAILED: {self.error}"
        done = []
        if self.fetched:
            done.append(f"{self.fetched} fetched ({_size(self.fetched_bytes)})")
        if self.removed:
            done.append(f"{self.removed} removed")
        if self.flags_changed:
            done.append(f"{self.flags_changed} flag changes")
        what = ", ".join(done) if done else "up to date"
        return f"{self.account}/{self.mailbox}: {what}; {self.messages} messages"


def batches(uids: Sequence[int], sizes: dict[int, int | None], workers: int = 1) -> list[list[int]]:
    """Split ``uids`` into UID FETCH batches bounded by count and by bytes.

    A mailbox smaller than a full batch per worker is still cut into one
    batch per worker, so that its first sync uses every connection.
    """
    limit = max(1, min(BATCH_MESSAGES, -(-len(uids) // max(1, workers))))
    out: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for uid in uids:
        size = sizes.get(uid) or 0
        if current and (len(current) >= limit or current_bytes + size > BATCH_BYTES):
            out.append(current)
            current, current_bytes = [], 0
        current.append(uid)
        current_bytes += size
    if current:
        out.append(current)
    return out


def maildir_stamp(path: Path) -> tuple[int, int] | None:
    """The mtimes (ns) of ``new/`` and ``cur/``: any file added, removed or renamed changes one."""
    try:
        return os.stat(path / "new").st_mtime_ns, os.stat(path / "cur").st_mtime_ns
    except OSError:
        return None


def _margin(stamp: tuple[int, int]) -> int:
    """How old (ns) a stamp must be to be trusted: file systems with whole-second times need more."""
    fine = any(t % 1_000_000_000 for t in stamp)
    return STAMP_MARGIN_NS if fine else 2_000_000_000


@dataclass(frozen=True)
class _ServerView:
    """What one look at the server's mailbox gave."""

    worker: Worker
    """The worker that looked: it has the mailbox selected."""
    status: MailboxStatus
    listing: dict[int, ListingEntry]
    """Complete when ``changes`` is None; else only the messages above our highest UID."""
    changes: ServerChanges | None = None


CATCHUP_FETCH_MESSAGES = 64
"""At most this many messages (and BATCH_BYTES) to fetch in a catch-up go in one command."""


def _under_selection(
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


async def _listing_after_examine(
    client: MirrordIMAP4Client, uids: bytes = b"1:*"
) -> dict[int, ListingEntry] | None:
    """The listing pipelined behind an EXAMINE, or None if the server refused it.

    Sent before EXISTS is known, so it may meet an empty mailbox, where some
    servers refuse ``1:*``; the caller, which by then has the EXAMINE's
    answer, decides whether to ask again.
    """
    try:
        return await client.uid_fetch_listing(uids)
    except CommandFailed:
        return None


def _few(uids: Sequence[int], listing: dict[int, ListingEntry]) -> bool:
    if not uids or len(uids) > CATCHUP_FETCH_MESSAGES:
        return False
    return sum(listing[u].size or 0 for u in uids if u in listing) <= BATCH_BYTES


class MailboxSync:
    """Syncs one server mailbox into one local Maildir."""

    def __init__(
        self,
        *,
        account: str,
        entry: ListEntry,
        local_name: str,
        maildir: Maildir,
        state: StateDB,
        pool: WorkerPool,
        progress: Progress | None = None,
        max_delete: float = 0.5,
        allow_delete: bool = False,
        trash: Trash | None = None,
        set_aside: Trash | None = None,
    ) -> None:
        self.progress = progress
        self.set_aside = set_aside
        """Where copies go that a renumbering left unmatched: kept until the user looks."""
        self.max_delete = max_delete
        self.allow_delete = allow_delete
        """Skip the mass-removal check once (``--allow-delete``)."""
        self.trash = trash
        self.account = account
        self.entry = entry
        self.name = local_name
        self.maildir = maildir
        self.state = state
        self.pool = pool
        self.label = f"{account}/{local_name}"
        self._fresh: set[Worker] = set()
        """Workers whose selection of this mailbox shows every message of the
        current sync's listing: the worker that listed, and those that sent
        EXAMINE after the listing's answer came (so the server opened their
        view after the listing's). Reset at each sync."""
        self.syncer: Syncer | InlineSyncer = default_syncer()
        """Where message files are fsynced: threads, off the reactor."""
        self._reserving: list[defer.Deferred[None]] = []
        """Calls making tmp/ files ahead, in the syncer's threads."""

    @classmethod
    def for_account(
        cls,
        account: Account,
        entry: ListEntry,
        local_name: str,
        state: StateDB,
        pool: WorkerPool,
        *,
        progress: Progress | None = None,
        allow_delete: bool = False,
    ) -> MailboxSync:
        """The sync of one of ``account``'s mailboxes, with the account's settings."""
        return cls(
            account=account.name,
            entry=entry,
            local_name=local_name,
            maildir=Maildir(maildir_path(account.maildir, local_name)),
            state=state,
            pool=pool,
            progress=progress,
            max_delete=account.max_delete,
            allow_delete=allow_delete,
            trash=Trash(state.path.parent / "trash" / account.name / local_name, account.trash_days),
            set_aside=Trash(state.path.parent / "set-aside" / account.name / local_name, float("inf")),
        )

    async def run(self) -> MailboxResult:
        result = MailboxResult(self.account, self.name)
        try:
            await self._run(result)
        except MassRemoval as e:
            result.needs_user = True
            result.error = (
                f"{e}; nothing was removed or fetched for this mailbox. If the server is right "
                f"(the mail was deleted there), allow it once: stop the daemon if it runs, then "
                f"`mirrord run --once --allow-delete {self.label}`. Removed copies go to "
                f"{self.trash.root if self.trash else 'the trash'} first."
            )
        except UidValidityChanged as e:
            # Renumbered again while we were at it: the next sync re-matches.
            result.error = f"{e} during the sync; it will be synced again"
        except LoginFailed as e:
            result.error = str(e)
            result.retry_after = LOGIN_RETRY_AFTER
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            result.error = (
                f"cannot write the mirror ({e.strerror or e}{where}); what is on disk is recorded "
                "and nothing else; it will be fetched once writing works again"
            )
        except Exception as e:  # noqa: BLE001 - one mailbox's failure must not stop the others
            result.error = str(e) or type(e).__name__
            log.debug("%s: sync failed", self.label, exc_info=True)
        if result.error:
            log.error("%s", result.summary())
        else:
            log.info("%s", result.summary())
        return result

    def recover(self) -> None:
        """Finish what a crash interrupted: adopt delivered files, forget the rest.

        Pending rows name files that were about to be renamed into place; if
        the rename happened the file is complete and is recorded now, else
        the row goes (its tmp/ file is crash debris, cleaned too).
        """
        pending = self.state.pending(self.account, self.name)
        adopted = [uid for uid, r in pending.items() if self.maildir.locate(r.key, r.flags) is not None]
        if adopted:
            self.state.promote_pending(self.account, self.name, adopted)
        dropped = [uid for uid in pending if uid not in adopted]
        if dropped:
            self.state.drop_pending(self.account, self.name, dropped)
        cleaned = self.maildir.clean_tmp()
        if self.trash is not None:
            self.trash.expire()
        if pending or cleaned:
            log.info("%s: recovered from an interrupted run: %d delivered messages recorded, "
                     "%d unfinished files removed from tmp/", self.label, len(adopted), cleaned)

    async def _run(self, result: MailboxResult) -> None:
        self._fresh.clear()
        self.recover()
        record = self.state.mailbox(self.account, self.name)
        count, highest = self.state.summary(self.account, self.name)
        # Read before anything looks at the files: a change made after this
        # moment shows as a different stamp next time.
        stamp = maildir_stamp(self.maildir.path)
        stamp_read = time.time_ns()
        trust_files = record is not None and record.maildir_stamp is not None and stamp == record.maildir_stamp
        view = await self.pool.run(
            lambda worker: self._list(worker, record, highest), f"listing {self.label}"
        )
        self._fresh.add(view.worker)
        uidvalidity = view.status.uidvalidity
        plan: SyncPlan | None = None
        files: dict[str, LocalFile] | None = None
        known: dict[int, MessageRecord] = {}
        if view.changes is not None and record is not None:
            plan, known, files = self._plan_catchup(view.changes, record, count, highest, trust_files)
            if plan is None:
                log.info("%s: the server's changes do not add up to its mailbox; listing it in full", self.label)
                view = await self.pool.run(lambda worker: self._list(worker, None, 0), f"listing {self.label}")
                self._fresh.add(view.worker)
                uidvalidity = view.status.uidvalidity
        if plan is None:
            known = self.state.messages(self.account, self.name)
            count = len(known)
            local, files = self._snapshot(record.uidvalidity if record else None, known, trust_files)
            server = ServerListing(uidvalidity, {uid: e.flags for uid, e in view.listing.items()})
            try:
                plan = plan_sync(server, local)
            except UidValidityChanged as e:
                await self._rematch(e, known)
                record = self.state.mailbox(self.account, self.name)
                known = self.state.messages(self.account, self.name)
                count = len(known)
                local, files = self._snapshot(uidvalidity, known, trust=False)
                plan = plan_sync(server, local)
        if not self.allow_delete:
            check_removal(plan, count, self.max_delete, attributes=self.entry.attributes)
        if plan.forget_all:
            log.warning("%s: UIDVALIDITY changed and the old copies are gone; mirroring afresh", self.label)
            self.state.delete_mailbox(self.account, self.name)
            known = {}
            record = None
        changing = not plan.is_empty
        if record is None or record.uidvalidity != uidvalidity:
            self.state.set_mailbox(self.account, self.name, uidvalidity)
        # A HIGHESTMODSEQ already on record stays while the mirror changes: it
        # is older than anything this sync does, so a sync that fails half-way
        # leaves the next one to go over the same changes again (and the
        # catch-up's count check to notice a message it did not finish). The
        # Maildir stamp on record stops matching with the first file we touch.
        if (plan.remove or plan.set_flags) and files is None:
            rows = [known[uid] for uid in (*plan.remove, *plan.set_flags)]
            located = {r.key: self.maildir.locate(r.key, r.flags) for r in rows}
            files = {key: lf for key, lf in located.items() if lf is not None}
        self._apply_local(plan, known, result, files)
        if record is not None and _few(plan.fetch, view.listing):
            # A catch-up's handful of messages: one command on the worker that
            # has the mailbox selected, rather than a batch per worker each
            # needing its own EXAMINE.
            uids = list(plan.fetch)
            if self.progress is not None:
                self.progress.planned(len(uids), sum(view.listing[u].size or 0 for u in uids if u in view.listing))
            try:
                await self.pool.run(
                    lambda worker: self._fetch_batch(worker, uids, uidvalidity, result, ahead=False),
                    f"fetching {len(uids)} messages of {self.label}",
                    prefer=view.worker,
                )
            finally:
                await self._release_reserve()
        else:
            await self._fetch(plan, uidvalidity, view.listing, result)
        if changing or not trust_files:
            listed_after = stamp if not changing and files is not None else None
            stamp = await self._settled_stamp(listed_after, stamp_read)
        # Only now, the sync complete, may the record say "complete as of this
        # modseq" (the EXAMINE's: later changes have higher ones). Not
        # fsynced: should a power cut lose it, the row before it is still
        # true, only older (WAL keeps commits in order).
        self.state.set_mailbox(
            self.account,
            self.name,
            uidvalidity,
            highestmodseq=view.status.highestmodseq,
            last_sync=time.time(),
            maildir_stamp=stamp,
            durable=False,
        )
        result.messages = self.state.count(self.account, self.name) if changing else count

    def _plan_catchup(
        self, changes: ServerChanges, record: MailboxRecord, count: int, highest: int, trust_files: bool
    ) -> tuple[SyncPlan | None, dict[int, MessageRecord], dict[str, LocalFile] | None]:
        """The incremental plan, reading only the rows the server's changes name.

        The Maildir is listed only if its directories changed since the last
        sync found every file in place (``trust_files`` False).
        """
        named = {uid for uid in (*changes.vanished, *changes.changed) if uid <= highest}
        if trust_files and len(named) < max(64, count // 4):
            known = self.state.messages(self.account, self.name, named) if named else {}
            local, files = self._snapshot(record.uidvalidity, known, trust=True)
        else:
            known = self.state.messages(self.account, self.name)
            local, files = self._snapshot(record.uidvalidity, known, trust=trust_files)
        plan = plan_catchup(changes, LocalSummary(local, count, highest))
        return plan, known, files

    def _snapshot(
        self, uidvalidity: int | None, known: dict[int, MessageRecord], trust: bool = False
    ) -> tuple[LocalSnapshot, dict[str, LocalFile] | None]:
        """The local side; the Maildir is listed unless ``trust`` says it is as recorded.

        Returns the listing too (None when not listed), for the renames and
        removals that follow.
        """
        files = None if trust else self.maildir.scan()
        snapshot = LocalSnapshot(
            uidvalidity=uidvalidity,
            known=known,
            files=None if files is None else {key: f.flags for key, f in files.items()},
        )
        return snapshot, files

    async def _settled_stamp(self, listed_after: tuple[int, int] | None, read_at: int) -> tuple[int, int] | None:
        """The Maildir stamp to record at the end of a sync, or None if none can be trusted.

        A recorded stamp stands for "every recorded file is in place, with its
        recorded flags", so that the next sync may skip listing the Maildir
        while new/ and cur/ keep their mtimes. Directory mtimes only tell
        apart changes that fall in different clock ticks, so a stamp counts
        only if it was already :data:`STAMP_MARGIN_NS` old when read (2 s on
        file systems with whole-second times): a change made after the read
        then gets another mtime.

        ``listed_after``: the stamp read (at ``read_at``) just before this
        sync listed the Maildir and found everything in place, and then
        changed nothing; if the directories still carry it, it holds. Else
        (this sync changed files, or the stamp was too fresh), wait out the
        margin, read the stamp, list and check the Maildir, and keep the
        stamp if nothing moved meanwhile.
        """
        current = maildir_stamp(self.maildir.path)
        if current is None:
            return None
        if listed_after is not None and current == listed_after and read_at - max(current) >= _margin(current):
            return current
        for _ in range(3):
            age = time.time_ns() - max(current)
            margin = _margin(current)
            if age >= margin:
                break
            if margin > STAMP_MARGIN_NS:
                return None  # coarse times: not worth seconds of waiting; the next sync lists
            await task.deferLater(self.pool.reactor, (margin - age) / 1e9, lambda: None)
            current = maildir_stamp(self.maildir.path)
            if current is None:
                return None
        else:
            return None
        in_place = self._files_in_place()
        return current if in_place and maildir_stamp(self.maildir.path) == current else None

    def _files_in_place(self) -> bool:
        """Whether every row's file is where and as we would have put it.

        A quick, strict form of :func:`~mirrord.sync.engine.files_in_place`:
        names are compared as strings, so a file a reader renamed (other
        letter order, letters of its own) counts as not in place, which only
        costs a listing next time.
        """
        try:
            present = {"new": set(os.listdir(self.maildir.path / "new")), "cur": set(os.listdir(self.maildir.path / "cur"))}
        except OSError:
            return False
        letters: dict[str, str] = {}
        for key, flags in self.state.keys(self.account, self.name):
            info = letters.get(flags)
            if info is None:
                info = letters[flags] = maildir_info(frozenset(flags.split()))
            if f"{key}:2,{info}" in present["cur"]:
                continue
            if (f"{key}:2,{info}" if info else key) in present["new"]:
                continue
            return False
        return True

    # -- live changes, from a watcher's events ---------------------------------

    async def fetch_new(self) -> MailboxResult:
        """Fetch what arrived since the highest UID we have, on a worker, in one round trip.

        EXAMINE and ``UID FETCH first:*`` go out together
        (:meth:`Worker.examine_then`): the server's answer to EXAMINE comes
        first, so each message is checked against the UIDVALIDITY it names
        before it is recorded. Should the fetch bring less than EXAMINE's
        UIDNEXT promises (a server that answered it from an older view, or a
        message expunged in between), a second ``UID FETCH`` on the now fresh
        selection fetches the rest: mail the watcher announced is never left
        behind (invariant 5).

        Falls back to a full sync when there is nothing to start from (the
        mailbox was never synced). Raises on failure: the caller decides
        whether to retry or resync.
        """
        record = self.state.mailbox(self.account, self.name)
        if record is None:
            return await self.run()
        result = MailboxResult(self.account, self.name)
        highest = self.state.highest_uid(self.account, self.name)
        first = highest + 1 if highest else 1
        raw_name = self.entry.raw_name

        async def job(worker: Worker) -> None:
            def checked(arrived: Callable[[FetchedMessage], None]) -> Callable[[FetchedMessage], None]:
                return _under_selection(worker, raw_name, record.uidvalidity, arrived)

            # New mail is put in place message by message: under a steady stream
            # one EXISTS may announce dozens, and the first should not wait
            # for the last.
            async def fetch_from(client: MirrordIMAP4Client, start: int) -> None:
                await self._receive(
                    lambda arrived: client.uid_fetch_from(start, self.maildir.open_tmp, checked(arrived)),
                    result,
                    flush_every=1,
                )

            status, _ = await worker.examine_then(raw_name, lambda client: fetch_from(client, first))
            if status.uidvalidity != record.uidvalidity:
                raise UidValidityChanged(record.uidvalidity, status.uidvalidity)
            now_highest = self.state.highest_uid(self.account, self.name) or 0
            if status.uidnext is not None:
                short = now_highest < status.uidnext - 1
            else:  # no UIDNEXT (Courier): more messages there than here is the hint
                short = status.exists > self.state.count(self.account, self.name)
            if short:
                # Rare: expunged since, or a server whose pipelined FETCH saw
                # an older view. The selection is fresh now; one more look.
                log.debug("%s: UIDNEXT %s, %d messages, but highest UID here %d after the fetch; "
                          "fetching again", self.label, status.uidnext, status.exists, now_highest)
                await fetch_from(await worker.connection(), max(first, now_highest + 1))

        await self.pool.run(job, f"fetching new mail of {self.label}")
        if result.fetched:
            result.messages = self.state.count(self.account, self.name)
            log.info("%s: %d new (%s)", self.label, result.fetched, _size(result.fetched_bytes))
        return result

    def apply_changes(self, expunged: Sequence[int], flags: dict[int, Flags]) -> MailboxResult:
        """Apply EXPUNGE/VANISHED and flag events to the local copy; local work only."""
        result = MailboxResult(self.account, self.name)
        record = self.state.mailbox(self.account, self.name)
        if record is None:
            return result
        known = self.state.messages(self.account, self.name, [*expunged, *flags])
        located = {r.key: self.maildir.locate(r.key, r.flags) for r in known.values()}
        files = {key: f for key, f in located.items() if f is not None}
        local = LocalSnapshot(
            record.uidvalidity,
            {uid: KnownMessage(r.key, r.flags) for uid, r in known.items()},
            {key: f.flags for key, f in files.items()},
        )
        plan = plan_changes(local, expunged, flags)
        if plan.remove and not self.allow_delete:
            check_removal(plan, self.state.count(self.account, self.name), self.max_delete,
                          attributes=self.entry.attributes)
        self._apply_local(plan, known, result, files)
        if result.removed or result.flags_changed:
            done = []
            if result.removed:
                done.append(f"{result.removed} removed (expunged on the server)")
            if result.flags_changed:
                done.append(f"{result.flags_changed} flag changes")
            log.info("%s: %s", self.label, ", ".join(done))
        return result

    async def _rematch(self, change: UidValidityChanged, known: dict[int, MessageRecord]) -> None:
        """The server renumbered the mailbox: give local copies their new UIDs.

        Copies are matched by Message-ID and size and keep their files (no
        download). Copies nothing matches are moved to the set-aside folder
        (never deleted); server messages nothing matched are fetched by the
        sync that follows. The state is switched over in one transaction.
        """

        async def identities(worker: Worker) -> dict[int, tuple[int | None, bytes]]:
            status = await worker.examine(self.entry.raw_name)
            if status.uidvalidity != change.new:
                raise UidValidityChanged(change.new, status.uidvalidity)
            client = await worker.connection()
            return await client.uid_fetch_identities() if status.exists else {}

        found = await self.pool.run(identities, f"re-matching {self.label}")
        server = {uid: Identity(message_id(header), size) for uid, (size, header) in found.items()}
        files = self.maildir.scan()
        mine: dict[int, Identity] = {}
        for uid, row in known.items():
            lf = files.get(row.key)
            if lf is not None:
                mine[uid] = Identity(_local_message_id(self.maildir.path / lf.subdir / lf.filename), row.size)
        result = rematch(mine, server)
        if result.unmatched_local:
            keys = [known[uid].key for uid in result.unmatched_local]
            self.maildir.remove_many(keys, {k: files[k] for k in keys if k in files}, self.set_aside)
        with self.state.transaction():
            self.state.delete_mailbox(self.account, self.name)
            self.state.set_mailbox(self.account, self.name, change.new)
            self.state.add_messages(
                self.account,
                self.name,
                [
                    MessageRecord(new, known[old].key, known[old].flags, known[old].size)
                    for old, new in result.matched.items()
                ],
            )
        log.warning(
            "%s: %s: %d local copies re-matched to their new UIDs, %d set aside in %s, %d to fetch",
            self.label,
            change,
            len(result.matched),
            len(result.unmatched_local),
            self.set_aside.root if self.set_aside else "-",
            len(result.unmatched_server),
        )

    async def _list(self, worker: Worker, record: MailboxRecord | None, highest: int) -> _ServerView:
        """Look at the server's mailbox: what changed since the last complete sync, or all of it.

        With QRESYNC on, the EXAMINE itself brings the expunges and flag
        changes since the recorded HIGHESTMODSEQ, and only messages above
        our highest UID are listed. With CONDSTORE alone, a compact UID list
        (for expunges and new mail) and the flags changed since. Otherwise,
        or when the server cannot answer from that modseq (a new UIDVALIDITY,
        NOMODSEQ), the complete ``UID FETCH 1:* (UID FLAGS RFC822.SIZE)``.
        """
        client = await worker.connection()
        since = record.highestmodseq if record is not None else None
        raw = self.entry.raw_name
        if since is not None and record is not None and "QRESYNC" in client.enabled:
            # The messages above our highest UID are listed in the same round
            # trip as the EXAMINE; ``n:*`` also returns the highest message
            # when its UID is below n, hence the filter.
            above = b"%d:*" % (highest + 1)
            status, listing = await worker.examine_then(
                raw, lambda c: _listing_after_examine(c, above), qresync=(record.uidvalidity, since)
            )
            if status.resynced and status.highestmodseq is not None:
                if listing is None:
                    listing = await client.uid_fetch_listing(above) if status.exists else {}
                new = {uid: entry for uid, entry in listing.items() if uid > highest}
                changes = ServerChanges(
                    status.uidvalidity, status.exists, status.vanished, status.changed, frozenset(new)
                )
                return _ServerView(worker, status, new, changes)
            # Renumbered, or no modseq to resume from: the complete listing.
            listing = await client.uid_fetch_listing() if status.exists else {}
            return _ServerView(worker, status, listing, None)
        elif since is not None and record is not None and "CONDSTORE" in client.capabilities:
            status = await worker.examine(raw, condstore="CONDSTORE" not in client.enabled)
            if status.uidvalidity == record.uidvalidity and status.highestmodseq is not None:
                # Both in flight at once: one round trip.
                d_uids = defer.Deferred.fromCoroutine(client.uid_search_all())
                d_changed = (
                    defer.Deferred.fromCoroutine(client.uid_fetch_changed(since))
                    if status.highestmodseq != since
                    else defer.succeed({})
                )
                try:
                    uids, changed = await defer.gatherResults([d_uids, d_changed], consumeErrors=True)
                except defer.FirstError as e:
                    e.subFailure.raiseException()  # the connection error itself, for the pool's retry
                new = {uid: ListingEntry(frozenset(), None) for uid in uids if uid > highest}
                mine = self.state.uids(self.account, self.name)
                changes = ServerChanges(
                    status.uidvalidity, status.exists, frozenset(mine - uids), changed, frozenset(new)
                )
                return _ServerView(worker, status, new, changes)
        else:
            status, listing = await worker.examine_then(raw, _listing_after_examine)
            if listing is None:
                listing = await client.uid_fetch_listing() if status.exists else {}
            return _ServerView(worker, status, listing, None)
        listing = await client.uid_fetch_listing() if status.exists else {}
        return _ServerView(worker, status, listing, None)

    def _apply_local(
        self,
        plan: SyncPlan,
        known: dict[int, MessageRecord],
        result: MailboxResult,
        files: dict[str, LocalFile] | None = None,
    ) -> None:
        if plan.remove:
            files = files if files is not None else self.maildir.scan()
            keys = [known[uid].key for uid in plan.remove]
            self.maildir.remove_many(keys, {k: files[k] for k in keys if k in files}, self.trash)
            self.state.remove_messages(self.account, self.name, plan.remove)
            result.removed = len(plan.remove)
        if plan.set_flags:
            # Entries of the kept files stay valid across the removals above.
            files = files if files is not None else self.maildir.scan()
            changes: dict[int, Flags] = {}
            touched: set[str] = set()
            for uid, flags in plan.set_flags.items():
                key = known[uid].key
                before = files.get(key)
                try:
                    after = self.maildir.set_flags(key, flags, before, sync=False)
                except FileNotFoundError:
                    continue  # vanished since the scan: the next sync re-fetches it
                if before is None:
                    touched.update(("new", "cur"))  # found by key: where it was is not known here
                elif (after.subdir, after.filename) != (before.subdir, before.filename):
                    touched.update((after.subdir, before.subdir))
                changes[uid] = flags
            # One fsync per directory for all the renames, not one or two each;
            # then the rows, whose loss a later sync would repair (see set_flags).
            self.maildir.sync_dirs(touched)
            self.state.set_flags(self.account, self.name, changes, durable=False)
            result.flags_changed = len(changes)

    async def _fetch(
        self, plan: SyncPlan, uidvalidity: int, listing: dict[int, ListingEntry], result: MailboxResult
    ) -> None:
        if not plan.fetch:
            return
        sizes = {uid: listing[uid].size for uid in plan.fetch if uid in listing}
        if self.progress is not None:
            self.progress.planned(len(plan.fetch), sum(s or 0 for s in sizes.values()))
        recorded: set[int] = set()

        async def fetch_batch(uids: list[int]) -> None:
            async def job(worker: Worker) -> None:
                # A retry on a new connection fetches only what the dropped
                # one did not bring: fetching a recorded message again would
                # leave its first file behind as a duplicate.
                todo = [uid for uid in uids if uid not in recorded]
                if todo:
                    await self._fetch_batch(worker, todo, uidvalidity, result, recorded)

            await self.pool.run(job, f"fetching {len(uids)} messages of {self.label}")

        try:
            outcomes = await defer.DeferredList(
                [defer.Deferred.fromCoroutine(fetch_batch(b)) for b in batches(plan.fetch, sizes, self.pool.size)],
                consumeErrors=True,
            )
        finally:
            await self._release_reserve()
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

            return _under_selection(worker, raw, uidvalidity, on_message)

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
            d = self.syncer.run(functools.partial(self.maildir.reserve_tmp, RESERVE_STEP))
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
        self, messages: list[FetchedMessage], result: MailboxResult, recorded: set[int] | None = None
    ) -> None:
        """Put complete messages in place and record them.

        Record first, rename second, promote third: a crash at any point
        leaves either nothing visible or a pending row that names the file
        (adopted by the next sync), never a file we would fetch again.
        ``deliver_many`` fsyncs any file not fsynced yet before its rename,
        and fsyncs the directories before it returns, so the promotion (the
        commit that makes the rows real) always follows both. It runs in the
        syncer's threads: the directory fsyncs are disk waits too. The state
        DB is only touched here, on the reactor thread.
        """
        if not messages:
            return
        records = [MessageRecord(m.uid, m.body.key, m.flags, m.size) for m in messages]
        uids = [m.uid for m in messages]
        self.state.add_pending(self.account, self.name, records)
        try:
            await self.syncer.run(functools.partial(self.maildir.deliver_many, [(m.body, m.flags) for m in messages]))
        except BaseException:
            self.state.drop_pending(self.account, self.name, uids)
            raise
        self.state.promote_pending(self.account, self.name, uids)
        if recorded is not None:
            recorded.update(uids)
        size = sum(m.body.size for m in messages)
        result.fetched += len(messages)
        result.fetched_bytes += size
        if self.progress is not None:
            self.progress.done(len(messages), sum(m.size or m.body.size for m in messages))

    async def _receive(
        self,
        fetch: Callable[[Callable[[FetchedMessage], None]], Awaitable[None]],
        result: MailboxResult,
        flush_every: int = FLUSH_MESSAGES,
        recorded: set[int] | None = None,
    ) -> None:
        """Run one body-fetching command and make what it brought durable.

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
        group_syncs: list[defer.Deferred[None]] = []
        chunk: list[Any] = []
        group_bytes = 0
        settling: list[defer.Deferred[None]] = []
        failure: list[BaseException] = []

        def send_chunk() -> None:
            # One thread call per few files: each call costs the reactor a
            # GIL hand-over and a wake-up, more than the fsync's own CPU.
            if chunk:
                group_syncs.append(self.syncer.run(functools.partial(_sync_all, list(chunk))))
                chunk.clear()

        def close_group() -> None:
            nonlocal group_bytes
            send_chunk()
            if group:
                settling.append(
                    defer.Deferred.fromCoroutine(
                        self._settle(list(group), list(group_syncs), result, failure, recorded)
                    )
                )
                group.clear()
                group_syncs.clear()
                group_bytes = 0

        def arrived(message: FetchedMessage) -> None:
            nonlocal group_bytes
            if failure:
                raise failure[0]  # the client discards this body and the rest
            body = message.body
            # The tail's write goes to the fsync thread with the fsync, unless
            # many calls wait there already: each holds up to SYNC_CHUNK
            # tails in memory (at most 64 KB each).
            body.close_write(flush=self.syncer.pending >= DEFER_WRITES_BELOW)
            group.append(message)
            chunk.append(body)
            group_bytes += body.size
            if len(group) >= flush_every or group_bytes >= FLUSH_BYTES:
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
            close_group()
            await defer.DeferredList(settling, consumeErrors=True)
        if failure:
            raise failure[0]

    async def _settle(
        self,
        group: list[FetchedMessage],
        syncs: list[defer.Deferred[None]],
        result: MailboxResult,
        failure: list[BaseException],
        recorded: set[int] | None,
    ) -> None:
        """Wait for a group's fsyncs, then deliver and record it (or abort it all)."""
        outcomes = await defer.DeferredList(syncs, consumeErrors=True)
        error = next((f.value for ok, f in outcomes if not ok), None)
        if error is None:
            try:
                await self._record(group, result, recorded)
                return
            except BaseException as e:  # noqa: BLE001 - reported when the command ends
                error = e
        for message in group:
            message.body.abort()
        failure.append(error)


def _sync_all(bodies: list[Any]) -> None:
    """fsync and close each body (in a syncer thread); the first failure stops it."""
    for body in bodies:
        body.sync()


def _local_message_id(path: Path) -> str | None:
    with path.open("rb") as f:
        head = f.read(65536)
    end = head.find(b"\n\n")
    return message_id(head if end < 0 else head[: end + 1])


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"
