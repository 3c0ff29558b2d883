"""``mirrord run --once`` against a real Dovecot: the mirror must equal the server.

Every check compares with what the server itself returns for BODY[] and
FLAGS, fetched by a second, independent client (stdlib imaplib).
"""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest

from mirrord.testing import ImapAccount, make_message
from tests.integration._mirrord import (
    assert_mirrors,
    local_messages,
    mirrord,
    tree_snapshot,
    write_config,
)

MAILBOXES = ("INBOX", "Archive/2024", "Entwürfe")


def fill_mixed(account: ImapAccount) -> None:
    """Three mailboxes, one nested, one non-ASCII; sizes from bytes to over 10 MB."""
    rng = random.Random(7)
    client = account.client
    client.create("Archive/2024")
    client.create("Entwürfe")
    flag_choices = [(), ("\\Seen",), ("\\Seen", "\\Answered"), ("\\Flagged",), ("\\Draft", "\\Seen"), ("$Junk",)]
    for i in range(12):
        client.append("INBOX", make_message(i, size=rng.randint(200, 40_000), rng=rng), rng.choice(flag_choices))
    for i in range(12, 18):
        client.append("Archive/2024", make_message(i, rng=rng, attachment_bytes=rng.randint(0, 300_000)), ("\\Seen",))
    # Over 10 MB: Twisted would spill it to a temp file and read it back into memory.
    client.append("Archive/2024", make_message(99, rng=rng, attachment_bytes=11 * 1024 * 1024), ())
    # Bytes that a careless CRLF conversion gets wrong: bare CR, bare LF, CR at a chunk edge.
    client.append("Entwürfe", b"Subject: odd\r\n\r\nbare\rcr and bare\nlf\r\r\n" + b"x\r" * 40_000 + b"\r\n", ("\\Draft",))
    client.append("Entwürfe", b"Subject: empty body\r\n\r\n", ())


def test_mirrors_every_mailbox_byte_for_byte(imap_account: ImapAccount, tmp_path: Path) -> None:
    fill_mixed(imap_account)
    config = write_config(tmp_path, imap_account)
    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 0, run.stderr
    for mailbox in MAILBOXES:
        assert_mirrors(imap_account, tmp_path / "Mail", mailbox)
    assert len(local_messages(tmp_path / "Mail" / "INBOX")) == 12
    assert "Archive/2024" in run.stderr and "Entwürfe" in run.stderr


def test_mirroring_never_sets_seen_on_the_server(imap_account: ImapAccount, tmp_path: Path) -> None:
    fill_mixed(imap_account)
    before = {m: imap_account.client.flags(m) for m in MAILBOXES}
    run = mirrord("-c", str(write_config(tmp_path, imap_account)), "run", "--once")
    assert run.status == 0, run.stderr
    assert {m: imap_account.client.flags(m) for m in MAILBOXES} == before


def test_second_run_changes_nothing(imap_account: ImapAccount, tmp_path: Path) -> None:
    fill_mixed(imap_account)
    config = write_config(tmp_path, imap_account)
    assert mirrord("-c", str(config), "run", "--once").status == 0
    before = tree_snapshot(tmp_path / "Mail")
    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 0, run.stderr
    assert tree_snapshot(tmp_path / "Mail") == before
    assert "fetched" not in run.stderr
    assert run.stderr.count("up to date") == len(MAILBOXES)


def test_expunge_removes_exactly_that_copy(imap_account: ImapAccount, tmp_path: Path) -> None:
    client = imap_account.client
    uids = [client.append("INBOX", make_message(i), ()) for i in range(10)]
    config = write_config(tmp_path, imap_account)
    assert mirrord("-c", str(config), "run", "--once").status == 0
    before = tree_snapshot(tmp_path / "Mail")
    client.expunge("INBOX", [uids[3], uids[7]])
    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 0, run.stderr
    after = tree_snapshot(tmp_path / "Mail")
    assert len(before) - len(after) == 2
    assert all(after[name] == before[name] for name in after), "nothing but the expunged copies changed"
    assert_mirrors(imap_account, tmp_path / "Mail", "INBOX")


def test_server_flag_changes_show_up_locally(imap_account: ImapAccount, tmp_path: Path) -> None:
    client = imap_account.client
    uids = [client.append("INBOX", make_message(i), ()) for i in range(6)]
    client.add_flags("INBOX", uids[5], ["\\Seen"])
    config = write_config(tmp_path, imap_account)
    assert mirrord("-c", str(config), "run", "--once").status == 0
    client.add_flags("INBOX", uids[0], ["\\Seen"])
    client.add_flags("INBOX", uids[1], ["\\Flagged", "\\Answered"])
    client.remove_flags("INBOX", uids[5], ["\\Seen"])
    client.add_flags("INBOX", uids[2], ["$Label1"])  # a keyword: no letter, but no harm
    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 0, run.stderr
    assert "flag changes" in run.stderr
    assert_mirrors(imap_account, tmp_path / "Mail", "INBOX")


def test_local_file_deleted_by_hand_is_fetched_again(imap_account: ImapAccount, tmp_path: Path) -> None:
    client = imap_account.client
    for i in range(3):
        client.append("INBOX", make_message(i), ())
    config = write_config(tmp_path, imap_account)
    assert mirrord("-c", str(config), "run", "--once").status == 0
    local_messages(tmp_path / "Mail" / "INBOX")[0].path.unlink()
    assert mirrord("-c", str(config), "run", "--once").status == 0
    assert_mirrors(imap_account, tmp_path / "Mail", "INBOX")


def test_maildir_and_state_are_private(imap_account: ImapAccount, tmp_path: Path) -> None:
    imap_account.client.append("INBOX", make_message(1), ())
    old = os.umask(0o022)
    try:
        assert mirrord("-c", str(write_config(tmp_path, imap_account)), "run", "--once").status == 0
    finally:
        os.umask(old)
    inbox = tmp_path / "Mail" / "INBOX"
    for d in (inbox, inbox / "cur", inbox / "new", inbox / "tmp"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for m in local_messages(inbox):
        assert stat.S_IMODE(m.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state" / "state.sqlite3").stat().st_mode) == 0o600


def test_mailbox_patterns_and_excludes(imap_account: ImapAccount, tmp_path: Path) -> None:
    client = imap_account.client
    for name in ("Archive/2023", "Archive/2024", "Spam"):
        client.create(name)
        client.append(name, make_message(1), ())
    config = write_config(
        tmp_path, imap_account, extra='    mailboxes: ["INBOX", "Archive/*"]\n    exclude: ["Archive/2023"]\n'
    )
    assert mirrord("-c", str(config), "run", "--once").status == 0
    mail = tmp_path / "Mail"
    assert (mail / "Archive" / "2024" / "cur").is_dir()
    assert not (mail / "Archive" / "2023").exists()
    assert not (mail / "Spam").exists()


def test_status_shows_what_was_mirrored(imap_account: ImapAccount, tmp_path: Path) -> None:
    config = write_config(tmp_path, imap_account)
    assert "nothing mirrored yet" in mirrord("-c", str(config), "status").stdout
    for i in range(4):
        imap_account.client.append("INBOX", make_message(i), ())
    assert mirrord("-c", str(config), "run", "--once").status == 0
    out = mirrord("-c", str(config), "status").stdout
    assert "not running" in out
    (row,) = [line.split() for line in out.splitlines() if line.strip().startswith("INBOX")]
    assert row[:2] == ["INBOX", "4"]


def test_config_after_subcommand_is_accepted(imap_account: ImapAccount, tmp_path: Path) -> None:
    imap_account.client.append("INBOX", make_message(1), ())
    run = mirrord("run", "--once", "-c", str(write_config(tmp_path, imap_account)))
    assert run.status == 0, run.stderr
    assert len(local_messages(tmp_path / "Mail" / "INBOX")) == 1


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_verified_tls_both_ways(imap_account: ImapAccount, tmp_path: Path, tls: str, host: str) -> None:
    # The first connection is begun before the imports (protocol/early.py)
    # for a name as for an address; Twisted adopts it as the accepting side,
    # and a STARTTLS on it once hung the run with a TypeError.
    imap_account.client.append("INBOX", make_message(1), ())
    run = mirrord("-c", str(write_config(tmp_path, imap_account, tls=tls, host=host)), "run", "--once", "-v",
                  timeout=30)
    assert run.status == 0, run.stderr
    assert "worker 1: on the connection begun at start-up" in run.stderr
    assert len(local_messages(tmp_path / "Mail" / "INBOX")) == 1
    if tls == "starttls":
        assert "C: M1 STARTTLS" in run.stderr


def test_plaintext_to_loopback_works(imap_account: ImapAccount, tmp_path: Path) -> None:
    imap_account.client.append("INBOX", make_message(1), ())
    run = mirrord("-c", str(write_config(tmp_path, imap_account, tls="none", ca_file=None)), "run", "--once")
    assert run.status == 0, run.stderr


def test_uidvalidity_change_rematches_copies_without_downloading_them(
    imap_account: ImapAccount, tmp_path: Path
) -> None:
    client = imap_account.client
    client.create("Work")
    messages = [make_message(i) for i in range(5)]
    flags = [("\\Seen",), (), ("\\Flagged", "\\Seen"), ("\\Answered", "\\Seen"), ()]
    for m, f in zip(messages, flags):
        client.append("Work", m, f)
    config = write_config(tmp_path, imap_account)
    assert mirrord("-c", str(config), "run", "--once").status == 0
    inodes = {m.path.stat().st_ino for m in local_messages(tmp_path / "Mail" / "Work")}
    old = client.uidvalidity("Work")

    # The server recreates the mailbox with the same messages (and one more).
    client.delete("Work")
    client.create("Work")
    for m, f in zip(messages, flags):
        client.append("Work", m, f)
    client.append("Work", make_message(99), ())
    assert client.uidvalidity("Work") != old

    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 0, run.stderr
    assert "5 local copies re-matched to their new UIDs, 0 set aside" in run.stderr
    assert "1 fetched" in run.stderr, "only the new message is downloaded"
    assert_mirrors(imap_account, tmp_path / "Mail", "Work")
    after = {m.path.stat().st_ino for m in local_messages(tmp_path / "Mail" / "Work")}
    assert inodes <= after, "the old files were kept, not downloaded again"
    assert mirrord("-c", str(config), "run", "--once").stderr.count("up to date") == 2


def test_uidvalidity_change_sets_aside_what_no_longer_matches(imap_account: ImapAccount, tmp_path: Path) -> None:
    client = imap_account.client
    client.create("Work")
    messages = [make_message(i) for i in range(5)]
    for m in messages:
        client.append("Work", m, ())
    config = write_config(tmp_path, imap_account)
    assert mirrord("-c", str(config), "run", "--once").status == 0
    client.delete("Work")
    client.create("Work")
    for m in messages[:3]:
        client.append("Work", m, ())

    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 0, run.stderr
    assert "3 local copies re-matched to their new UIDs, 2 set aside" in run.stderr
    assert_mirrors(imap_account, tmp_path / "Mail", "Work")
    aside = tmp_path / "state" / "set-aside" / "test" / "Work"
    assert len(list(aside.iterdir())) == 2, "never silently dropped"


def test_first_sync_is_spread_over_the_workers(imap_account: ImapAccount, tmp_path: Path) -> None:
    imap_account.fill("INBOX", [make_message(i) for i in range(60)])
    run = mirrord("-c", str(write_config(tmp_path, imap_account)), "run", "--once", "-v")
    assert run.status == 0, run.stderr
    fetching = {
        line.split(" C: ")[0].split()[-1]
        for line in run.stderr.splitlines()
        if " C: " in line and "BODY.PEEK[]" in line
    }
    assert len(fetching) == 3, f"expected 3 workers fetching, saw {fetching}"
    assert len(local_messages(tmp_path / "Mail" / "INBOX")) == 60


def test_progress_on_a_terminal_and_plain_lines_otherwise(imap_account: ImapAccount, tmp_path: Path) -> None:
    import pty
    import subprocess
    import sys

    imap_account.fill("INBOX", [make_message(i, size=30_000) for i in range(1500)])
    config = write_config(tmp_path, imap_account)
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "mirrord", "-c", str(config), "run", "--once"],
        stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
    )
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    assert process.wait(60) == 0
    os.close(controller)
    text = seen.decode("utf-8", "replace")
    assert "\r\x1b[K" in text and "/1500 messages" in text and "MB/s" in text, text[-500:]
    assert "1500 fetched" in text
    # Not on a terminal (the other tests): no progress line, only log lines.
    (tmp_path / "state").rename(tmp_path / "state.old")
    import shutil

    shutil.rmtree(tmp_path / "Mail")
    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 0 and "\x1b[K" not in run.stderr and "1500 fetched" in run.stderr


def test_mass_removal_stops_the_mailbox_until_allowed_and_keeps_a_trash(
    imap_account: ImapAccount, tmp_path: Path
) -> None:
    client = imap_account.client
    client.create("Work")
    uids = [client.append("Work", make_message(i), ()) for i in range(20)]
    client.append("INBOX", make_message(100), ())
    config = write_config(tmp_path, imap_account)
    assert mirrord("-c", str(config), "run", "--once").status == 0
    before = tree_snapshot(tmp_path / "Mail" / "Work")
    client.expunge("Work", uids[:16])
    client.append("INBOX", make_message(101), ())

    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 1
    assert "test/Work" in run.stderr and "would remove 16 of 20 local copies" in run.stderr
    assert "--allow-delete test/Work" in run.stderr
    assert tree_snapshot(tmp_path / "Mail" / "Work") == before, "nothing removed"
    assert_mirrors(imap_account, tmp_path / "Mail", "INBOX")  # the other mailbox went on

    assert mirrord("-c", str(config), "run", "--allow-delete", "Work").status == 2, "only with --once"
    run = mirrord("-c", str(config), "run", "--once", "--allow-delete", "test/Work")
    assert run.status == 0, run.stderr
    assert_mirrors(imap_account, tmp_path / "Mail", "Work")
    trash = tmp_path / "state" / "trash" / "test" / "Work"
    assert len(list(trash.iterdir())) == 16, "removed copies wait in the trash"


def test_a_mailbox_emptied_on_the_server_is_not_emptied_locally_without_consent(
    imap_account: ImapAccount, tmp_path: Path
) -> None:
    client = imap_account.client
    imap_account.fill("INBOX", [make_message(i) for i in range(20)])
    config = write_config(tmp_path, imap_account)
    assert mirrord("-c", str(config), "run", "--once").status == 0
    client.expunge("INBOX", client.uids("INBOX"))
    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 1 and "every message of the mailbox" in run.stderr
    assert len(local_messages(tmp_path / "Mail" / "INBOX")) == 20


def test_a_mailbox_whose_folder_cannot_be_made_fails_alone(imap_account: ImapAccount, tmp_path: Path) -> None:
    """A local error of one mailbox (here a file where its folder goes) is that mailbox's alone."""
    client = imap_account.client
    for name in ("Aaa", "Zed"):
        client.create(name)
        client.append(name, make_message(hash(name) % 1000), ())
    client.append("INBOX", make_message(1), ())
    (tmp_path / "Mail").mkdir(mode=0o700)
    (tmp_path / "Mail" / "Aaa").write_text("not a folder\n")
    run = mirrord("-c", str(write_config(tmp_path, imap_account)), "run", "--once")
    assert run.status == 1, run.stderr
    assert "test/Aaa: FAILED" in run.stderr and "Aaa" in run.stderr
    assert_mirrors(imap_account, tmp_path / "Mail", "INBOX")
    assert_mirrors(imap_account, tmp_path / "Mail", "Zed")


def test_emptying_a_small_folder_on_the_server_is_mirrored(imap_account: ImapAccount, tmp_path: Path) -> None:
    """Deleting the one message of a folder (or a few) is everyday use, not a mass removal."""
    client = imap_account.client
    client.create("Notes")
    uids = [client.append("Notes", make_message(i), ()) for i in range(3)]
    one = client.append("INBOX", make_message(10), ())
    config = write_config(tmp_path, imap_account)
    assert mirrord("-c", str(config), "run", "--once").status == 0
    client.expunge("Notes", uids)
    client.expunge("INBOX", [one])
    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 0, run.stderr
    assert local_messages(tmp_path / "Mail" / "Notes") == []
    assert local_messages(tmp_path / "Mail" / "INBOX") == []
