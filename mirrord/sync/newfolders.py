"""Folders a reader made in the Maildir: created on the server, so their mail goes up.

neomutt's "save to =Projects/new" makes ``Projects/new/{cur,new,tmp}`` and
puts the message there; two-way sync must create the mailbox on the server
before the round can APPEND into it.

What is never created, because it would be the wrong way round:

- a folder the state knows (it was mirrored): if the server no longer lists
  it, the server deleted it, and it is set aside (:mod:`mirrord.sync.folders`),
  never brought back;
- anything during an account's first sync (no mailbox on record yet): a
  Maildir that predates mirrord (another tool's, with its own folder names)
  would otherwise be uploaded wholesale next to the server's own folders;
- a name whose local spelling does not map back to one server name
  (escaped control characters, a shortened component, the delimiter inside
  a part), or that the account's patterns do not select.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mirrord.config import Account
from mirrord.pool import Worker, WorkerPool
from mirrord.protocol.client import ListEntry
from mirrord.protocol.mutf7 import encode_mailbox_name
from mirrord.store.state import StateDB
from mirrord.sync.names import MAILDIR_SUBDIRS, UnmappableName, local_name

log = logging.getLogger("mirrord.sync")

MAX_DEPTH = 16
"""How deep under the mirror root folders are looked for."""


def server_name(local: str, delimiter: str | None, prefix: str = "") -> str | None:
    """The server name a local folder name stands for, or None if it does not map back exactly."""
    if local.upper() == "INBOX":
        return "INBOX"
    parts = local.split("/")
    if len(parts) > 1 and not delimiter:
        return None
    if delimiter and any(delimiter in part for part in parts):
        return None
    name = prefix + (delimiter or "").join(parts)
    try:
        if local_name(name, delimiter, prefix) != local:
            return None  # escaped or shortened on the way in: not a name we can give back
    except UnmappableName:
        return None
    return name


def local_folders(root: Path) -> list[str]:
    """Local names of the Maildir folders (``cur/`` and ``new/`` present) under ``root``."""
    found: list[str] = []

    def walk(path: Path, parts: list[str]) -> None:
        if len(parts) > MAX_DEPTH:
            return
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            return
        names = {e.name for e in entries if e.is_dir(follow_symlinks=False)}
        if parts and {"cur", "new"} <= names:
            found.append("/".join(parts))
        for entry in entries:
            if entry.name in MAILDIR_SUBDIRS or entry.name.startswith(".") or entry.name not in names:
                continue
            walk(Path(entry.path), [*parts, entry.name])

    walk(root, [])
    return found


def folders_to_create(account: Account, state: StateDB, listed: set[str]) -> list[str]:
    """Local folders the server should get; see the module docstring for what never qualifies."""
    recorded = {r.mailbox for r in state.mailboxes(account.name)}
    if not recorded:
        return []
    return [
        name for name in local_folders(account.maildir)
        if name not in listed and name not in recorded and account.wants(name)
    ]


async def create_on_server(
    pool: WorkerPool, account: Account, state: StateDB, names: list[str], delimiter: str | None, prefix: str
) -> list[ListEntry]:
    """CREATE each folder and record it (empty), so the next round uploads its files."""
    made: list[ListEntry] = []
    for name in names:
        wire = server_name(name, delimiter, prefix)
        if wire is None:
            log.warning("%s/%s: a local folder whose name does not map to a server name; not created "
                        "on the server (create it there, or rename it)", account.name, name)
            continue
        raw = encode_mailbox_name(wire)

        async def job(worker: Worker, raw: bytes = raw) -> int:
            client = await worker.connection()
            await client.create(raw)
            worker.selected = None
            status = await client.examine(raw)
            return status.uidvalidity

        uidvalidity = await pool.run(job, f"creating {account.name}/{name}")
        state.set_mailbox(account.name, name, uidvalidity)
        log.info("%s/%s: created on the server (a folder made locally); its messages follow", account.name, name)
        made.append(ListEntry(raw, wire, delimiter, frozenset()))
    return made
