"""Folders deleted or renamed on the server (issue #11 item 6): set aside once, never deleted, guarded."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mirrord.status import STATE_DB_NAME
from mirrord.testing import ImapAccount, make_message
from tests.integration._mirrord import (
    DaemonProcess,
    assert_mirrors,
    converged,
    local_messages,
    mirrord,
    wait_until,
    write_config,
)


def set_aside(tmp_path: Path, name: str) -> list[Path]:
    root = tmp_path / "state" / "set-aside" / "test" / name
    return sorted(root.glob("folder-*")) if root.is_dir() else []


def state_rows(tmp_path: Path, name: str) -> int:
    with sqlite3.connect(tmp_path / "state" / STATE_DB_NAME) as db:
        return db.execute("SELECT count(*) FROM mailbox WHERE mailbox = ?", (name,)).fetchone()[0]


def test_a_folder_renamed_on_the_server_is_set_aside_once(imap_account: ImapAccount, tmp_path: Path) -> None:
    client = imap_account.client
    client.create("Old")
    for i in range(3):
        client.append("Old", make_message(i), ())
    client.append("INBOX", make_message(9), ())
    config = write_config(tmp_path, imap_account)
    assert mirrord("-c", str(config), "run", "--once").status == 0
    client.rename("Old", "New")

    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 0, run.stderr
    assert not (tmp_path / "Mail" / "Old").exists(), "the folder left the mirror"
    [kept] = set_aside(tmp_path, "Old")
    assert local_messages(kept) == [], "moved into New, not downloaded again"
    assert "3 messages moved in" in run.stderr and "fetched" not in run.stderr.split("test/New")[-1].split("\n")[0]
    assert run.stderr.count("test/Old: gone from the server") == 1
    assert state_rows(tmp_path, "Old") == 0
    assert_mirrors(imap_account, tmp_path / "Mail", "New")
    assert_mirrors(imap_account, tmp_path / "Mail", "INBOX")

    again = mirrord("-c", str(config), "run", "--once")
    assert again.status == 0 and "gone from the server" not in again.stderr
    assert len(set_aside(tmp_path, "Old")) == 1


def test_a_list_lacking_most_folders_sets_nothing_aside(imap_account: ImapAccount, tmp_path: Path) -> None:
    client = imap_account.client
    for name in ("A", "B", "C"):
        client.create(name)
        client.append(name, make_message(ord(name)), ())
    config = write_config(tmp_path, imap_account)
    assert mirrord("-c", str(config), "run", "--once").status == 0
    for name in ("A", "B", "C"):
        client.delete(name)
    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 1
    assert "lacks 3 of the 4" in run.stderr and "nothing set aside" in run.stderr
    for name in ("A", "B", "C"):
        assert len(local_messages(tmp_path / "Mail" / name)) == 1
        assert set_aside(tmp_path, name) == []


def test_the_daemon_stops_watching_a_deleted_folder(imap_account: ImapAccount, tmp_path: Path) -> None:
    client = imap_account.client
    client.create("Old")
    client.append("Old", make_message(1), ())
    config = write_config(tmp_path, imap_account, extra="    idle_renew: 10s\n    poll_interval: 10s\n")
    with DaemonProcess(config) as daemon:
        assert len(local_messages(tmp_path / "Mail" / "Old")) == 1
        client.rename("Old", "New")
        daemon.wait_for_log("test/Old: gone from the server; watcher stopped", timeout=40)
        wait_until(lambda: not (tmp_path / "Mail" / "Old").exists(), what="Old to leave the mirror")
        converged(imap_account, tmp_path / "Mail", "New", timeout=30)
        client.append("INBOX", make_message(2), ())
        converged(imap_account, tmp_path / "Mail", "INBOX")
        assert len(set_aside(tmp_path, "Old")) == 1
        assert "1 message moved in" in daemon.log, "matched, not downloaded again"
        assert daemon.log.count("test/Old: gone from the server") == 1


def test_a_folder_deleted_on_the_server_keeps_its_copies_set_aside(imap_account: ImapAccount, tmp_path: Path) -> None:
    client = imap_account.client
    for name in ("Gone", "Keep"):
        client.create(name)
        client.append(name, make_message(len(name)), ())
        client.append(name, make_message(len(name) + 10), ())
    config = write_config(tmp_path, imap_account)
    assert mirrord("-c", str(config), "run", "--once").status == 0
    client.delete("Gone")
    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 0, run.stderr
    [kept] = set_aside(tmp_path, "Gone")
    assert len(local_messages(kept)) == 2, "never deleted"
    assert not (tmp_path / "Mail" / "Gone").exists()
    assert_mirrors(imap_account, tmp_path / "Mail", "Keep")
