"""Random server histories against the real Dovecot: after each, the mirror equals the server.

The end-to-end counterpart of the engine's model-based property test: a few
hundred random appends, expunges, flag changes, mailbox recreations
(UIDVALIDITY resets) and local deletions, with syncs in between, first with
run --once and then with the daemon watching.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from mirrord.testing import ImapAccount, ImapCommandError, make_message
from tests.integration._mirrord import (
    DaemonProcess,
    assert_mirrors,
    converged,
    local_messages,
    mirrord,
    write_config,
)

MAILBOXES = ("INBOX", "Work")
FLAGS = ("\\Seen", "\\Flagged", "\\Answered", "\\Draft", "$Label1")


class History:
    def __init__(self, account: ImapAccount, seed: int) -> None:
        self.account = account
        self.client = account.client
        self.rng = random.Random(seed)
        self.serial = 0
        self.bodies: dict[str, dict[int, bytes]] = {m: {} for m in MAILBOXES}

    def step(self, root: Path, allow_recreate: bool = True, allow_local: bool = True) -> str:
        rng, client = self.rng, self.client
        mailbox = rng.choice(MAILBOXES)
        uids = list(self.bodies[mailbox])
        roll = rng.random()
        if roll < 0.45 or not uids:
            self.serial += 1
            body = make_message(self.serial, size=rng.choice([400, 3000, 20_000]), rng=rng)
            uid = self._append_retrying(mailbox, body, rng.sample(FLAGS, rng.randint(0, 2)))
            self.bodies[mailbox][uid] = body
            return "append"
        if roll < 0.65:
            gone = rng.sample(uids, rng.randint(1, min(3, len(uids))))
            client.expunge(mailbox, gone)
            for uid in gone:
                del self.bodies[mailbox][uid]
            return "expunge"
        if roll < 0.9:
            uid = rng.choice(uids)
            flags = rng.sample(FLAGS, rng.randint(1, 2))
            (client.add_flags if rng.random() < 0.6 else client.remove_flags)(mailbox, uid, flags)
            return "flags"
        if roll < 0.95 and mailbox == "Work" and allow_recreate:
            # The server renumbers the mailbox, keeping most messages.
            keep = [b for b in self.bodies["Work"].values() if rng.random() < 0.8]
            client.delete("Work")
            client.create("Work")
            client.close()  # a fresh session: the old one saw its mailbox deleted under it
            self.bodies["Work"] = {self._append_retrying("Work", b): b for b in keep}
            return "recreate"
        local = local_messages(root / mailbox) if (root / mailbox).exists() and allow_local else []
        if local:
            rng.choice(local).path.unlink()  # the user deletes a local file
            return "local delete"
        return "nothing"


    def _append_retrying(self, mailbox: str, body: bytes, flags: list[str] | tuple[str, ...] = ()) -> int:
        # Right after a recreation Dovecot may answer "Mailbox was deleted
        # under us" while other sessions (mirrord's) still had the old one open.
        for attempt in range(5):
            try:
                return self.client.append(mailbox, body, flags)
            except ImapCommandError:
                if attempt == 4:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")


def test_random_history_with_syncs_in_between(imap_account: ImapAccount, tmp_path: Path) -> None:
    imap_account.client.create("Work")
    config = write_config(tmp_path, imap_account)
    history = History(imap_account, seed=7)
    root = tmp_path / "Mail"
    done: dict[str, int] = {}
    for round_ in range(10):
        for _ in range(25):
            kind = history.step(root)
            done[kind] = done.get(kind, 0) + 1
        run = mirrord("-c", str(config), "run", "--once",
                      "--allow-delete", "test/INBOX", "--allow-delete", "test/Work")
        assert run.status == 0, run.stderr
        for mailbox in MAILBOXES:
            assert_mirrors(imap_account, root, mailbox)
    assert sum(done.values()) == 250
    assert done.get("recreate", 0) >= 1 and done.get("expunge", 0) >= 10, done


def test_random_history_while_the_daemon_watches(imap_account: ImapAccount, tmp_path: Path) -> None:
    imap_account.client.create("Work")
    history = History(imap_account, seed=11)
    root = tmp_path / "Mail"
    for _ in range(30):
        history.step(root, allow_recreate=False, allow_local=False)
    with DaemonProcess(write_config(tmp_path, imap_account)):
        for _ in range(150):
            # No local deletions here: the daemon learns of those at its next full
            # sync only; recreations have their own test (test_daemon.py), as
            # Dovecot refuses APPENDs for a moment after one while sessions
            # still had the old mailbox open.
            history.step(root, allow_recreate=False, allow_local=False)
            time.sleep(history.rng.choice([0, 0, 0.01, 0.2]))
        for mailbox in MAILBOXES:
            converged(imap_account, root, mailbox, 30)
