"""Folders gone from the server: noticed in a complete LIST, set aside, never deleted.

A folder deleted or renamed on the server would otherwise stay in the mirror
for ever (and its watcher reconnect for ever). When a complete LIST of the
same account no longer has a folder we mirrored, its Maildir (``cur``,
``new``, ``tmp``: not the folders nested under it, which are mailboxes of
their own) moves to ``<state_dir>/set-aside/<account>/<flat folder name>/folder-<time>/``
and its state rows go, so nothing later mistakes it for the folder it was.

A LIST that suddenly lacks most folders is a broken server's more than a
user's doing: it is held to the same rule as messages
(:func:`mirrord.sync.engine.removal_refusal`, with a floor of one folder),
and then nothing is set aside.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from mirrord._dirs import make_private_dirs
from mirrord.config import Account
from mirrord.flags import Flags, flags_from_info
from mirrord.headers import message_id
from mirrord.pool import Worker
from mirrord.store.maildir import trash_dir
from mirrord.store.state import MessageRecord, StateDB
from mirrord.sync.engine import removal_refusal
from mirrord.sync.mailbox import MailboxSync
from mirrord.sync.names import maildir_path
from mirrord.sync.rematch import Identity, rematch
from mirrord.units import plural

log = logging.getLogger("mirrord.sync")

MANIFEST = "mirrord-set-aside.json"
"""In a set-aside folder: the server sizes of its messages, for matching a rename."""

FOLDER_FLOOR = 1
"""One folder gone from a LIST is always followed: deleting a folder is everyday use."""


class MassFolderRemoval(Exception):
    """A LIST lacks more of the account's folders than is plausible."""


def gone_folders(account: Account, listed: Iterable[str], recorded: Iterable[str]) -> list[str]:
    """Folders we mirror (state rows, still wanted by the config) that the complete LIST no longer has.

    ``listed``: the local names of every selectable mailbox in the LIST.
    INBOX is never gone (RFC 3501: it always exists); a folder the config
    no longer wants is not the server's doing and stays where it is.
    """
    present = set(listed)
    return sorted(
        name for name in recorded if name != "INBOX" and account.wants(name) and name not in present
    )


def check_folders(account: Account, gone: list[str], recorded: int) -> None:
    """Raise MassFolderRemoval if ``gone`` is more of the ``recorded`` folders than max_delete lets pass."""
    why = removal_refusal(len(gone), recorded, account.max_delete, floor=FOLDER_FLOOR, whole="every folder")
    if why is not None:
        raise MassFolderRemoval(
            f"{account.name}: the server's list of folders lacks {len(gone)} of the {recorded} mirrored ({why}): "
            f"{', '.join(gone)}; nothing set aside. If they were really deleted, move their folders out of "
            f"{account.maildir} yourself; mirrord then forgets them"
        )


def set_aside_folder(account: Account, state: StateDB, name: str) -> Path:
    """Move folder ``name``'s Maildir to the set-aside area and forget its rows; returns where it went.

    Idempotent: a crash half-way leaves the rows, and the next LIST does the rest.
    """
    source = maildir_path(account.maildir, name)
    # The mailbox's own flat set-aside directory (store.maildir.trash_dir): a
    # child folder's never sits inside its parent's; private like all we make.
    target = trash_dir(state.path.parent, "set-aside", account.name, name) / f"folder-{time.strftime('%Y%m%d-%H%M%S')}"
    make_private_dirs(target)
    # The sizes the server gave (RFC822.SIZE) go along: a rename is matched by them.
    sizes = {r.key: r.size for r in state.messages(account.name, name).values()}
    (target / MANIFEST).write_text(json.dumps({"folder": name, "sizes": sizes}))
    for sub in ("cur", "new", "tmp"):
        if not (source / sub).is_dir():
            continue
        try:
            os.rename(source / sub, target / sub)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.move(str(source / sub), str(target / sub))  # the state dir is on another file system
    # The folder itself goes if nothing else lives in it (nested mailboxes do).
    for directory in (source, *source.parents):
        if directory == account.maildir or account.maildir not in directory.parents:
            break
        try:
            directory.rmdir()
        except OSError:
            break
    state.delete_mailbox(account.name, name)
    return target


def set_aside_gone(account: Account, state: StateDB, listed: Iterable[str], skip: Iterable[str] = ()) -> list[Path]:
    """Set aside every folder gone from a complete LIST (see the module docstring); returns where they went.

    Raises MassFolderRemoval instead when the LIST lacks too many.
    """
    recorded = [r.mailbox for r in state.mailboxes(account.name)]
    gone = [name for name in gone_folders(account, listed, recorded) if name not in set(skip)]
    if not gone:
        return []
    check_folders(account, gone, len([n for n in recorded if account.wants(n)]))
    places = []
    for name in gone:
        where = set_aside_folder(account, state, name)
        log.warning("%s/%s: gone from the server; local copy set aside in %s", account.name, name, where)
        places.append(where)
    return places


async def adopt_renamed(sync: MailboxSync, sources: list[Path]) -> int:
    """Before a new folder's first sync, move in the set-aside copies its messages match.

    A rename on the server looks like a folder gone and a new one: its
    messages are matched by Message-ID and size (as after a UIDVALIDITY
    change, :mod:`mirrord.sync.rematch`) against what was just set aside,
    and moved in instead of downloaded. Recorded pending first, promoted
    after the move and the directory fsyncs (invariant 1): a crash
    between leaves a row :meth:`MailboxSync.recover` adopts.
    Returns how many were moved in.
    """
    candidates: dict[int, tuple[Path, str, Flags]] = {}
    mine: dict[int, Identity] = {}
    for source in sources:
        try:
            sizes = json.loads((source / MANIFEST).read_text()).get("sizes", {})
        except (OSError, ValueError):
            continue
        for sub in ("cur", "new"):
            directory = source / sub
            if not directory.is_dir():
                continue
            for path in directory.iterdir():
                key, _, info = path.name.partition(":2,")
                if sizes.get(key) is None:
                    continue
                with path.open("rb") as f:
                    head = f.read(65536)
                end = head.find(b"\n\n")
                n = len(candidates) + 1
                candidates[n] = (path, key, flags_from_info(info))
                mine[n] = Identity(message_id(head if end < 0 else head[: end + 1]), sizes[key])
    if not mine:
        return 0

    async def identities(worker: Worker) -> tuple[int, dict[int, tuple[int | None, bytes]]]:
        status = await worker.examine(sync.entry.raw_name)
        client = await worker.connection()
        return status.uidvalidity, (await client.uid_fetch_identities() if status.exists else {})

    uidvalidity, found = await sync.pool.run(identities, f"matching {sync.label} with set-aside copies")
    server = {uid: Identity(message_id(header), size) for uid, (size, header) in found.items()}
    matched = rematch(mine, server).matched
    if not matched:
        return 0
    records = [
        MessageRecord(uid, candidates[n][1], candidates[n][2], mine[n].size, mine[n].message_id)
        for n, uid in matched.items()
    ]
    sync.state.set_mailbox(sync.account, sync.name, uidvalidity)
    sync.state.add_pending(sync.account, sync.name, records)
    for n in matched:
        path = candidates[n][0]
        os.rename(path, sync.maildir.path / path.parent.name / path.name)
    sync.maildir.sync_dirs(("new", "cur"))
    sync.state.promote_pending(sync.account, sync.name, [r.uid for r in records])
    log.info("%s: %s moved in from the set-aside copy of a folder gone from the server "
             "(renamed), not downloaded again", sync.label, plural(len(records), "message"))
    return len(records)
