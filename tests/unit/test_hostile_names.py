"""Names a server chooses and the directories they become (issue #11, items 3, 4 and 11).

A server's folder names are not ours: too long for the file system, full of
control characters, or two of them spelled alike. Each must still give one
private, distinct, readable local directory, and no mailbox's trash may sit
inside another's.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from mirrord.protocol.client import ListEntry, Namespace
from mirrord.store.maildir import Maildir, Trash, trash_dir, trash_for
from mirrord.sync.account import choose_mailboxes
from mirrord.sync.names import NAME_MAX, flat_name, local_name, maildir_path, unique_local_names, visible


@pytest.fixture
def umask022() -> Iterator[None]:
    """The usual umask: what makes mkdir(parents=True) leave 0755 parents."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# -- item 3: a child's trash never breaks its parent ---------------------------


def _old_file(root: Path, name: str, age_days: float = 40) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    p = root / f"{int(time.time() - age_days * 86400)}-{name}"
    p.write_bytes(b"x")
    return p


def test_child_and_parent_trash_do_not_nest(tmp_path: Path) -> None:
    parent = trash_dir(tmp_path, "trash", "acct", "Archive")
    child = trash_dir(tmp_path, "trash", "acct", "Archive/2024")
    assert parent != child
    assert parent not in child.parents and child not in parent.parents
    assert parent.parent == child.parent == tmp_path / "trash" / "acct"


def test_expire_after_child_expunge_does_not_fail_the_parent(tmp_path: Path) -> None:
    """The reported sequence: one expunge in Archive/2024, then Archive's expiry."""
    md = tmp_path / "mail"
    src = md / "msg"
    md.mkdir()
    src.write_bytes(b"mail")
    child = trash_for(tmp_path, "trash", "acct", "Archive/2024", 30)
    child.put(src)
    # Age what the child holds past the limit, like a month later.
    for p in child.root.iterdir():
        stamp, _, rest = p.name.partition("-")
        p.rename(p.with_name(f"{int(stamp) - 40 * 86400}-{rest}"))
    parent = trash_for(tmp_path, "trash", "acct", "Archive", 30)
    assert parent.expire() == 0
    assert child.expire() == 1


def test_old_nested_layout_expires_and_never_fails(tmp_path: Path) -> None:
    """Trash left by older versions: trash/acct/Archive/<time>-... and trash/acct/Archive/2024/<time>-...

    Before the fix, Archive's expiry tried to unlink the directory 2024 (its
    name starts with digits): IsADirectoryError on every run.
    """
    old_parent = tmp_path / "trash" / "acct" / "Archive"
    old_child = old_parent / "2024"
    _old_file(old_child, "child-mail")
    os.utime(old_child)  # the dir's name is what counts, and "2024" is a number
    _old_file(old_parent, "parent-mail")
    parent = trash_for(tmp_path, "trash", "acct", "Archive", 30)
    assert parent.expire() == 1
    assert old_child.is_dir()
    child = trash_for(tmp_path, "trash", "acct", "Archive/2024", 30)
    assert child.expire() == 1
    assert list(old_child.iterdir()) == []


def test_expire_of_plain_trash_tolerates_directories(tmp_path: Path) -> None:
    """Even a Trash built by hand on a nested root never fails on a directory."""
    root = tmp_path / "t"
    (root / "1000").mkdir(parents=True)
    _old_file(root, "m")
    assert Trash(root, 1).expire() == 1
    assert (root / "1000").is_dir()


def test_expire_logs_an_entry_it_cannot_delete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "t"
    _old_file(root, "m")

    def refuse(path: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "unlink", refuse)
    assert Trash(root, 1).expire() == 0
    assert "cannot delete" in caplog.text


# -- item 4: names too long for the file system ---------------------------------


def test_long_cjk_name_fits_and_is_stable() -> None:
    server = "中" * 90  # 270 bytes of UTF-8, which Dovecot accepts
    name = local_name(server, "/")
    assert len(name.encode()) <= NAME_MAX
    assert name.startswith("中" * 50)
    assert name == local_name(server, "/")
    other = local_name("中" * 89 + "文", "/")
    assert other != name and len(other.encode()) <= NAME_MAX


def test_long_name_makes_a_real_maildir(tmp_path: Path) -> None:
    name = local_name("INBOX." + "中" * 90 + ".子", ".", "INBOX.")
    path = maildir_path(tmp_path, name)
    Maildir(path)
    assert (path / "cur").is_dir()
    assert all(len(part.encode()) <= NAME_MAX for part in path.relative_to(tmp_path).parts)


def test_long_name_trash_fits(tmp_path: Path) -> None:
    name = local_name("中" * 80 + "/" + "文" * 80, "/")
    root = trash_dir(tmp_path, "trash", "acct", name)
    src = tmp_path / "m"
    src.write_bytes(b"x")
    trash_for(tmp_path, "trash", "acct", name, 30).put(src)
    assert root.is_dir() and len(root.name.encode()) <= NAME_MAX


def test_flat_names_are_distinct() -> None:
    assert flat_name("a/b") != flat_name("a%2Fb")
    assert flat_name("..") not in ("", ".", "..")


# -- item 11: private directories, visible control characters, no hidden INBOX ---


def test_trash_and_its_parents_are_private(tmp_path: Path, umask022: None) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    src = tmp_path / "m"
    src.write_bytes(b"x")
    trash = trash_for(state, "trash", "acct", "Archive/2024", 30)
    trash.put(src)
    for d in (state / "trash", state / "trash" / "acct", trash.root):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


@pytest.mark.parametrize("ch", ["\x1b", "\n", "\r", "\x07", "\x7f", "\x85", "\x9b"])
def test_control_characters_are_spelled_visibly(ch: str) -> None:
    name = local_name(f"INBOX.a{ch}b", ".", "INBOX.")
    assert ch not in name
    assert name == f"a\\x{ord(ch):02x}b"
    assert visible(f"x{ch}") == f"x\\x{ord(ch):02x}"


def test_printable_names_are_unchanged() -> None:
    assert visible("Entwürfe/日本 #1") == "Entwürfe/日本 #1"
    assert local_name("Entwürfe/日本", "/") == "Entwürfe/日本"


def _account(root: Path) -> SimpleNamespace:
    return SimpleNamespace(name="acct", maildir=root, wants=lambda name: True)


@pytest.mark.parametrize("order", [0, 1])
def test_inbox_inbox_cannot_hide_the_real_inbox(tmp_path: Path, order: int) -> None:
    entries = [
        ListEntry(b"INBOX.INBOX", "INBOX.INBOX", ".", frozenset()),
        ListEntry(b"INBOX", "INBOX", ".", frozenset()),
    ]
    if order:
        entries.reverse()
    found = choose_mailboxes(_account(tmp_path), entries, Namespace("INBOX.", "."))  # type: ignore[arg-type]
    by_server = {p.entry.name: p.local_name for p in found.wanted}
    assert by_server["INBOX"] == "INBOX"
    assert by_server["INBOX.INBOX"] != "INBOX"
    assert by_server["INBOX.INBOX"].startswith("INBOX~")


def test_unique_names_are_stable_and_keep_the_exact_spelling() -> None:
    pairs = [("a\x1bb", "a\\x1bb"), ("a\\x1bb", "a\\x1bb")]
    got = unique_local_names(pairs)
    assert got["a\\x1bb"] == "a\\x1bb"  # the folder really called that keeps its name
    assert got["a\x1bb"] != "a\\x1bb"
    assert got == unique_local_names(reversed(pairs))


def test_trash_left_open_by_an_older_version_is_made_private(tmp_path: Path, umask022: None) -> None:
    state = tmp_path / "state"
    old = state / "trash" / "acct" / "INBOX"
    old.mkdir(parents=True)  # 0755 each, as before the fix
    src = tmp_path / "m"
    src.write_bytes(b"x")
    trash_for(state, "trash", "acct", "INBOX", 30).put(src)
    for d in (state / "trash", state / "trash" / "acct", old):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_account_lock_dir_and_missing_state_dir_are_private(tmp_path: Path, umask022: None) -> None:
    from mirrord.locks import AccountLock

    state = tmp_path / "new" / "state"
    lock = AccountLock(state, "acct")
    assert lock.acquire()
    lock.release()
    for d in (tmp_path / "new", state, state / "locks"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_mailbox_sync_uses_flat_trash_dirs(tmp_path: Path) -> None:
    """What the sync builds for Archive and Archive/2024: siblings, never parent and child."""
    from mirrord.store.state import StateDB
    from mirrord.sync.mailbox import MailboxSync

    account = SimpleNamespace(name="acct", maildir=tmp_path / "mail", max_delete=0.5, trash_days=30, two_way=False)
    with StateDB(tmp_path / "state" / "state.sqlite3") as state:
        syncs = [
            MailboxSync.for_account(account, ListEntry(n.encode(), n, "/", frozenset()), n, state, None)  # type: ignore[arg-type]
            for n in ("Archive", "Archive/2024")
        ]
    roots = [s.trash.root for s in syncs] + [s.set_aside.root for s in syncs]  # type: ignore[union-attr]
    for a in roots:
        for b in roots:
            assert a == b or a not in b.parents


def test_expiring_a_long_named_trash_logs_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    name = local_name("中" * 90, "/")
    assert trash_for(tmp_path, "trash", "acct", "中" * 90, 30).legacy is None
    assert trash_for(tmp_path, "trash", "acct", name, 30).expire() == 0
    assert caplog.text == ""
