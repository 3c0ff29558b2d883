"""A full disk: reported, state kept consistent, and the mirror resumes when space returns.

The Maildir lives on a small tmpfs the test mounts (the tests run as root,
as CI does); it is grown afterwards, as a user would free space.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord.testing import ImapAccount, make_message
from tests.integration._mirrord import (
    assert_mirrors,
    expected_messages,
    local_messages,
    mirrord,
    tmpfs,
    write_config,
)


@pytest.fixture
def small_disk() -> Iterator[Path]:
    with tmpfs("size=1m,mode=0700", "the disk-full test") as where:
        yield where


def test_disk_full_is_reported_keeps_state_consistent_and_resumes(
    imap_account: ImapAccount, tmp_path: Path, small_disk: Path
) -> None:
    imap_account.fill("INBOX", [make_message(i, size=60_000) for i in range(40)])  # ~2.4 MB > 1 MB
    config = write_config(tmp_path, imap_account)
    config.write_text(config.read_text().replace(f"maildir: {tmp_path / 'Mail'}", f"maildir: {small_disk}"))
    inbox = small_disk / "INBOX"

    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 1
    assert "No space left on device" in run.stderr and "cannot write the mirror" in run.stderr
    assert "Traceback" not in run.stderr
    landed = local_messages(inbox)
    assert 0 < len(landed) < 40
    server = {sha for sha, _ in expected_messages(imap_account, "INBOX")}
    assert all(m.sha256 in server for m in landed), "only complete files are visible"
    with sqlite3.connect(tmp_path / "state" / "state.sqlite3") as db:
        recorded = db.execute("SELECT COUNT(*) FROM message").fetchone()[0]
    assert recorded == len(landed), "nothing unfetched is marked as fetched"

    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 0, run.stderr
    assert f"{40 - len(landed)} fetched" in run.stderr
    assert_mirrors(imap_account, small_disk, "INBOX")
    assert os.listdir(inbox / "tmp") == []
