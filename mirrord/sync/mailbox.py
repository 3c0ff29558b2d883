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

import logging
import time
from pathlib import Path
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from twisted.internet import defer

from mirrord.flags import Flags
from mirrord.pool import Worker, WorkerPool
from mirrord.progress import Progress
from mirrord.protocol.client import FetchedMessage, ListEntry, ListingEntry, MirrordIMAP4Client
from mirrord.protocol.errors import LoginFailed
from mirrord.config import Account
from mirrord.store.maildir import LocalFile, Maildir, Trash
from mirrord.store.state import MessageRecord, StateDB
from mirrord.sync.names import maildir_path
from mirrord.sync.rematch import Identity, message_id, rematch
from mirrord.sync.engine import (
    KnownMessage,
    LocalSnapshot,
    ServerListing,
    SyncPlan,
    MassRemoval,
    UidValidityChanged,
    check_removal,
    plan_changes,
    plan_sync,
)

log = logging.getLogger("mirrord.sync")

BATCH_MESSAGES = 200
"""Most messages in one UID FETCH; bounds what a dropped connection costs."""
BATCH_BYTES = 16 * 1024 * 1024
"""Most bytes (by RFC822.SIZE) in one UID FETCH, so big mailboxes split across workers."""
LOGIN_RETRY_AFTER = 600.0
"""A worker's refused login is not retried sooner than this (lockout risk)."""
FLUSH_MESSAGES = 25
FLUSH_BYTES = 4 * 1024 * 1024
"""Within a batch, messages are renamed into place and recorded this often."""


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
        self.recover()
        uidvalidity, listing = await self.pool.run(self._list, f"listing {self.label}")
        record = self.state.mailbox(self.account, self.name)
        known = self.state.messages(self.account, self.name)
        local = self._snapshot(record.uidvalidity if record else None, known)
        server = ServerListing(uidvalidity, {uid: e.flags for uid, e in listing.items()})
        try:
            plan = plan_sync(server, local)
        except UidValidityChanged as e:
            await self._rematch(e, known)
            record = self.state.mailbox(self.account, self.name)
            known = self.state.messages(self.account, self.name)
            plan = plan_sync(server, self._snapshot(uidvalidity, known))
        if not self.allow_delete:
            check_removal(plan, len(known), self.max_delete)
        if plan.forget_all:
            log.warning("%s: UIDVALIDITY changed and the old copies are gone; mirroring afresh", self.label)
            self.state.delete_mailbox(self.account, self.name)
            known = {}
        if record is None or record.uidvalidity != uidvalidity:
            self.state.set_mailbox(self.account, self.name, uidvalidity)
        self._apply_local(plan, known, result)
        await self._fetch(plan, uidvalidity, listing, result)
        self.state.set_mailbox(self.account, self.name, uidvalidity, last_sync=time.time())
        result.messages = self.state.count(self.account, self.name)

    def _snapshot(self, uidvalidity: int | None, known: dict[int, MessageRecord]) -> LocalSnapshot:
        return LocalSnapshot(
            uidvalidity=uidvalidity,
            known={uid: KnownMessage(r.key, r.flags) for uid, r in known.items()},
            files={key: f.flags for key, f in self.maildir.scan().items()},
        )

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
                def on_message(message: FetchedMessage) -> None:
                    # The EXAMINE's answer precedes the bodies; without it, or
                    # under another UIDVALIDITY, these UIDs name other mail.
                    status = worker.status if worker.selected == raw_name else None
                    if status is None:
                        raise RuntimeError("the server sent messages before it answered EXAMINE")
                    if status.uidvalidity != record.uidvalidity:
                        raise UidValidityChanged(record.uidvalidity, status.uidvalidity)
                    arrived(message)

                return on_message

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
        self._apply_local(plan_changes(local, expunged, flags), known, result, files)
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

    async def _list(self, worker: Worker) -> tuple[int, dict[int, ListingEntry]]:
        status = await worker.examine(self.entry.raw_name)
        client = await worker.connection()
        listing = await client.uid_fetch_listing() if status.exists else {}
        return status.uidvalidity, listing

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
            files = files if files is not None and not plan.remove else self.maildir.scan()
            changes: dict[int, Flags] = {}
            for uid, flags in plan.set_flags.items():
                key = known[uid].key
                try:
                    self.maildir.set_flags(key, flags, files.get(key))
                except FileNotFoundError:
                    continue  # vanished since the scan: the next sync re-fetches it
                changes[uid] = flags
            self.state.set_flags(self.account, self.name, changes)
            result.flags_changed = len(changes)

    async def _fetch(
        self, plan: SyncPlan, uidvalidity: int, listing: dict[int, ListingEntry], result: MailboxResult
    ) -> None:
        if not plan.fetch:
            return
        sizes = {uid: listing[uid].size for uid in plan.fetch if uid in listing}
        if self.progress is not None:
            self.progress.planned(len(plan.fetch), sum(s or 0 for s in sizes.values()))

        async def fetch_batch(uids: list[int]) -> None:
            async def job(worker: Worker) -> None:
                await self._fetch_batch(worker, uids, uidvalidity, result)

            await self.pool.run(job, f"fetching {len(uids)} messages of {self.label}")

        outcomes = await defer.DeferredList(
            [defer.Deferred.fromCoroutine(fetch_batch(b)) for b in batches(plan.fetch, sizes, self.pool.size)],
            consumeErrors=True,
        )
        for ok, value in outcomes:
            if not ok:
                value.raiseException()

    async def _fetch_batch(self, worker: Worker, uids: list[int], uidvalidity: int, result: MailboxResult) -> None:
        status = await worker.ensure_selected(self.entry.raw_name)
        if status.uidvalidity != uidvalidity:
            raise UidValidityChanged(uidvalidity, status.uidvalidity)
        client = await worker.connection()
        await self._receive(lambda arrived: client.uid_fetch_bodies(uids, self.maildir.open_tmp, arrived), result)

    def _record(self, messages: list[FetchedMessage], result: MailboxResult) -> None:
        """Put complete messages in place and record them.

        Record first, rename second, promote third: a crash at any point
        leaves either nothing visible or a pending row that names the file
        (adopted by the next sync), never a file we would fetch again.
        """
        if not messages:
            return
        records = [MessageRecord(m.uid, m.body.key, m.flags, m.size) for m in messages]
        uids = [m.uid for m in messages]
        self.state.add_pending(self.account, self.name, records)
        try:
            self.maildir.deliver_many([(m.body, m.flags) for m in messages])
        except BaseException:
            self.state.drop_pending(self.account, self.name, uids)
            raise
        self.state.promote_pending(self.account, self.name, uids)
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
    ) -> None:
        """Run one body-fetching command and make what it brought durable.

        Each body is finished (fsynced, closed) as soon as it is complete;
        every few messages, and at the end, those finished are renamed into
        place with one directory fsync and recorded (see :meth:`_record`).
        """
        unrecorded: list[FetchedMessage] = []

        def arrived(message: FetchedMessage) -> None:
            message.body.finish()
            unrecorded.append(message)
            if len(unrecorded) >= flush_every or sum(m.body.size for m in unrecorded) >= FLUSH_BYTES:
                # Make a long batch's progress durable as it goes: an interrupted
                # first sync resumes from here instead of from the batch start.
                self._record(unrecorded, result)
                unrecorded.clear()

        try:
            await fetch(arrived)
            self._record(unrecorded, result)
        except BaseException:
            # Messages that arrived complete are kept even though the command
            # failed (a full disk, a dropped connection): with several batches
            # in flight none may have reached a flush yet, and the next attempt
            # resumes after them. Recording is all or nothing.
            try:
                self._record(unrecorded, result)
            except BaseException:
                for message in unrecorded:
                    message.body.abort()
            raise


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
