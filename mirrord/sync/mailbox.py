"""One complete sync of one mailbox: list, decide, apply; and the daemon's live steps.

This is the orchestration; each step it calls is one module to read whole:

- :mod:`mirrord.sync.listing`: the look at the server (QRESYNC, CONDSTORE or plain);
- :mod:`mirrord.sync.engine`: the decision (:func:`~mirrord.sync.engine.plan_sync`,
  :func:`~mirrord.sync.engine.plan_catchup`), free of I/O;
- :mod:`mirrord.sync.renumber`: a new UIDVALIDITY, local copies re-matched;
- :mod:`mirrord.sync.fetching`: bodies fetched, made durable and recorded;
- :mod:`mirrord.sync.stamp`: the Maildir-stamp shortcut that skips listing
  new/ and cur/.

Ordering keeps the invariants: a file is delivered (durable, renamed,
directory synced) before its state row is committed; a local file is removed
before its row, so a crash in between leaves a row without a file, which the
next sync re-fetches or forgets, never an orphan file that would come back as
a duplicate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.internet import defer

from mirrord._fs import default_syncer
from mirrord.config import Account
from mirrord.flags import Flags
from mirrord.oserrors import explain
from mirrord.pool import Worker, WorkerPool
from mirrord.progress import Progress
from mirrord.protocol.client import (
    FetchedMessage,
    ListEntry,
    ListingEntry,
    MirrordIMAP4Client,
)
from mirrord.protocol.errors import LoginFailed
from mirrord.store.maildir import LocalFile, Maildir, Trash, trash_for
from mirrord.store.state import MailboxRecord, MessageRecord, StateDB
from mirrord.sync.engine import (
    KnownMessage,
    LocalSnapshot,
    LocalSummary,
    MassRemoval,
    ServerChanges,
    ServerListing,
    SyncPlan,
    UidValidityChanged,
    check_removal,
    plan_catchup,
    plan_changes,
    plan_sync,
)
from mirrord.sync.fetching import (  # noqa: F401 - BATCH_*, batches: imported from here by others
    BATCH_BYTES,
    BATCH_MESSAGES,
    FetchPipeline,
    batches,
    few,
    under_selection,
)
from mirrord.sync.listing import CompactListing, ServerView, look
from mirrord.sync.listing import listing_after_examine as _listing_after_examine  # noqa: F401 - old name
from mirrord.sync.names import maildir_path
from mirrord.sync.renumber import renumber
from mirrord.sync.stamp import files_in_place, maildir_stamp, settled_stamp
from mirrord.sync.twoway import merge_flags, server_only_part
from mirrord.units import plural, size

log = logging.getLogger("mirrord.sync")


class OwnChanges(Protocol):
    """Where a sync announces its own changes to the Maildir (see :class:`~mirrord.localwatch.LocalChangeWatcher`)."""

    def delivering(self, keys: Iterable[str]) -> None: ...

    def ours(self, filenames: Iterable[str]) -> None: ...

PREFETCH_ROWS = 20_000
"""Up to this many rows, the end of a sync reads them while the stamp's margin
passes (see :func:`~mirrord.sync.stamp.settled_stamp`); beyond, one at a time after."""

LOGIN_RETRY_AFTER = 600.0
"""A worker's refused login is not retried sooner than this (lockout risk)."""


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
            done.append(f"{self.fetched} fetched ({size(self.fetched_bytes)})")
        if self.removed:
            done.append(f"{self.removed} removed")
        if self.flags_changed:
            done.append(plural(self.flags_changed, "flag change"))
        what = ", ".join(done) if done else "up to date"
        return f"{self.account}/{self.mailbox}: {what}; {plural(self.messages, 'message')}"


class _ServerFlags(Mapping[int, Flags]):
    """A listing's UID -> flags, read through: :class:`ServerListing` without a second dict of every UID."""

    __slots__ = ("_flags", "_listing")

    def __init__(self, listing: Mapping[int, ListingEntry]) -> None:
        self._listing = listing
        self._flags: Callable[[int], Flags] = (
            listing.flags if isinstance(listing, CompactListing) else lambda uid: listing[uid].flags
        )

    def __getitem__(self, uid: int) -> Flags:
        return self._flags(uid)

    def __contains__(self, uid: object) -> bool:
        return uid in self._listing

    def __iter__(self) -> Iterator[int]:
        return iter(self._listing)

    def __len__(self) -> int:
        return len(self._listing)


@dataclass(frozen=True)
class _Pulled:
    """What the closing steps of a sync need of its pull (the listing and plan are not kept)."""

    record: MailboxRecord | None
    uidvalidity: int
    highestmodseq: int | None
    changing: bool
    listed: bool
    """The Maildir was listed for the plan."""
    count: int
    """Rows before the pull."""
    rows: int
    """About how many rows after it."""


class MailboxSync(FetchPipeline):
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
        two_way: bool = False,
    ) -> None:
        self.two_way = two_way
        """Local changes are the two-way round's to send (:mod:`mirrord.sync.pushing`):
        the pull neither reverts a file's flags nor fetches back a deleted file."""
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
        self._fresh = set()
        self.syncer = default_syncer()
        self._reserving = []
        self.own_changes: OwnChanges | None = None
        """Told of the files the daemon's live steps are about to put in place,
        rename or remove, so that the two-way side's watcher does not take
        them for a reader's and list the whole folder (set by
        :class:`~mirrord.sync.livepush.LocalPush`)."""

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
            trash=trash_for(state.path.parent, "trash", account.name, local_name, account.trash_days),
            set_aside=trash_for(state.path.parent, "set-aside", account.name, local_name, float("inf")),
            two_way=account.two_way,
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
            result.error = (
                f"{explain(e, 'cannot write the mirror')}. What is on disk is recorded "
                "and nothing else; the rest is fetched once writing works again"
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
        recorded = self.state.messages(self.account, self.name, pending) if pending else {}
        if recorded:
            # Left by a version that let a retry record a UID twice: the
            # recorded file stays the copy; the pending one goes to the trash.
            twice = [uid for uid in pending if uid in recorded]
            keys = [pending[uid].key for uid in twice]
            located = {k: self.maildir.locate(k, pending[u].flags) for u, k in zip(twice, keys)}
            self.maildir.remove_many(keys, {k: f for k, f in located.items() if f is not None}, self.trash)
            self.state.drop_pending(self.account, self.name, twice)
            log.warning("%s: %d second copies of recorded messages moved to the trash", self.label, len(twice))
            pending = {uid: r for uid, r in pending.items() if uid not in recorded}
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
        highest = self.state.highest_uid(self.account, self.name) or 0
        # Read before anything looks at the files: a change made after this
        # moment shows as a different stamp next time.
        stamp = maildir_stamp(self.maildir.path)
        stamp_read = time.time_ns()
        trust_files = record is not None and record.maildir_stamp is not None and stamp == record.maildir_stamp
        # The look goes out first: what follows runs while the server answers.
        looking = defer.Deferred.fromCoroutine(self.pool.run(
            lambda worker: self._look(worker, record, highest), f"listing {self.label}"
        ))
        checked = False
        try:
            # An index scan, a millisecond at 10,000 rows. Nothing else
            # writes this mailbox's rows meanwhile.
            count = self.state.count(self.account, self.name)
            if not trust_files and record is not None and count and stamp is not None:
                # The directories moved since the last complete sync (live fetches
                # and flag changes do not record a stamp): if every row's file is
                # still where and as we put it, the plan may trust the rows as a
                # stamp would let it, without the listing and every row in memory
                # (at 100,000 messages some 70 MB; this check holds the names).
                checked = trust_files = bool(
                    files_in_place(self.maildir.path, self.state.iter_keys(self.account, self.name))
                )
        except BaseException:
            looking.addErrback(lambda _: None)
            raise
        # The pull's listing, rows and plan are gone once it returns: the
        # stamp check below lists the Maildir, and should not hold both.
        pulled = await self._pull(result, record, count, highest, trust_files, looking)
        # The stamp on record vouches for itself; one the check above vouched
        # for is read afresh (it may be too new to trust, and exact or not).
        exact = (pulled.record is not None and pulled.record.maildir_exact and trust_files and not checked
                 and not pulled.changing)
        # Two-way: a stamp not known to be exact is checked once more (a
        # listing), so that the next round can skip the folder.
        if pulled.changing or not trust_files or checked or (self.two_way and not exact):
            listed_after = stamp if not pulled.changing and (pulled.listed or checked) else None
            stamp, exact = await settled_stamp(
                self.maildir.path, lambda: self.state.iter_keys(self.account, self.name), self.pool.reactor,
                listed_after, stamp_read, exact=self.two_way, prefetch=pulled.rows <= PREFETCH_ROWS,
            )
        # Only now, the sync complete, may the record say "complete as of this
        # modseq" (the EXAMINE's: later changes have higher ones). Not
        # fsynced: should a power cut lose it, the row before it is still
        # true, only older (WAL keeps commits in order).
        self.state.set_mailbox(
            self.account,
            self.name,
            pulled.uidvalidity,
            highestmodseq=pulled.highestmodseq,
            last_sync=time.time(),
            maildir_stamp=stamp,
            maildir_exact=exact,
            durable=False,
        )
        result.messages = self.state.count(self.account, self.name) if pulled.changing else pulled.count

    async def _pull(
        self,
        result: MailboxResult,
        record: MailboxRecord | None,
        count: int,
        highest: int,
        trust_files: bool,
        looking: defer.Deferred[ServerView],
    ) -> _Pulled:
        """Plan, apply and fetch on what ``looking`` (the look at the server, already sent)
        brings: the sync up to its closing stamp."""
        view = await looking
        self._fresh.add(view.worker)
        uidvalidity = view.status.uidvalidity
        plan: SyncPlan | None = None
        files: dict[str, LocalFile] | None = None
        known: dict[int, MessageRecord] = {}
        if view.changes is not None and record is not None:
            plan, known, files = self._plan_catchup(view.changes, record, count, highest, trust_files)
            if plan is None:
                log.info("%s: the server's changes do not add up to its mailbox; listing it in full", self.label)
                view = await self.pool.run(lambda worker: self._look(worker, None, 0), f"listing {self.label}")
                self._fresh.add(view.worker)
                uidvalidity = view.status.uidvalidity
        if plan is None:
            known = self.state.messages(self.account, self.name)
            count = len(known)
            local, files = self._snapshot(record.uidvalidity if record else None, known, trust_files)
            server = ServerListing(uidvalidity, _ServerFlags(view.listing))
            try:
                plan = plan_sync(server, local, two_way=self.two_way)
            except UidValidityChanged as e:
                await renumber(
                    e, known, pool=self.pool, raw_name=self.entry.raw_name, maildir=self.maildir, state=self.state,
                    account=self.account, mailbox=self.name, set_aside=self.set_aside, label=self.label,
                )
                record = self.state.mailbox(self.account, self.name)
                known = self.state.messages(self.account, self.name)
                count = len(known)
                local, files = self._snapshot(uidvalidity, known, trust=False)
                plan = plan_sync(server, local, two_way=self.two_way)
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
        orphaned = [uid for uid in plan.fetch if uid in known]
        if orphaned:
            # Rows that outlived their files (deleted by hand): forget them
            # first, so that the fetch records the new file as the UID's only
            # one (the state refuses a second file for a recorded UID).
            self.state.remove_messages(self.account, self.name, orphaned)
            log.info("%s: %d files gone from the Maildir; fetching them again", self.label, len(orphaned))
        if record is not None and few(plan.fetch, view.listing):
            await self._fetch_few(list(plan.fetch), uidvalidity, view.listing, result, view.worker)
        else:
            await self._fetch(plan, uidvalidity, view.listing, result)
        return _Pulled(
            record=record, uidvalidity=uidvalidity, highestmodseq=view.status.highestmodseq, changing=changing,
            listed=files is not None, count=count, rows=count + len(plan.fetch),
        )

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
        plan = plan_catchup(changes, LocalSummary(local, count, highest), two_way=self.two_way)
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
        raw_name = self.entry.raw_name

        async def job(worker: Worker) -> None:
            # Read at each attempt, not once before the first: a retry after
            # a cut connection starts above what the dropped one recorded.
            highest = self.state.highest_uid(self.account, self.name)
            first = highest + 1 if highest else 1

            def checked(arrived: Callable[[FetchedMessage], None]) -> Callable[[FetchedMessage], None]:
                own = self.own_changes
                if own is not None:
                    def announced(message: FetchedMessage) -> None:
                        own.delivering((message.body.key,))
                        arrived(message)

                    return under_selection(worker, raw_name, record.uidvalidity, announced)
                return under_selection(worker, raw_name, record.uidvalidity, arrived)

            # New mail is put in place message by message: under a steady stream
            # one EXISTS may announce dozens, and the first should not wait
            # for the last.
            async def fetch_from(client: MirrordIMAP4Client, start: int) -> None:
                await self._receive(
                    lambda arrived: client.uid_fetch_from(start, self.maildir.open_tmp, checked(arrived)),
                    result,
                    flush_every=1,
                    flush_soon=self.pool.reactor,
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
            log.info("%s: %d new (%s)", self.label, result.fetched, size(result.fetched_bytes))
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
                done.append(plural(result.flags_changed, "flag change"))
            log.info("%s: %s", self.label, ", ".join(done))
        return result

    async def _look(self, worker: Worker, record: MailboxRecord | None, highest: int) -> ServerView:
        """Look at the server's mailbox (see :func:`mirrord.sync.listing.look`)."""
        return await look(worker, self.entry.raw_name, record, highest, lambda: self.state.uids(self.account, self.name))

    def _apply_local(
        self,
        plan: SyncPlan,
        known: dict[int, MessageRecord],
        result: MailboxResult,
        files: dict[str, LocalFile] | None = None,
    ) -> None:
        own = self.own_changes
        if plan.remove:
            files = files if files is not None else self.maildir.scan()
            keys = [known[uid].key for uid in plan.remove]
            if own is not None:
                own.ours(files[k].filename for k in keys if k in files)
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
                file_flags = flags
                if self.two_way and before is not None:
                    # A reader's change not sent yet stays on the file; the row
                    # takes the server's flags, so the next round sends it.
                    merged = merge_flags(known[uid].flags, before.flags, flags)
                    file_flags = merged.flags | server_only_part(flags)
                try:
                    after = self.maildir.set_flags(key, file_flags, before, sync=False)
                except FileNotFoundError:
                    continue  # vanished since the scan: the next sync re-fetches it
                if before is None:
                    touched.update(("new", "cur"))  # found by key: where it was is not known here
                elif (after.subdir, after.filename) != (before.subdir, before.filename):
                    touched.update((after.subdir, before.subdir))
                    if own is not None:
                        # Told after the rename but in the same reactor turn:
                        # its events are read after this returns.
                        own.ours((before.filename, after.filename))
                changes[uid] = flags
            # One fsync per directory for all the renames, not one or two each;
            # then the rows, whose loss a later sync would repair (see set_flags).
            self.maildir.sync_dirs(touched)
            self.state.set_flags(self.account, self.name, changes, durable=False)
            result.flags_changed = len(changes)



