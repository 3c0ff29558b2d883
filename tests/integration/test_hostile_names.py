"""Server folder names that used to break an account, against a real Dovecot (issue #11)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mirrord.testing import ImapAccount, make_message
from tests.integration._mirrord import assert_mirrors, mirrord, write_config


def test_child_trash_never_breaks_the_parent(imap_account: ImapAccount, tmp_path: Path) -> None:
    """One expunge in Archive/2024, then Archive's trash expiry must not touch the child's trash."""
    client = imap_account.client
    client.create("Archive")
    client.create("Archive/2024")
    client.append("Archive", make_message(1), ())
    uids = [client.append("Archive/2024", make_message(i), ()) for i in range(2, 5)]
    config = write_config(tmp_path, imap_account)
    assert mirrord("-c", str(config), "run", "--once").status == 0
    client.expunge("Archive/2024", uids[0])
    for _ in range(2):  # the expunge moves a copy into the trash; the next run expires Archive's
        run = mirrord("-c", str(config), "run", "--once")
        assert run.status == 0, run.stderr
        assert "FAILED" not in run.stderr
    assert_mirrors(imap_account, tmp_path / "Mail", "Archive")
    assert_mirrors(imap_account, tmp_path / "Mail", "Archive/2024")
    trash = tmp_path / "state" / "trash"
    for d in [trash, *(p for p in trash.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_a_name_too_long_for_the_file_system_is_mirrored(imap_account: ImapAccount, tmp_path: Path) -> None:
    """90 CJK characters: 270 bytes of UTF-8, which Dovecot accepts and ext4 does not."""
    client = imap_account.client
    long_name = "中" * 90
    client.create(long_name)
    client.append(long_name, make_message(1), ())
    client.append("INBOX", make_message(2), ())
    config = write_config(tmp_path, imap_account)
    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 0, run.stderr
    folders = [p for p in (tmp_path / "Mail").iterdir() if p.name.startswith("中")]
    assert len(folders) == 1 and len(os.fsencode(folders[0].name)) <= 255
    assert len(list((folders[0] / "new").iterdir()) + list((folders[0] / "cur").iterdir())) == 1
    again = mirrord("-c", str(config), "run", "--once")
    assert again.status == 0, again.stderr
    assert [p for p in (tmp_path / "Mail").iterdir() if p.name.startswith("中")] == folders
