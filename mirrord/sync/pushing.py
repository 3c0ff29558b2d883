"""The two-way round: what readers did to the Maildir, sent to the server (issue #12).

:mod:`mirrord.sync.twoway` decides; this module does the I/O around it, on
one worker connection:

1. Intents left by a crash are settled first (:meth:`Pusher._recover`): an
   APPEND or MOVE is recorded in the state's outbox, fsynced, *before* the
   server is told, and dropped in the same transaction that records its
   row. One still there after a crash is looked for in its target above the
   UIDNEXT it noted (by Message-ID and size): found, its row is recorded;
   not found, the intent goes and this round plans the change again. So a
   kill at any point neither loses a local change nor sends it twice.
2. Each folder is scanned and compared with its rows, unless the last pull
   left an exact Maildir stamp that still holds (:meth:`Pusher._untouched`). Only the rows whose
   file is gone or carries other flags are looked up on the server (their
   current flags; absent from the answer means expunged there), and only
   when something both vanished and appeared are contents compared
   (:func:`~mirrord.sync.twoway.identity_request`). A round with nothing
   local to send never talks to the server.
3. The plan is applied: local fixes, STOREs (``UNCHANGEDSINCE`` the
   SELECT's HIGHESTMODSEQ where CONDSTORE is offered: a message changed on
   the server meanwhile is left for the next round, merged again),
   deletions (``\\Deleted`` and ``UID EXPUNGE`` of exactly those UIDs; only
   marked without UIDPLUS), moves (``UID MOVE`` or COPY + ``\\Deleted`` +
   ``UID EXPUNGE``; COPYUID ties the file to its new UID), appends
   (APPENDUID ties it; without UIDPLUS the new UID is found by Message-ID
   and size above the UIDNEXT noted before).

The caller runs rounds one at a time per account and never while a pull of
one of the round's folders runs: a fetch racing an APPEND could record the
appended message a second time (the state refuses that, but the round would
then fail).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

from mirrord._crashpoints import crash_point
from mirrord.config import Account
from mirrord.flags import Flags, representable
from mirrord.headers import message_id
from mirrord.pool import Worker, WorkerPool
from mirrord.protocol.client import MailboxStatus, MirrordIMAP4Client, uid_set
from mirrord.protocol.errors import CommandFailed
from mirrord.store.maildir import LocalFile, Maildir, Trash
from mirrord.store.state import Intent, MailboxRecord, MessageRecord, StateDB
from mirrord.sync.engine import same_flags
from mirrord.sync.rematch import Identity
from mirrord.sync.stamp import maildir_stamp
from mirrord.sync.twoway import (
    DELETED,
    Append,
    Folder,
    FolderPlan,
    Move,
    identity_request,
    plan_round,
    settle_move,
)
from mirrord.units import plural

log = logging.getLogger("mirrord.sync")

REPLANS = 3
"""Rounds planned at most in one go when one turns out otherwise than planned (see ``PushResult.again``)."""

HEAD_BYTES = 65536
"""How much of a new file is read for its Message-ID."""


@dataclass(frozen=True)
class PushFolder:
    """One mirrored folder, as the round needs it."""

    name: str
    """Local name (``/`` hierarchy)."""
    raw_name: bytes
    path: Path
    trash: Trash | None = None


@dataclass
class PushResult:
    """What one round did, for the log, ``status`` and the exit code."""

    account: str
    stored: int = 0
    deleted: int = 0
    appended: int = 0
    moved: int = 0
    renamed: int = 0
    refetch: set[str] = field(default_factory=set)
    """Folders whose pull must look again (files to fetch back)."""
    refused: dict[str, str] = field(default_factory=dict)
    """Folder -> why nothing of it was sent (it waits for the user)."""
    failed: int = 0
    """Changes the server refused (NO/BAD): logged, left for the next round."""
    again: bool = False
    """Something turned out otherwise than planned (a move's source was gone):
    plan once more before anything is fetched."""

    def add(self, other: PushResult) -> None:
        self.stored += other.stored
        self.deleted += other.deleted
        self.appended += other.appended
        self.moved += other.moved
        self.renamed += other.renamed
        self.failed += other.failed
        self.refetch |= other.refetch
        self.refused = other.refused

    @property
    def changed(self) -> bool:
        return bool(self.stored or self.deleted or self.appended or self.moved or self.renamed)


def file_identity(path: Path) -> Identity | None:
    """Message-ID and size as the server counts it (CRLF line ends) of a local file."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head = data[:HEAD_BYTES]
    end = head.find(b"\n\n")
    mid = message_id(head if end < 0 else head[: end + 1])
    if mid is None:
        return None
    return Identity(mid, len(data) + data.count(b"\n") - data.count(b"\r\n"))


def _internal_date(path: Path) -> str | None:
    """The file's mtime as an IMAP date-time: a moved-in message keeps its date."""
    try:
        when = datetime.fromtimestamp(os.stat(path).st_mtime, UTC)
    except OSError:
        return None
    day = format_datetime(when)  # "Sat, 05 Dec 2026 17:00:00 +0000"
    _, d, mon, year, clock, zone = day.split()
    return f"{int(d):2d}-{mon}-{year} {clock} {zone}"


def _is_tombstone(row: MessageRecord, files: Mapping[str, LocalFile]) -> bool:
    """Deleted on purpose (``local_delete: flag``, or a COPY's original without UIDPLUS):
    no file, ``\\Deleted`` in the row; nothing to send until the server expunges it."""
    return row.key not in files and any(f.lower() == "\\deleted" for f in row.flags)


_Scan = tuple[dict[int, MessageRecord], dict[str, LocalFile] | None]
"""A folder's rows and its Maildir listing (None: ``cur/`` or ``new/`` is missing)."""


def _local_changes(rows: Mapping[int, MessageRecord], files: Mapping[str, LocalFile] | None) -> bool:
    """Whether the reader changed anything in this folder since its rows were written."""
    if files is None:
        return bool(rows)
    return bool(_to_ask(rows, files)) or _has_fresh(rows, files)


def _to_ask(rows: Mapping[int, MessageRecord], files: Mapping[str, LocalFile]) -> list[int]:
    """Rows whose file is gone or carries other letters: their server flags are needed."""
    return sorted(
        uid for uid, row in rows.items()
        if not _is_tombstone(row, files)
        and (row.key not in files or not same_flags(files[row.key].flags, representable(row.flags)))
    )


def _has_fresh(rows: Mapping[int, MessageRecord], files: Mapping[str, LocalFile]) -> bool:
    """A file no row names (a new message, or one renamed or moved in)."""
    keys = {row.key for row in rows.values()}
    return any(key not in keys for key in files)


def _by_folder(pairs: Iterable[tuple[str, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name, uid in pairs:
        out.setdefault(name, []).append(uid)
    return {name: sorted(uids) for name, uids in out.items()}


class _Lookup:
    """What the round learned about one folder's server side."""

    def __init__(self) -> None:
        self.status: MailboxStatus | None = None
        self.flags: dict[int, Flags] = {}
        self.asked: set[int] = set()


class Pusher:
    """Sends one account's local changes; see the module docstring."""

    def __init__(
        self,
        account: Account,
        state: StateDB,
        pool: WorkerPool,
        folders: Mapping[str, PushFolder],
        *,
        allow_delete: Callable[[str], bool] = lambda name: False,
    ) -> None:
        self.account = account
        self.state = state
        self.pool = pool
        self.folders = dict(folders)
        self.allow_delete = allow_delete
        self._said_no_uidplus = False
        self._said_refused: dict[str, str] = {}
        self._current: tuple[MirrordIMAP4Client, str, MailboxStatus] | None = None
        """What this round has SELECTed, on which connection."""

    async def round(self, names: Iterable[str] | None = None) -> PushResult:
        """One round over ``names`` (default: every folder). Raises on connection trouble."""
        wanted = sorted(set(names) if names is not None else set(self.folders))
        records = {n: self.state.mailbox(self.account.name, n) for n in wanted if n in self.folders}
        wanted = [n for n, record in records.items() if record is not None]
        result = PushResult(self.account.name)
        untouched = {name for name in wanted if self._untouched(name, records[name])}
        for name in sorted(untouched):
            log.debug("%s/%s: Maildir as the last sync left it: nothing to send", self.account.name, name)
        first: dict[str, _Scan] | None = {name: self._scan(name) for name in wanted if name not in untouched}
        if not self.state.intents(self.account.name) and not any(_local_changes(*scan) for scan in first.values()):
            return result
        # Work to do: the plan sees every folder, as it always has (a file
        # copied in from an untouched folder is matched to its rows there).
        first.update({name: self._scan(name) for name in untouched})

        async def job(worker: Worker) -> PushResult:
            nonlocal first
            self._current = None
            total = PushResult(self.account.name)
            for _ in range(REPLANS):
                part = PushResult(self.account.name)
                # The look that found work is the first plan's; a retry or a
                # second plan looks again (the disk, or the state, moved on).
                scans, first = first or {name: self._scan(name) for name in wanted}, None
                await self._round(worker, scans, part)
                total.add(part)
                if not part.again:
                    break
            return total

        result = await self.pool.run(job, f"sending local changes of {self.account.name}")
        self._log(result, wanted)
        return result

    # -- looking ------------------------------------------------------------------

    def _untouched(self, name: str, record: MailboxRecord | None) -> bool:
        """Nothing local to send in ``name``, known without listing it or reading its rows.

        The last pull found new/ and cur/ holding exactly the recorded files,
        each with its recorded flags, and recorded their mtimes then (with the
        margin that keeps a later change from carrying the same mtime; see
        :mod:`mirrord.sync.stamp`). A reader's new, renamed or deleted file
        changes an mtime, so while both are the same the folder is as the rows
        say: a no-change catch-up of 10,000 messages costs two stat calls here
        instead of a listing and 10,000 rows (issue #15).
        """
        if record is None or record.maildir_stamp is None or not record.maildir_exact:
            return False
        if maildir_stamp(self.folders[name].path) != record.maildir_stamp:
            return False
        return not self.state.pending(self.account.name, name)

    def _scan(self, name: str) -> _Scan:
        folder = self.folders[name]
        rows = self.state.messages(self.account.name, name)
        if not ((folder.path / "cur").is_dir() and (folder.path / "new").is_dir()):
            return rows, None
        files = Maildir(folder.path).scan()
        for record in self.state.pending(self.account.name, name).values():
            files.pop(record.key, None)  # a delivery in flight, not a reader's file
        return rows, files

    async def _select(self, worker: Worker, name: str, *, fresh: bool = False) -> MailboxStatus:
        """SELECT ``name`` unless this round has it selected on this connection already."""
        client = await worker.connection()
        worker.selected = None  # SELECTed, not EXAMINEd: the next reader EXAMINEs afresh
        worker.status = None
        current = self._current
        if not fresh and current is not None and current[0] is client and current[1] == name:
            return current[2]
        self._current = None
        status = await client.select(self.folders[name].raw_name)
        self._current = (client, name, status)
        return status

    # -- the round ----------------------------------------------------------------

    async def _round(self, worker: Worker, scans: dict[str, _Scan], result: PushResult) -> None:
        client = await worker.connection()
        if await self._recover(worker, result):
            scans = {name: self._scan(name) for name in scans}  # the rows moved on
        uidplus = "UIDPLUS" in client.capabilities
        policy = self.account.local_delete
        if policy == "expunge" and not uidplus:
            if not self._said_no_uidplus:
                log.warning("%s: the server has no UIDPLUS: messages deleted locally are marked \\Deleted "
                            "there, and go when another client expunges", self.account.name)
                self._said_no_uidplus = True
            policy = "flag"
        lookups: dict[str, _Lookup] = {}
        newer_known: set[str] = set()

        async def newer(name: str) -> None:
            """Mail new on the server may be a new file's own message (another client
            moved it there; our APPEND whose UID we never learnt): offered to the
            plan, which adopts it rather than upload it a second time."""
            rows, _ = scans[name]
            look = lookups.get(name)
            if look is None:
                look = lookups[name] = _Lookup()
                look.status = await self._select(worker, name)
            newer_known.add(name)
            if look.status is None or not look.status.exists:
                return
            await self._select(worker, name)
            highest = max(rows, default=0)
            listing = await client.uid_fetch_listing(b"%d:*" % (highest + 1))
            look.flags.update({uid: e.flags for uid, e in listing.items() if uid > highest})

        for name, (rows, files) in scans.items():
            if files is None:
                continue
            ask = _to_ask(rows, files)
            if not ask and not _has_fresh(rows, files):
                continue
            look = lookups[name] = _Lookup()
            look.status = await self._select(worker, name)
            if ask:
                look.asked = set(ask)
                listing = await client.uid_fetch_listing(uid_set(ask))
                look.flags = {uid: e.flags for uid, e in listing.items()}
            if _has_fresh(rows, files):
                await newer(name)

        def folders_now() -> dict[str, Folder]:
            return {
                name: Folder(
                    rows=rows,
                    files=files,
                    server=lookups[name].flags if name in lookups else {},
                    complete=False,
                    expunged=frozenset(lookups[name].asked - set(lookups[name].flags)) if name in lookups else frozenset(),
                    allow_delete=self.allow_delete(name),
                )
                for name, (rows, files) in scans.items()
                if files is not None or rows
            }

        folders = folders_now()
        new, gone, unknown = identity_request(folders)
        if new and gone and len(newer_known) < len(folders):
            # Something vanished and something appeared: the message may have
            # been moved on the server too, to any folder of the round.
            for name in sorted(folders):
                if name not in newer_known and folders[name].files is not None:
                    await newer(name)
            folders = folders_now()
            new, gone, unknown = identity_request(folders)
        new_identity = {}
        for name, key in new:
            lf = folders[name].files[key]  # type: ignore[index]
            new_identity[(name, key)] = file_identity(self.folders[name].path / lf.subdir / lf.filename)
        # A vanished row's identity: recorded at fetch (Message-ID and size),
        # else (rows from before v5) asked of the server while it still has it.
        gone_identity: dict[tuple[str, int], Identity | None] = {}
        by_folder: dict[str, list[int]] = {}
        for name, uid in gone:
            row = folders[name].rows[uid]
            if row.message_id is not None and row.size is not None:  # type: ignore[attr-defined]
                gone_identity[(name, uid)] = Identity(row.message_id, row.size)  # type: ignore[attr-defined]
            elif uid in folders[name].server:
                by_folder.setdefault(name, []).append(uid)
        for name, uids in sorted(by_folder.items()):
            await self._select(worker, name)
            found = await client.uid_fetch_identities(uid_set(uids))
            for uid, (size, header) in found.items():
                mid = message_id(header)
                gone_identity[(name, uid)] = Identity(mid, size) if mid else None
        server_identity: dict[tuple[str, int], Identity | None] = {}
        for name, uids in sorted(_by_folder(unknown).items()):
            await self._select(worker, name)
            found = await client.uid_fetch_identities(uid_set(uids))
            for uid, (size, header) in found.items():
                mid = message_id(header)
                server_identity[(name, uid)] = Identity(mid, size) if mid else None
        plan = plan_round(
            folders,
            policy=policy,
            max_delete=self.account.max_delete,
            new_identity=new_identity,
            gone_identity=gone_identity,
            server_identity=server_identity,
        )
        for name, fplan in sorted(plan.folders.items()):
            if fplan.refused:
                result.refused[name] = fplan.refused
                continue
            await self._apply_folder(worker, name, fplan, scans[name], lookups.get(name), result, uidplus)
        await self._apply_moves(worker, plan.moves, result)
        for name, fplan in sorted(plan.folders.items()):
            for append in fplan.append:
                await self._append(worker, name, append, result)

    async def _apply_folder(
        self, worker: Worker, name: str, plan: FolderPlan,
        scan: _Scan,
        look: _Lookup | None, result: PushResult, uidplus: bool,
    ) -> None:
        account = self.account.name
        rows, files = scan
        files = files or {}
        folder = self.folders[name]
        maildir = Maildir(folder.path)
        label = f"{account}/{name}"
        for conflict in plan.conflicts:
            log.info("%s: UID %d: %s", label, conflict.uid, conflict.what)
        if plan.remove_local or plan.remove_files:
            keys = [rows[uid].key for uid in plan.remove_local] + list(plan.remove_files)
            maildir.remove_many(keys, {k: files[k] for k in keys if k in files}, folder.trash)
            self.state.remove_messages(account, name, plan.remove_local)
        if plan.forget:
            self.state.remove_messages(account, name, plan.forget)
        for adopt in plan.adopt:
            maildir.set_flags(adopt.key, adopt.flags, files.get(adopt.key), sync=False)
            self.state.add_messages(account, name, [MessageRecord(adopt.uid, adopt.key, adopt.base, None)])
        for rekey in plan.rekey:
            self.state.rekey(account, name, rekey.uid, rekey.new_key, rows[rekey.uid].flags)
            result.renamed += 1
        client = await worker.connection()
        modified: set[int] = set()
        if plan.store or plan.delete:
            status = await self._select(worker, name)
            since = look.status.highestmodseq if look is not None and look.status is not None else status.highestmodseq
            # One UID STORE for every message that gets the same change: a
            # reader marking a thread read costs one round trip, not one each.
            groups: dict[tuple[Flags, Flags], list[int]] = {}
            for store in plan.store:
                groups.setdefault((frozenset(store.add), frozenset(store.remove)), []).append(store.uid)
            for (add, remove), uids in sorted(groups.items(), key=lambda g: g[1]):
                refused = await client.uid_store(uids, sorted(add), sorted(remove), unchanged_since=since)
                if refused:
                    log.info("%s: %d messages changed on the server meanwhile (UID %s); merged again next round",
                             label, len(refused), ",".join(map(str, sorted(refused))))
                modified |= refused
                crash_point("after-store")
                result.stored += len(set(uids) - refused)
        touched: set[str] = set()
        for change in plan.local_flags:
            if change.uid in modified:
                continue
            try:
                after = maildir.set_flags(change.key, change.flags, files.get(change.key), sync=False)
            except FileNotFoundError:
                continue
            touched.add(after.subdir)
        maildir.sync_dirs(touched or ())
        base = {uid: flags for uid, flags in plan.base.items() if uid not in modified and uid in rows}
        if base:
            self.state.set_flags(account, name, base)
        if plan.delete:
            await client.uid_store(plan.delete, add=[DELETED])
            if plan.expunge and uidplus:
                await client.uid_expunge(plan.delete)
                crash_point("after-expunge")
                self.state.remove_messages(account, name, plan.delete)
            else:
                self.state.set_flags(
                    account, name, {uid: frozenset(rows[uid].flags) | {DELETED} for uid in plan.delete if uid in rows}
                )
            result.deleted += len(plan.delete)
        if plan.refetch:
            # Deleted locally, kept on the server (``keep``, or changed there):
            # the pull fetches them again as the new messages they now are.
            self.state.remove_messages(account, name, plan.refetch)
            result.refetch.add(name)

    async def _apply_moves(self, worker: Worker, moves: Iterable[Move], result: PushResult) -> None:
        """The reader's moves, one ``UID MOVE`` per (source, target): a thread moved costs one command."""
        client = await worker.connection()
        account = self.account.name
        groups: dict[tuple[str, str], list[Move]] = {}
        for move in moves:
            groups.setdefault((move.source, move.target), []).append(move)
        for (source, target_name), group in sorted(groups.items()):
            target = self.folders[target_name]
            status = await self._select(worker, target_name, fresh=True)
            crash_point("before-move")
            paths: dict[str, Path | None] = {}
            idents: dict[str, Identity | None] = {}
            intents: dict[str, int] = {}
            with self.state.transaction():  # one fsync for the group's intents
                for move in group:
                    path = paths[move.key] = self._file_path(target_name, move.key)
                    ident = idents[move.key] = file_identity(path) if path is not None else None
                    intents[move.key] = self.state.add_intent(Intent(
                        0, account, target_name, move.key, "move", source, move.uid, status.uidvalidity,
                        status.uidnext, ident.message_id if ident else None, ident.size if ident else None,
                        move.base,
                    ))
            await self._select(worker, source)
            try:
                copyuid = await client.uid_move([m.uid for m in group], target.raw_name)
            except CommandFailed as e:
                with self.state.transaction():
                    for intent_id in intents.values():
                        self.state.drop_intent(intent_id)
                self._current = None
                log.error("%s: the server refused to move %d messages from %s to %s: %s; tried again next round",
                          account, len(group), source, target_name, e)
                result.failed += len(group)
                continue
            self._current = None  # the source changed under the selection
            crash_point("after-move")
            stores: list[tuple[int, Move]] = []
            for move in group:
                outcome = settle_move(move, copyuid)
                ident, intent_id = idents[move.key], intents[move.key]
                if outcome.new_uid is not None:
                    self._record_moved(move, outcome.new_uid, ident, intent_id, client)
                    stores.append((outcome.new_uid, move))
                    result.moved += 1
                elif outcome.unknown:
                    found = await self._find(worker, target_name, status, ident)
                    if found is not None:
                        self._record_moved(move, found, ident, intent_id, client)
                        stores.append((found, move))
                        result.moved += 1
                    else:
                        self._give_up(target_name, move.key, intent_id, result)
                else:
                    # source_gone: the server moved nothing (the UID went meanwhile,
                    # expunged or moved on by another client). Nothing is recorded:
                    # the source row stays as the evidence the next plan needs,
                    # the file stays unrecorded, and the round is planned again
                    # at once, before any fetch could bring the message back.
                    self.state.drop_intent(intent_id)
                    result.again = True
            if any(m.add or m.remove for _, m in stores):
                await self._select(worker, target_name)
                for uid, move in stores:
                    if move.add or move.remove:
                        await client.uid_store([uid], move.add, move.remove)
            target_dir = Maildir(target.path)
            for _, move in stores:
                if paths[move.key] is not None:
                    try:
                        target_dir.set_flags(move.key, move.local_flags, sync=False)
                    except FileNotFoundError:
                        pass
            target_dir.sync_dirs()

    def _record_moved(
        self, move: Move, new_uid: int, ident: Identity | None, intent_id: int, client: MirrordIMAP4Client
    ) -> None:
        account = self.account.name
        record = MessageRecord(new_uid, move.key, move.base, ident.size if ident else None,
                               ident.message_id if ident else None)
        with self.state.transaction():
            # The source row goes if there is one (a UID another client moved
            # has none), and so does the row whose lost content this was.
            self.state.move_row(account, move.source, move.uid, move.target, record, intent_id)
            if move.lost is not None:
                self.state.remove_messages(account, move.lost[0], [move.lost[1]])
        if "MOVE" not in client.capabilities and "UIDPLUS" not in client.capabilities:
            self._tombstone(move.source, move.uid, move.key)

    def _tombstone(self, source: str, uid: int, key: str) -> None:
        """COPY left the original marked \\Deleted (no UID EXPUNGE without UIDPLUS):
        a row without a file keeps the pull from fetching it back until a client expunges it."""
        self.state.add_messages(self.account.name, source, [MessageRecord(uid, f"moved-{key}", frozenset({DELETED}), None)])

    async def _append(self, worker: Worker, name: str, append: Append, result: PushResult) -> None:
        client = await worker.connection()
        account = self.account.name
        path = self._file_path(name, append.key)
        if path is None:
            return  # gone meanwhile: the next round sees nothing to send
        ident = file_identity(path)
        status = await self._select(worker, name, fresh=True)
        intent_id = self.state.add_intent(Intent(
            0, account, name, append.key, "append", None, None, status.uidvalidity, status.uidnext,
            ident.message_id if ident else None, ident.size if ident else None, append.flags,
        ))
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            self.state.drop_intent(intent_id)
            return
        try:
            tied = await client.append(self.folders[name].raw_name, body, sorted(append.flags), _internal_date(path))
        except CommandFailed as e:
            # Refused (too big, over quota...): this file stays local and the
            # others go on; the next round tries it again.
            self.state.drop_intent(intent_id)
            self._current = None
            log.error("%s/%s: the server refused a new message (%s): %s", account, name, path.name, e)
            result.failed += 1
            return
        crash_point("after-append")
        size = len(body) + body.count(b"\n") - body.count(b"\r\n")
        if tied is not None and tied[0] == status.uidvalidity:
            uid: int | None = tied[1]
        else:
            uid = await self._find(worker, name, status, ident)
        if uid is None:
            self._give_up(name, append.key, intent_id, result)
        else:
            record = MessageRecord(uid, append.key, append.flags, size, ident.message_id if ident else None)
            self.state.move_row(account, name, None, name, record, intent_id)
            if append.replaces is not None:
                log.info("%s/%s: a message whose content changed locally was uploaded as a new one",
                         account, name)
        result.appended += 1

    async def _find(
        self, worker: Worker, name: str, before: MailboxStatus, ident: Identity | None
    ) -> int | None:
        """The UID a message we just put in ``name`` got, when the server did not say (no UIDPLUS)."""
        if ident is None or before.uidnext is None:
            return None
        client = await worker.connection()
        status = await self._select(worker, name, fresh=True)
        if status.uidvalidity != before.uidvalidity or status.exists == 0:
            return None
        found = await client.uid_fetch_identities(b"%d:*" % before.uidnext)
        known = self.state.uids(self.account.name, name)
        for uid in sorted(found):
            size, header = found[uid]
            if uid >= before.uidnext and uid not in known and Identity(message_id(header), size) == ident:
                return uid
        return None

    def _give_up(self, name: str, key: str, intent_id: int, result: PushResult) -> None:
        """The server has the message but did not say under which UID: our copy
        goes to the trash and the pull fetches the server's, so it is not there twice."""
        folder = self.folders[name]
        Maildir(folder.path).remove_many([key], None, folder.trash)
        self.state.drop_intent(intent_id)
        result.refetch.add(name)
        log.info("%s/%s: the server did not say which UID a sent message got; its copy is fetched back "
                 "(the local file is in the trash)", self.account.name, name)

    def _file_path(self, name: str, key: str) -> Path | None:
        maildir = Maildir(self.folders[name].path)
        found = maildir.locate(key, frozenset())
        return maildir.path / found.subdir / found.filename if found is not None else None

    # -- crash recovery -----------------------------------------------------------------

    async def _recover(self, worker: Worker, result: PushResult) -> bool:
        """Settle intents a crash left: find each message or forget the intent. True if there were any."""
        client = await worker.connection()
        account = self.account.name
        intents = self.state.intents(account)
        for intent in intents:
            if intent.mailbox not in self.folders or intent.uidnext is None:
                self.state.drop_intent(intent.id)
                continue
            status = await self._select(worker, intent.mailbox)
            uid = None
            if status.uidvalidity == intent.uidvalidity and intent.message_id is not None:
                uid = await self._find(
                    worker, intent.mailbox, MailboxStatus(0, intent.uidvalidity, intent.uidnext, None),
                    Identity(intent.message_id, intent.size),
                )
            if uid is None:
                self.state.drop_intent(intent.id)
                continue
            record = MessageRecord(uid, intent.key, intent.flags, intent.size, intent.message_id)
            self.state.move_row(account, intent.source or intent.mailbox, intent.source_uid, intent.mailbox,
                                record, intent.id)
            log.info("%s/%s: an interrupted %s had reached the server (UID %d); recorded, not sent again",
                     account, intent.mailbox, intent.kind, uid)
            if intent.kind == "move" and intent.source and intent.source_uid is not None:
                # COPY may have happened without its \Deleted and EXPUNGE.
                await self._select(worker, intent.source)
                still = await client.uid_fetch_listing(uid_set([intent.source_uid]))
                if intent.source_uid in still:
                    await client.uid_store([intent.source_uid], add=[DELETED])
                    if "UIDPLUS" in client.capabilities:
                        await client.uid_expunge([intent.source_uid])
                    else:
                        self._tombstone(intent.source, intent.source_uid, intent.key)
            result.moved += intent.kind == "move"
            result.appended += intent.kind == "append"
        return bool(intents)

    def _log(self, result: PushResult, rounded: Iterable[str]) -> None:
        done = []
        for count, what in ((result.stored, "flag change"), (result.deleted, "deletion"),
                            (result.moved, "move"), (result.appended, "new message"),
                            (result.renamed, "rename")):
            if count:
                done.append(plural(count, what))
        if done:
            log.info("%s: sent local changes to the server: %s", self.account.name, ", ".join(done))
        for name in rounded:
            if name not in result.refused:
                self._said_refused.pop(name, None)
        for name, why in sorted(result.refused.items()):
            if self._said_refused.get(name) == why:
                continue  # said already (the daemon looks again at every change)
            self._said_refused[name] = why
            log.error("%s/%s: local changes NOT sent: %s; nothing was deleted on the server. If this is "
                      "what you did, allow it once: `mirrord run --once --allow-delete %s/%s`",
                      self.account.name, name, why, self.account.name, name)

