"""Two-way decisions: what a reader did to the Maildir, and what the server must get.

Pure functions, no I/O, in the style of :mod:`mirrord.sync.engine`: the
caller scans the Maildir, reads the state rows and the server's flags, and
hands them over; :func:`plan_round` returns plain actions. Keeping them free
of I/O is what lets a model-based test drive random interleavings of local
and server changes through them (tests/unit/test_twoway.py).

The rules (issue #12):

Flags
    Merged per flag, three ways, for the five flags a Maildir name carries
    (S R F T D). The *base* is the row's flags: the last flags both sides
    agreed on. A flag changed on one side only goes to the other; changed on
    both sides it has the same value on both (a flag is a boolean: both sides
    can only have flipped it the same way), so nothing is sent. Keywords
    (``$Junk``...) are not in file names: they stay as the server has them.
    ``\\Recent`` is not a flag mirrord keeps: it is ignored everywhere.
    A file moved from ``new/`` to ``cur/`` without letters is *not* a flag
    change: readers (neomutt) do it to mark mail "not new", i.e. seen in a
    listing, not read; the only IMAP counterpart would be ``\\Recent``, which
    no client can store. So nothing is sent, and the store never moves the
    file back (see ``_placement`` in the Maildir store).

Deletions
    A row whose file is gone, which the server still has, is deleted there
    under the ``delete`` policy: ``expunge`` (``\\Deleted`` then ``UID
    EXPUNGE`` of exactly those UIDs), ``flag`` (``\\Deleted`` only; the row
    stays as a *tombstone* with ``\\Deleted`` in its base, so it is neither
    fetched back nor deleted again) or ``keep`` (fetched back, the one-way
    behaviour). If the server changed the message's flags since the base
    (both sides changed it), the server wins: it is fetched back, and the
    plan reports a conflict. A folder whose ``new/`` or ``cur/`` is missing,
    or which lost more than ``max_delete`` of its rows (and more than
    :data:`DELETE_FLOOR`) in one round, gets no actions at all and a reason
    (``FolderPlan.refused``); its vanished rows are neither deleted nor
    fetched back, and files elsewhere whose content came from it are held.

New files, moves, renames
    A file whose key no row has is APPENDed with its flags; unless its
    content (an identity the caller computes: digest, or Message-ID and
    size) is that of a row whose file vanished in the same round: in the
    same folder that is a reader's rename (mu): the row is re-keyed, nothing
    goes to the server; in another folder it is a move (UID MOVE, or its
    fallback), no upload. A file whose content changed (the caller says so)
    is a new file under an old key, and its row a row whose content went:
    each is paired as above (a file moved back into a folder keeps its
    name, which a row there may still have), and if unpaired, the file is
    APPENDed as a new message (flags merged against the row's) and the old
    UID deleted as for a deletion (under ``keep`` it stays, unrowed, and is
    fetched again under a new key). Such a row is never fetched back under
    its key, and does not count towards ``max_delete``.

The server's word wins where it is final
    A message the server expunged (absent from a complete listing, or named
    by EXPUNGE/VANISHED) loses its row and its local file, even if its flags
    changed locally meanwhile. If its file was meanwhile moved to another
    folder, or its content changed, that file is APPENDed there: the message
    ends in exactly one place, the one the reader put it in. If another
    client moved it on the server meanwhile (a new UID in some folder, the old
    one gone), the reader's file is matched with that UID (adopted where it
    is, or moved there: :class:`Move` of a UID no row names). A move whose
    source was gone *after* this plan was made is settled by
    :func:`settle_move`: no COPYUID entry for it means the server moved
    nothing; the caller then runs another round before fetching, which
    settles it as above.

Applying a plan (what the wiring must do; the model in
tests/unit/test_twoway.py, ``Model.apply``, does exactly this)
    1. Per folder that is not ``refused``, in this order: ``remove_local``
       (drop the row, delete its file if there); ``remove_files``;
       ``forget`` (drop the row, keep the file); ``adopt`` (record the row,
       rename the file to carry ``flags``); ``rekey``; ``store`` with
       ``UNCHANGEDSINCE`` the modseq the plan's server view was read at (a
       MODIFIED UID gets none of its ``local_flags`` and ``base``: the next
       round merges again); ``local_flags``; ``base`` (rows still there);
       ``delete`` (``\\Deleted``; if ``expunge``, ``UID EXPUNGE`` of exactly
       those UIDs and their rows dropped).
    2. Then every ``RoundPlan.moves``, in order: UID MOVE, then
       :func:`settle_move`. ``source_gone``: do nothing at all for it (the
       source row, if any, stays; the target file stays untracked) and
       remember to plan again. Otherwise: drop the source row *if there is
       one* (an adopted UID has none) and the ``lost`` row if named, STORE ``add``/``remove`` on the new
       UID, rename the target file to carry ``local_flags``, record the row
       (new UID, ``key``, ``base``) in ``target``.
    3. Then each folder's ``append``: APPEND the file if it is still there,
       record the row (new UID, ``key``, ``flags``). A row whose content
       changed is in ``forget`` (step 1) before the append re-uses its key.
    4. If a move was ``source_gone``: plan and apply again (a fresh server
       view), before any fetch; a few times at most (the model: twice).
    5. Then the one-way sync: rows of UIDs the server no longer lists go with
       their files, new UIDs are fetched, ``refetch`` rows are fetched back,
       ``tombstones`` are not.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mirrord.flags import Flags, flags_from_info, maildir_info
from mirrord.store.maildir import LocalFile
from mirrord.sync.engine import Known

DeletePolicy = Literal["expunge", "flag", "keep"]

DELETE_FLOOR = 5
"""A round may always delete this many messages of a folder: a reader
deleting a few of a small folder's messages is not a mass disappearance."""

SYSTEM_LETTERS = "DFRST"
"""The Maildir info letters of the flags that are merged (all others are the server's)."""

_MERGED = {f.lower() for f in flags_from_info(SYSTEM_LETTERS)}
_RECENT = "\\recent"
DELETED = "\\Deleted"


@dataclass(frozen=True)
class Folder:
    """One mirrored mailbox, as the caller found it this round."""

    rows: Mapping[int, Known]
    """State rows by UID; their flags are the base (last flags both sides agreed on)."""
    files: Mapping[str, LocalFile] | None
    """The Maildir scan (key -> file), or None when ``new/`` or ``cur/`` is missing.
    The caller leaves out files of deliveries still in flight (pending rows)."""
    server: Mapping[int, Flags] = field(default_factory=dict)
    """The server's current flags, for the UIDs the caller knows them of."""
    complete: bool = False
    """``server`` lists every UID of the mailbox: a row's UID absent from it was expunged.
    Otherwise a row's UID absent from it is taken to still have its base flags."""
    expunged: frozenset[int] = frozenset()
    """UIDs the server reported expunged (EXPUNGE, VANISHED) since the rows were written."""
    changed_content: frozenset[int] = frozenset()
    """Rows whose file's content changed (the caller compares sizes)."""
    allow_delete: bool = False
    """The user allowed this folder's local deletions once (``--allow-delete``): no guard."""


@dataclass(frozen=True)
class StoreFlags:
    """``UID STORE uid +FLAGS.SILENT (add)`` and ``-FLAGS.SILENT (remove)``."""

    uid: int
    add: Flags = frozenset()
    remove: Flags = frozenset()


@dataclass(frozen=True)
class Append:
    """APPEND a local file; its row is then (new UID, ``key``, ``flags``)."""

    key: str
    flags: Flags
    """The flags to APPEND with, and the row's base afterwards."""
    replaces: int | None = None
    """The UID whose content this file had (content changed): delete it after, per policy.
    Its row goes once the append is recorded; the file keeps its key."""


@dataclass(frozen=True)
class LocalFlags:
    """Rename a local file so its name carries ``flags`` (a server change reaching the file)."""

    uid: int
    key: str
    flags: Flags


@dataclass(frozen=True)
class Adopt:
    """Record the row (``uid``, ``key``, ``base``) and rename the file to carry ``flags``.

    Nothing goes to the server: it has the message already, with its flags
    (no base is known to merge against, so the server's win)."""

    uid: int
    key: str
    flags: Flags
    base: Flags


@dataclass(frozen=True)
class Rekey:
    """A reader renamed a file within the folder (mu): the row now names ``new_key``."""

    uid: int
    old_key: str
    new_key: str


@dataclass(frozen=True)
class Move:
    """The reader moved a message's file from one mirrored folder to another.

    ``UID MOVE uid`` from ``source`` to ``target`` (or COPY, ``\\Deleted``,
    ``UID EXPUNGE``); then, with the new UID from COPYUID, a STORE of
    ``add``/``remove`` on it, the file renamed to carry ``local_flags`` if it
    does not, and the row (new UID, ``key``, ``base``) recorded in ``target``.
    The source row, if there is one, goes. There is none when ``uid`` is a UID
    no row names: another client moved the message there on the server while
    the reader moved its file (see the module's docstring); then ``add`` and
    ``remove`` are empty and the server's flags win, as for :class:`Adopt`.
    """

    source: str
    uid: int
    target: str
    key: str
    local_flags: Flags
    """Merged representable flags the target file must carry."""
    add: Flags
    remove: Flags
    """What to STORE on the moved message (relative to its flags in the source)."""
    base: Flags
    """The target row's flags afterwards (merged, keywords as the server had them)."""
    lost: tuple[str, int] | None = None
    """For a move of a UID no row names: the row (folder, UID) that lost this
    content (its UID expunged, its file gone), the evidence that the reader
    moved this message. It is in no ``remove_local``: drop it once the move is
    done; if ``source_gone``, leave it, so the next plan has the evidence again."""


@dataclass(frozen=True)
class Conflict:
    uid: int
    what: str
    """For the log: what both sides did and what won."""


@dataclass(frozen=True)
class FolderPlan:
    """What one folder's round does. Apply it as the module's docstring says ("Applying a plan")."""

    refused: str | None = None
    """Why nothing at all is done for this folder (the caller stops it and says so)."""
    store: tuple[StoreFlags, ...] = ()
    delete: tuple[int, ...] = ()
    """UIDs to mark ``\\Deleted`` on the server (and ``UID EXPUNGE`` if ``expunge``)."""
    expunge: bool = False
    """Deleted UIDs are expunged (policy ``expunge``); else their rows stay as tombstones."""
    append: tuple[Append, ...] = ()
    local_flags: tuple[LocalFlags, ...] = ()
    rekey: tuple[Rekey, ...] = ()
    remove_local: tuple[int, ...] = ()
    """Expunged on the server: the row goes, and its file if it is still there
    (even if its flags changed locally: the server's expunge wins)."""
    remove_files: tuple[str, ...] = ()
    """Keys of files to remove that no row names: a reader renamed the file of a
    message the server expunged."""
    forget: tuple[int, ...] = ()
    """Rows to drop, leaving their file alone: its content changed, so it is a
    new message now (in ``append`` under the same key)."""
    refetch: tuple[int, ...] = ()
    """Rows whose file is gone and that the server keeps: the one-way engine fetches them."""
    tombstones: tuple[int, ...] = ()
    """Rows without a file on purpose (deleted locally, ``\\Deleted`` on the server,
    policy ``flag``): the engine must not fetch them back."""
    held: tuple[str, ...] = ()
    """New files not acted on this round: their content came from a refused folder."""
    adopt: tuple[Adopt, ...] = ()
    """New files the server already holds in this folder under a UID no row names."""
    base: Mapping[int, Flags] = field(default_factory=dict)
    """UID -> the row's flags once the store/local actions above are done
    (rows whose agreed flags change; deleted rows under ``flag`` get ``\\Deleted``)."""
    conflicts: tuple[Conflict, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (
            self.store or self.delete or self.append or self.local_flags or self.rekey
            or self.remove_local or self.remove_files or self.forget or self.refetch or self.base
            or self.adopt
        )


@dataclass(frozen=True)
class RoundPlan:
    folders: Mapping[str, FolderPlan]
    moves: tuple[Move, ...] = ()
    """Do these after the folders' row and server actions and before their
    appends. A move whose source was gone does nothing, and the round must be
    planned again before fetching (:attr:`MoveOutcome.source_gone`)."""


@functools.lru_cache(maxsize=4096)
def _representable(flags: Flags) -> Flags:
    """:func:`representable_part` of a row's flags, cached: a folder has few distinct flag sets."""
    return representable_part(flags)


def representable_part(flags: Iterable[str]) -> Flags:
    """The merged flags among ``flags``, canonically spelled."""
    return flags_from_info(maildir_info(frozenset(flags)))


def server_only_part(flags: Iterable[str]) -> Flags:
    """The flags a Maildir name cannot carry (keywords), ``\\Recent`` left out."""
    return frozenset(f for f in flags if f.lower() not in _MERGED and f.lower() != _RECENT)


def comparable(flags: Iterable[str]) -> Flags:
    """Flags as compared: system flags case-insensitive, keywords as sent, no ``\\Recent``."""
    out = set()
    for f in flags:
        if f.startswith("\\"):
            f = f.lower()
            if f == _RECENT:
                continue
        out.add(f)
    return frozenset(out)


@dataclass(frozen=True)
class Merge:
    flags: Flags
    """The merged representable flags: what both sides must carry."""
    add: Flags
    remove: Flags
    """What the server must get to carry them."""
    base: Flags
    """The new agreed flags: merged, plus the server's keywords."""


def merge_flags(base: Flags, local: Flags, server: Flags) -> Merge:
    """Three-way merge of the representable flags.

    ``local`` is what the file's name carries; ``base`` and ``server`` are
    full IMAP flag sets. Per flag: unchanged locally -> the server's value;
    changed locally only -> the local value; changed on both sides -> both
    flipped it the same way (a flag is a boolean), which is the server's.
    """
    b = representable_part(base)
    l_ = representable_part(local)
    s = representable_part(server)
    local_changed = l_ ^ b
    merged = (s - local_changed) | (l_ & local_changed)
    # Both changed f: f in local_changed and in s ^ b, so l_ and s agree on it;
    # the expression above then gives l_'s value, which equals s's.
    return Merge(merged, merged - s, s - merged, server_only_part(server) | merged)


@dataclass
class _Seen:
    """A round's folders sorted out: what the server expunged, what vanished, what is new."""

    expunged: dict[str, set[int]] = field(default_factory=dict)
    vanished: dict[str, list[int]] = field(default_factory=dict)
    """Rows whose file is gone and which the server keeps (tombstones left out)."""
    gone_files: dict[str, list[int]] = field(default_factory=dict)
    """Rows whose file is gone and which the server expunged too."""
    tombs: dict[str, list[int]] = field(default_factory=dict)
    """Tombstones: absent on purpose; not deletions, but still a rename's or move's source."""
    fresh: dict[str, list[str]] = field(default_factory=dict)
    """Keys of files no row names."""
    unknown: dict[str, list[int]] = field(default_factory=dict)
    """Server UIDs no row names (new on the server, or our own APPEND/MOVE without a UID back)."""
    changed: dict[str, set[int]] = field(default_factory=dict)
    """Rows whose file is there with another content: the row counts as gone (its
    content may have been moved or renamed elsewhere) and the file as new (it
    may be a message moved in under a key a row already had)."""


def _classify(folders: Mapping[str, Folder]) -> _Seen:
    seen = _Seen()
    for name, folder in folders.items():
        gone = seen.expunged[name] = _server_gone(folder)
        files = folder.files
        vanished: list[int] = []
        gone_files: list[int] = []
        tombs: list[int] = []
        seen.vanished[name], seen.gone_files[name], seen.tombs[name] = vanished, gone_files, tombs
        seen.unknown[name] = sorted(uid for uid in folder.server if uid not in folder.rows)
        changed = seen.changed[name] = set()
        if files is None:
            vanished.extend(sorted(uid for uid in folder.rows if uid not in gone))
            seen.fresh[name] = []
            continue
        for uid in sorted(folder.rows):
            row = folder.rows[uid]
            if row.key in files:
                if uid not in folder.changed_content:
                    continue
                changed.add(uid)
            if uid in gone:
                gone_files.append(uid)
            elif _is_tombstone(row.flags, folder.server.get(uid, row.flags)):
                tombs.append(uid)
            else:
                vanished.append(uid)
        keys = {row.key for uid, row in folder.rows.items() if uid not in changed}
        seen.fresh[name] = sorted(key for key in files if key not in keys)
    return seen


def identity_request(
    folders: Mapping[str, Folder],
) -> tuple[set[tuple[str, str]], set[tuple[str, int]], set[tuple[str, int]]]:
    """Which identities :func:`plan_round` needs.

    Returns (folder, key) of new files (a row's file with new content,
    ``changed_content``, counts as one), (folder, uid) of rows whose file is
    gone or has new content, and (folder, uid) of server UIDs no row names.
    All empty unless the round has new files, so the common round (flags
    only) reads no file content at all. The third set matters: a new file
    whose content the server already holds under a UID we do not know is
    adopted, never appended a second time: in its own folder always (another
    client moved it there too; our own APPEND or MOVE that gave no UID back),
    in another folder if a row lost that content this round (another client
    moved the message there while the reader moved the file elsewhere). The
    identity must therefore be one the server can give: Message-ID and
    RFC822.SIZE. A vanished row's file is gone (or holds other content): its
    identity comes from the state (a digest recorded at fetch) or the server
    (Message-ID and RFC822.SIZE); the new file's must be computed the same
    way (size with CRLF line ends, as the server counts).
    """
    seen = _classify(folders)
    new = {(name, key) for name, keys in seen.fresh.items() for key in keys}
    gone = {
        (name, uid) for name in folders for uid in seen.vanished[name] + seen.gone_files[name] + seen.tombs[name]
    }
    unknown = {(name, uid) for name in folders for uid in seen.unknown[name]}
    if not new:
        return set(), set(), set()
    return new, gone, unknown


def _server_gone(folder: Folder) -> set[int]:
    gone = {uid for uid in folder.rows if uid in folder.expunged}
    if folder.complete:
        gone.update(uid for uid in folder.rows if uid not in folder.server)
    return gone


def plan_round(
    folders: Mapping[str, Folder],
    *,
    policy: DeletePolicy = "expunge",
    max_delete: float = 0.5,
    new_identity: Mapping[tuple[str, str], Hashable | None] | None = None,
    gone_identity: Mapping[tuple[str, int], Hashable | None] | None = None,
    server_identity: Mapping[tuple[str, int], Hashable | None] | None = None,
) -> RoundPlan:
    """Decide one round of local changes for every folder of an account.

    ``new_identity`` and ``gone_identity`` give the content identity of the
    new files and vanished rows :func:`identity_request` named (None or
    missing: unknown, never matched). Moves are only recognised between
    folders given together.
    """
    new_identity = new_identity or {}
    gone_identity = gone_identity or {}
    server_identity = server_identity or {}
    seen = _classify(folders)
    expunged, vanished, gone_files, fresh = seen.expunged, seen.vanished, seen.gone_files, seen.fresh

    # 2. Pair new files with vanished rows of the same content: same folder
    # first (a rename), then any other folder (a move). A row the server
    # expunged is paired only within its folder: its renamed file goes too.
    by_identity: dict[Hashable, list[tuple[str, int]]] = {}
    for name in sorted(vanished):
        for uid in sorted(vanished[name] + gone_files[name] + seen.tombs[name]):
            ident = gone_identity.get((name, uid))
            if ident is not None:
                by_identity.setdefault(ident, []).append((name, uid))
    lost = set(by_identity)  # contents some row lost its file of, before pairing uses them up
    # The server already has it here under a UID we do not know: adopt.
    by_server: dict[str, dict[Hashable, list[int]]] = {}
    for name in sorted(folders):
        pool = by_server[name] = {}
        for uid in seen.unknown[name]:
            ident = server_identity.get((name, uid))
            if ident is not None:
                pool.setdefault(ident, []).append(uid)
    adopted: dict[tuple[str, str], int] = {}
    for name in sorted(fresh):
        for key in fresh[name]:
            ident = new_identity.get((name, key))
            if ident is not None and by_server[name].get(ident):
                adopted[(name, key)] = by_server[name][ident].pop(0)
    paired: dict[tuple[str, str], tuple[str, int]] = {}
    for same_folder in (True, False):
        for name in sorted(fresh):
            for key in fresh[name]:
                if (name, key) in paired or (name, key) in adopted:
                    continue
                ident = new_identity.get((name, key))
                candidates = by_identity.get(ident) if ident is not None else None
                if not candidates:
                    continue
                for i, (src, uid) in enumerate(candidates):
                    if src == name if same_folder else (src != name and uid not in expunged[src]):
                        paired[(name, key)] = (src, uid)
                        del candidates[i]
                        break
    matched_rows = {src_uid: dst for dst, src_uid in paired.items()}
    # Moved on the server by another client while the reader moved the file:
    # a row lost its file and its UID (the server expunged it from where we
    # knew it), the reader's file is new in one folder, and the server shows
    # the same content under an unknown UID in another. That UID is moved to
    # where the reader put the file (no upload; the fetch would otherwise
    # bring it back next to the appended copy). Only with that lost row as
    # evidence: a fresh file and an unknown UID alone may be two copies.
    evidence: dict[Hashable, list[tuple[str, int]]] = {}
    for name in sorted(folders):
        for uid in gone_files[name]:
            ident = gone_identity.get((name, uid))
            if ident is not None and uid not in seen.changed[name]:
                evidence.setdefault(ident, []).append((name, uid))
    adopted_away: dict[tuple[str, str], tuple[str, int]] = {}
    lost_row: dict[tuple[str, str], tuple[str, int]] = {}
    for name in sorted(fresh):
        for key in fresh[name]:
            if (name, key) in paired or (name, key) in adopted:
                continue
            ident = new_identity.get((name, key))
            if ident is None or ident not in lost:
                continue
            for src in sorted(folders):
                if src != name and by_server[src].get(ident):
                    adopted_away[(name, key)] = (src, by_server[src][ident].pop(0))
                    if evidence.get(ident):
                        lost_row[(name, key)] = evidence[ident].pop(0)
                    break

    # 3. Guards, per folder, on the deletions proper (vanished, unmatched).
    refused: dict[str, str] = {}
    for name, folder in folders.items():
        if folder.files is None and not folder.allow_delete:
            refused[name] = "its new/ or cur/ directory is missing"
            continue
        if policy == "keep" or folder.allow_delete:
            continue
        deletions = [
            uid for uid in vanished[name] if (name, uid) not in matched_rows and uid not in seen.changed[name]
        ]
        total = len(folder.rows)
        if len(deletions) > DELETE_FLOOR and len(deletions) > max_delete * total:
            refused[name] = (
                f"{len(deletions)} of its {total} messages vanished locally at once "
                f"(more than max_delete = {max_delete:.0%})"
            )

    # Rows that are a cross-folder adoption's evidence stay until it is done.
    deferred = {
        lost for dst, lost in lost_row.items()
        if dst[0] not in refused and adopted_away[dst][0] not in refused and lost[0] not in refused
    }

    # 4. Decide.
    moves: list[Move] = []
    out: dict[str, dict[str, Any]] = {name: _empty() for name in folders}
    for name, folder in folders.items():
        plan = out[name]
        if name in refused:
            continue
        files = folder.files or {}
        gone = expunged[name]
        changed = seen.changed[name]
        replaced: dict[str, Append] = {}  # key -> its Append if unpaired: new content, its row going
        hold: set[str] = set()
        for uid in sorted(folder.rows):
            row = folder.rows[uid]
            lf = files.get(row.key)
            if (
                lf is not None and uid not in folder.server and uid not in changed and uid not in gone
                and lf.flags == _representable(row.flags)
            ):
                # Untouched on both sides (the common case: all but the few the
                # reader changed): nothing to decide. Keeps a round over a big
                # folder from costing a merge per message.
                continue
            renamed = matched_rows.get((name, uid))
            if uid in changed:
                # Messages are immutable: new content in a row's file is a new
                # message (it may be one moved in under that key: see below),
                # and the row's content went, perhaps renamed or moved.
                assert lf is not None
                m = merge_flags(row.flags, lf.flags, folder.server.get(uid, row.flags))
                if renamed is not None and renamed[0] == name and uid not in gone:
                    if renamed[1] != row.key:  # else the identity says the content is the same
                        plan["rekey"].append(Rekey(uid, row.key, renamed[1]))
                    _apply_merge(plan, uid, renamed[1], files[renamed[1]].flags, row.flags,
                                 folder.server.get(uid, row.flags))
                    continue
                if renamed is not None and uid not in gone:
                    if renamed[0] in refused:
                        hold.add(row.key)  # the row stays this round: so must its key's new content
                    continue  # a move: decided with its target
                plan["forget"].append(uid)
                if uid in gone:
                    # The server's expunge is final; the new content goes up rather than being lost.
                    if renamed is not None:
                        plan["remove_files"].append(renamed[1])
                    continue
                replaced[row.key] = Append(row.key, m.base, replaces=uid)
                if policy != "keep":
                    plan["delete"].append(uid)
                continue
            if uid in gone:
                # The server's expunge is final.
                if (name, uid) in deferred:
                    continue  # its file is gone; its row is dropped with the move it is evidence for
                plan["remove_local"].append(uid)
                if renamed is not None:
                    plan["remove_files"].append(renamed[1])  # renamed by a reader, then expunged
                if lf is not None and lf.flags != representable_part(row.flags):
                    plan["conflicts"].append(
                        Conflict(uid, "flags changed locally, expunged on the server: removed")
                    )
                continue
            server = folder.server.get(uid, row.flags)
            if lf is None:
                if (name, uid) in matched_rows:
                    dst, key = matched_rows[(name, uid)]
                    if dst == name:
                        plan["rekey"].append(Rekey(uid, row.key, key))
                        _apply_merge(plan, uid, key, files[key].flags, row.flags, server)
                    continue  # a move: decided with its target below
                if policy != "keep" and _is_tombstone(row.flags, server):
                    (plan["delete"] if policy == "expunge" else plan["tombstones"]).append(uid)
                elif policy == "keep":
                    plan["refetch"].append(uid)
                elif comparable(server) != comparable(row.flags):
                    plan["refetch"].append(uid)
                    plan["conflicts"].append(
                        Conflict(uid, "deleted locally, changed on the server: kept, fetched again")
                    )
                else:
                    plan["delete"].append(uid)
                    if policy == "flag":
                        plan["base"][uid] = frozenset(row.flags) | {DELETED}
                continue
            _apply_merge(plan, uid, row.key, lf.flags, row.flags, server)

        for key in fresh[name]:
            lf = files[key]
            if key in hold:
                plan["held"].append(key)
                continue
            if (name, key) in adopted:
                uid = adopted[(name, key)]
                server = folder.server[uid]
                plan["adopt"].append(Adopt(uid, key, representable_part(server), server_only_part(server) | representable_part(server)))
                continue
            if (name, key) in adopted_away:
                src_name, src_uid = adopted_away[(name, key)]
                if src_name in refused:
                    plan["held"].append(key)
                    continue
                server = folders[src_name].server[src_uid]
                flags = representable_part(server)
                lost = lost_row.get((name, key))
                moves.append(Move(src_name, src_uid, name, key, flags, frozenset(), frozenset(),
                                  server_only_part(server) | flags, lost if lost in deferred else None))
                continue
            src = paired.get((name, key))
            if src is None:
                plan["append"].append(replaced.get(key) or Append(key, lf.flags))
                continue
            src_name, src_uid = src
            if src_name == name:
                continue  # a rename, decided with its row
            if src_name in refused:
                plan["held"].append(key)
                continue
            src_folder = folders[src_name]
            row = src_folder.rows[src_uid]
            m = merge_flags(row.flags, lf.flags, src_folder.server.get(src_uid, row.flags))
            moves.append(Move(src_name, src_uid, name, key, m.flags, m.add, m.remove, m.base))

    result: dict[str, FolderPlan] = {}
    for name in folders:
        if name in refused:
            result[name] = FolderPlan(refused=refused[name])
            continue
        p = out[name]
        result[name] = FolderPlan(
            store=tuple(p["store"]),
            delete=tuple(sorted(p["delete"])),
            expunge=policy == "expunge" and bool(p["delete"]),
            append=tuple(p["append"]),
            local_flags=tuple(p["local_flags"]),
            rekey=tuple(p["rekey"]),
            remove_local=tuple(p["remove_local"]),
            remove_files=tuple(p["remove_files"]),
            forget=tuple(p["forget"]),
            refetch=tuple(p["refetch"]),
            tombstones=tuple(p["tombstones"]),
            held=tuple(p["held"]),
            adopt=tuple(p["adopt"]),
            base=p["base"],
            conflicts=tuple(p["conflicts"]),
        )
    return RoundPlan(result, tuple(moves))


def _empty() -> dict[str, Any]:
    lists = (
        "store", "delete", "append", "local_flags", "rekey", "remove_local", "remove_files",
        "forget", "refetch", "tombstones", "held", "conflicts", "adopt",
    )
    return {k: [] for k in lists} | {"base": {}}


def _is_tombstone(base: Flags, server: Flags) -> bool:
    """Deleted locally before under policy ``flag``: base and server both have ``\\Deleted``."""
    return "\\deleted" in comparable(base) and "\\deleted" in comparable(server)


def _apply_merge(plan: dict[str, Any], uid: int, key: str, local: Flags, base: Flags, server: Flags) -> None:
    m = merge_flags(base, local, server)
    if m.add or m.remove:
        plan["store"].append(StoreFlags(uid, m.add, m.remove))
    if m.flags != local:
        plan["local_flags"].append(LocalFlags(uid, key, m.flags))
    if comparable(m.base) != comparable(base):
        plan["base"][uid] = m.base


@dataclass(frozen=True)
class MoveOutcome:
    new_uid: int | None
    """The message's UID in the target (from COPYUID); None: see ``source_gone`` and ``unknown``."""
    append: Append | None
    """Always None now (kept for the API): a move whose source is gone is never
    turned into an APPEND, see ``source_gone``."""
    unknown: bool = False
    """The server gave no COPYUID (no UIDPLUS): the move happened but its new UID is
    not known; the caller finds it (e.g. by Message-ID in the target) before the
    next fetch of the target, or the file would be downloaded next to itself."""
    source_gone: bool = False
    """The server moved nothing: the source UID was gone (another client expunged
    it, or moved it to some folder) when the MOVE ran. The caller does nothing
    for this move: the source row (if any) stays, the target file stays
    untracked. It then plans and applies another round (fresh server state)
    *before* fetching: that round finds the source row expunged and the file
    new, and adopts the file as the UID the other client moved the message
    to (in the target: :class:`Adopt`; elsewhere: a :class:`Move` of that
    UID), or APPENDs it if it was expunged. An APPEND here, or a fetch first,
    would leave the message twice on the server, or twice in the Maildir."""


def settle_move(move: Move, copyuid: Mapping[int, int] | None) -> MoveOutcome:
    """What a move turned into, given the COPYUID mapping the server returned (None: none offered).

    A mapping without the source UID means the server had no such message
    any more when the MOVE ran: ``source_gone``, see there. The message ends
    in exactly one place, never none and never two.
    """
    if copyuid is None:
        return MoveOutcome(None, None, unknown=True)
    new_uid = copyuid.get(move.uid)
    if new_uid is None:
        return MoveOutcome(None, None, source_gone=True)
    return MoveOutcome(new_uid, None)
