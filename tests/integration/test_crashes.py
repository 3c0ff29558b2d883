"""SIGKILL at random points: after a restart nothing is missing, duplicated, partial or stray.

Invariant 1 of DESIGN.md: a file appears in new/ or cur/ only complete, and
a crash at any point leaves no partial file visible and no state row without
its file; invariant 4: the mirror converges. A kill can land between any two
steps of a delivery (tmp write, fsync, state, rename, directory fsync), so
the test kills often, at random moments, during a first sync and during
live mirroring, and checks the Maildir after every kill.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from mirrord.testing import ImapAccount, make_message
from tests.integration._mirrord import assert_mirrors, expected_messages, local_messages, mirrord, write_config

KILLS_DURING_FIRST_SYNC = 12
KILLS_DURING_LIVE_MIRRORING = 10


def check_after_kill(account: ImapAccount, maildir: Path, state_db: Path) -> int:
    """What a crash may leave: complete files only, each once, each recorded or pending."""
    server = {sha for sha, _ in expected_messages(account, "INBOX")}
    local = local_messages(maildir)
    hashes = [m.sha256 for m in local]
    assert all(h in server for h in hashes), "a partial or foreign file is visible"
    assert len(hashes) == len(set(hashes)), "a message is there twice"
    if state_db.exists():
        with sqlite3.connect(state_db) as db:
            keys = {k for (k,) in db.execute("SELECT key FROM message")}
            keys |= {k for (k,) in db.execute("SELECT key FROM pending")}
        names = {m.path.name.split(":")[0] for m in local}
        assert names <= keys, "a visible file that no row (not even a pending one) names"
        with sqlite3.connect(state_db) as db:
            recorded = {k for (k,) in db.execute("SELECT key FROM message")}
        assert recorded <= names, "a state row without its file"
    return len(local)


def start(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mirrord", "-c", str(config), "run"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(10)


def test_sigkill_at_random_points_loses_and_duplicates_nothing(imap_account: ImapAccount, tmp_path: Path) -> None:
    rng = random.Random(20261126)
    imap_account.fill("INBOX", [make_message(i, size=rng.choice([800, 5000, 40_000])) for i in range(1500)])
    config = write_config(tmp_path, imap_account)
    inbox = tmp_path / "Mail" / "INBOX"
    state_db = tmp_path / "state" / "state.sqlite3"

    counts = []
    for _ in range(KILLS_DURING_FIRST_SYNC):
        process = start(config)
        time.sleep(rng.uniform(0.4, 2.0))
        kill(process)
        if inbox.exists():
            counts.append(check_after_kill(imap_account, inbox, state_db))
    assert counts and counts[-1] > 0, "the first sync made progress across kills"

    # Live mirroring: mail keeps arriving while the daemon is killed again and again.
    stop = threading.Event()

    def append_steadily() -> None:
        with imap_account.dovecot.client(imap_account.user) as client:
            i = 10_000
            while not stop.is_set():
                client.append("INBOX", make_message(i, size=1200), ())
                i += 1
                time.sleep(0.02)

    appender = threading.Thread(target=append_steadily)
    appender.start()
    try:
        for _ in range(KILLS_DURING_LIVE_MIRRORING):
            process = start(config)
            time.sleep(rng.uniform(0.5, 2.0))
            kill(process)
            check_after_kill(imap_account, inbox, state_db)
    finally:
        stop.set()
        appender.join()

    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 0, run.stderr
    assert_mirrors(imap_account, tmp_path / "Mail", "INBOX")
    assert os.listdir(inbox / "tmp") == [], "tmp/ is cleaned of leftovers"
    check_after_kill(imap_account, inbox, state_db)
    with sqlite3.connect(state_db) as db:
        assert db.execute("SELECT COUNT(*) FROM pending").fetchone()[0] == 0
