"""A renumbered mailbox (new UIDVALIDITY): give local copies their new UIDs.

The I/O around :func:`mirrord.sync.rematch.rematch`: ask the server for each
message's Message-ID and size, read the same from the local copies, switch
the state over in one transaction, set aside what nothing matched.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mirrord.headers import message_id
from mirrord.pool import Worker, WorkerPool
from mirrord.store.maildir import Maildir, Trash
from mirrord.store.state import MessageRecord, StateDB
from mirrord.sync.engine import UidValidityChanged
from mirrord.sync.rematch import Identity, rematch

log = logging.getLogger("mirrord.sync")


async def renumber(
    change: UidValidityChanged,
    known: dict[int, MessageRecord],
    *,
    pool: WorkerPool,
    raw_name: bytes,
    maildir: Maildir,
    state: StateDB,
    account: str,
    mailbox: str,
    set_aside: Trash | None,
    label: str,
) -> None:
    """The server renumbered the mailbox: give local copies their new UIDs.

    Copies are matched by Message-ID and size and keep their files (no
    download). Copies nothing matches are moved to the set-aside folder
    (never deleted); server messages nothing matched are fetched by the
    sync that follows. The state is switched over in one transaction.
    """

    async def identities(worker: Worker) -> dict[int, tuple[int | None, bytes]]:
        status = await worker.examine(raw_name)
        if status.uidvalidity != change.new:
            raise UidValidityChanged(change.new, status.uidvalidity)
        client = await worker.connection()
        return await client.uid_fetch_identities() if status.exists else {}

    found = await pool.run(identities, f"re-matching {label}")
    server = {uid: Identity(message_id(header), size) for uid, (size, header) in found.items()}
    files = maildir.scan()
    mine: dict[int, Identity] = {}
    for uid, row in known.items():
        lf = files.get(row.key)
        if lf is not None:
            mine[uid] = Identity(_local_message_id(maildir.path / lf.subdir / lf.filename), row.size)
    result = rematch(mine, server)
    if result.unmatched_local:
        keys = [known[uid].key for uid in result.unmatched_local]
        maildir.remove_many(keys, {k: files[k] for k in keys if k in files}, set_aside)
    with state.transaction():
        state.delete_mailbox(account, mailbox)
        state.set_mailbox(account, mailbox, change.new)
        state.add_messages(
            account,
            mailbox,
            [
                MessageRecord(new, known[old].key, known[old].flags, known[old].size, known[old].message_id)
                for old, new in result.matched.items()
            ],
        )
    log.warning(
        "%s: %s: %d local copies re-matched to their new UIDs, %d set aside in %s, %d to fetch",
        label,
        change,
        len(result.matched),
        len(result.unmatched_local),
        set_aside.root if set_aside else "-",
        len(result.unmatched_server),
    )


def _local_message_id(path: Path) -> str | None:
    with path.open("rb") as f:
        head = f.read(65536)
    end = head.find(b"\n\n")
    return message_id(head if end < 0 else head[: end + 1])
