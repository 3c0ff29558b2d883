"""The Maildir store on real files: placement, durability order, crash debris, modes."""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord.flags import Flags, representable
from mirrord.store import maildir as maildir_mod
from mirrord.store.maildir import LocalFile, Maildir, split_name, unique_name

SEEN = "\\Seen"
FLAGGED = "\\Flagged"
ANSWERED = "\\Answered"
DRAFT = "\\Draft"
DELETED = "\\Deleted"


@pytest.fixture
def umask0() -> Iterator[None]:
    """A permissive umask, so modes we see are the ones the code set."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def md(tmp_path: Path) -> Maildir:
    return Maildir(tmp_path / "acct" / "INBOX")


def listing(md: Maildir) -> dict[str, list[str]]:
    return {sub: sorted(os.listdir(md.path / sub)) for sub in ("new", "cur", "tmp")}


def put(md: Maildir, data: bytes, flags: Flags = frozenset()) -> str:
    tmp = md.open_tmp()
    tmp.write(data)
    return md.deliver(tmp, flags)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- creation and modes ------------------------------------------------------


def test_creates_dirs_and_missing_parents_private(tmp_path: Path, umask0: None) -> None:
    root = tmp_path / "mail"
    md = Maildir(root / "acct" / "Archive" / "2024")
    for d in (root, root / "acct", root / "acct" / "Archive", md.path):
        assert d.is_dir() and mode(d) == 0o700, d
    for sub in ("cur", "new", "tmp"):
        assert mode(md.path / sub) == 0o700


def test_existing_dirs_are_left_alone(tmp_path: Path, umask0: None) -> None:
    (tmp_path / "m").mkdir(mode=0o755)
    os.chmod(tmp_path / "m", 0o755)
    Maildir(tmp_path / "m")
    Maildir(tmp_path / "m")  # idempotent
    assert mode(tmp_path / "m") == 0o755
    assert mode(tmp_path / "m" / "cur") == 0o700


def test_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        Maildir(tmp_path / "f")


@pytest.mark.parametrize("umask", [0o000, 0o277])
def test_file_modes_do_not_depend_on_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        md = Maildir(tmp_path / "m")
        tmp = md.open_tmp()
        assert mode(tmp.path) == 0o600
        tmp.write(b"x")
        key = md.deliver(tmp, frozenset())
        assert mode(md.path / "new" / key) == 0o600
        assert mode(md.path / "new") == 0o700
    finally:
        os.umask(old)


@pytest.mark.parametrize(("umask", "fchmods"), [(0o022, 0), (0o077, 0), (0o277, 3), (0o477, 3)])
def test_a_file_costs_an_fchmod_only_when_the_umask_takes_from_its_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int, fchmods: int
) -> None:
    calls: list[int] = []
    real_fchmod = os.fchmod
    monkeypatch.setattr(maildir_mod.os, "fchmod", lambda fd, m: (calls.append(fd), real_fchmod(fd, m))[1])
    old = os.umask(umask)
    try:
        md = Maildir(tmp_path / "m")
        md.reserve_tmp(2)
        tmps = [md.open_tmp() for _ in range(3)]  # two made ahead, one made now
    finally:
        os.umask(old)
    assert len(calls) == fchmods
    assert [mode(t.path) for t in tmps] == [0o600] * 3
    md.release_reserve()


# -- unique names --------------------------------------------------------------


def test_unique_names_are_distinct_and_well_formed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maildir_mod.socket, "gethostname", lambda: "a/b:c!d.example")
    monkeypatch.setattr(maildir_mod, "_host_second", -1)  # read the hostname again
    names = [unique_name() for _ in range(20000)]
    assert len(set(names)) == len(names)
    for n in names[:10]:
        assert "/" not in n and ":" not in n and "!" not in n
        assert n.endswith(".a\\057b\\072c\\041d.example")
        assert f"P{os.getpid()}" in n
        assert split_name(n) == (n, "")


def test_a_forked_child_makes_names_of_its_own() -> None:
    """The child inherits the counter; its pid and its random bits keep its names apart."""
    parent = unique_name()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, unique_name().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 1000).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert f"P{pid}Q" in child
    random_part = re.compile(r"R([0-9a-f]{16})\.")
    assert random_part.search(child).group(1) != random_part.search(parent).group(1)  # type: ignore[union-attr]


def test_open_tmp_gives_distinct_files(md: Maildir) -> None:
    tmps = [md.open_tmp() for _ in range(200)]
    assert len({t.key for t in tmps}) == 200
    assert len(os.listdir(md.path / "tmp")) == 200
    for t in tmps:
        t.abort()
    assert listing(md)["tmp"] == []


# -- placement ---------------------------------------------------------------------

PLACEMENTS = [
    (frozenset(), "new", ""),
    (frozenset({"$Forwarded", "\\Recent"}), "new", ""),
    (frozenset({FLAGGED}), "new", ":2,F"),
    (frozenset({ANSWERED, DRAFT, DELETED}), "new", ":2,DRT"),
    (frozenset({SEEN}), "cur", ":2,S"),
    (frozenset({SEEN, FLAGGED, "Junk"}), "cur", ":2,FS"),
    (frozenset({SEEN, FLAGGED, ANSWERED, DRAFT, DELETED}), "cur", ":2,DFRST"),
    (frozenset({"\\seen", "\\flagged"}), "cur", ":2,FS"),
]


@pytest.mark.parametrize("flags,subdir,suffix", PLACEMENTS)
def test_delivery_placement(md: Maildir, flags: Flags, subdir: str, suffix: str) -> None:
    key = put(md, b"Subject: x\r\n\r\nbody\r\n", flags)
    assert (md.path / subdir / (key + suffix)).read_bytes() == b"Subject: x\n\nbody\n"
    other = "cur" if subdir == "new" else "new"
    assert listing(md)[other] == [] and listing(md)["tmp"] == []
    found = md.scan()
    assert list(found) == [key]
    assert found[key] == LocalFile(subdir, key + suffix, representable(flags))
    assert found[key].key == key


def test_deliver_many(md: Maildir) -> None:
    items = []
    for i in range(5):
        tmp = md.open_tmp()
        tmp.write(b"m%d\r\n" % i)
        items.append((tmp, frozenset({SEEN}) if i % 2 else frozenset()))
    keys = md.deliver_many(items)
    assert keys == [t.key for t, _ in items]
    found = md.scan()
    assert set(found) == set(keys)
    for i, key in enumerate(keys):
        lf = found[key]
        assert lf.subdir == ("cur" if i % 2 else "new")
        assert (md.path / lf.subdir / lf.filename).read_bytes() == b"m%d\n" % i
    assert md.deliver_many([]) == []


def test_deliver_many_fsyncs_each_directory_once(
    md: Maildir, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real = maildir_mod._fsync_dir
    monkeypatch.setattr(maildir_mod, "_fsync_dir", lambda p: (synced.append(p), real(p)))
    items = [(md.open_tmp(), frozenset({SEEN}) if i % 2 else frozenset()) for i in range(10)]
    md.deliver_many(items)
    assert sorted(synced) == [md.path / "cur", md.path / "new"]


def test_delivered_tmp_cannot_be_reused(md: Maildir) -> None:
    tmp = md.open_tmp()
    md.deliver(tmp, frozenset())
    with pytest.raises(ValueError):
        tmp.write(b"more")
    with pytest.raises(ValueError):
        md.deliver(tmp, frozenset())
    tmp.abort()  # no-op after delivery
    assert len(md.scan()) == 1


def test_tmp_of_another_maildir_is_refused(tmp_path: Path) -> None:
    a, b = Maildir(tmp_path / "a"), Maildir(tmp_path / "b")
    tmp = a.open_tmp()
    with pytest.raises(ValueError):
        b.deliver(tmp, frozenset())
    assert listing(a) == listing(b) == {"new": [], "cur": [], "tmp": []}


# -- CRLF -> LF ----------------------------------------------------------------------

# Any chunking of any bytes, through both CRLF -> LF implementations:
# tests/unit/test_newlines.py::test_a_message_written_in_any_pieces_is_the_exact_conversion.


def test_cr_held_across_chunks(md: Maildir) -> None:
    # The cases the property covers, spelled out.
    cases = [
        ([b"a\r", b"\nb"], b"a\nb"),
        ([b"a\r", b"b"], b"a\rb"),
        ([b"a\r"], b"a\r"),
        ([b"\r", b"", b"\n"], b"\n"),
        ([b"\r\r", b"\n"], b"\r\n"),
        ([b"\r", b"\r", b"\n", b"\n"], b"\r\n\n"),
    ]
    for chunks, expected in cases:
        tmp = md.open_tmp()
        for c in chunks:
            tmp.write(c)
        key = md.deliver(tmp, frozenset())
        assert (md.path / "new" / key).read_bytes() == expected, chunks


def test_large_message_in_small_and_large_chunks(md: Maildir) -> None:
    line = b"0123456789" * 7 + b"\r\n"
    data = line * 20000  # ~1.4 MB, crosses the write buffer many times
    tmp = md.open_tmp()
    for i in range(0, len(data), 1000):
        tmp.write(data[i : i + 1000])
    key = md.deliver(tmp, frozenset())
    assert (md.path / "new" / key).read_bytes() == data.replace(b"\r\n", b"\n")
    tmp = md.open_tmp()
    tmp.write(data)
    key = md.deliver(tmp, frozenset())
    assert (md.path / "new" / key).stat().st_size == tmp.size == len(data) - 20000


def test_write_accepts_bytes_like(md: Maildir) -> None:
    tmp = md.open_tmp()
    tmp.write(bytearray(b"a\r"))
    tmp.write(memoryview(b"\nb"))
    key = md.deliver(tmp, frozenset())
    assert (md.path / "new" / key).read_bytes() == b"a\nb"


# -- crashes and disk errors -----------------------------------------------------------


def assert_empty(md: Maildir) -> None:
    assert listing(md) == {"new": [], "cur": [], "tmp": []}


def test_abort_leaves_nothing(md: Maildir) -> None:
    tmp = md.open_tmp()
    tmp.write(b"partial\r")
    tmp.abort()
    tmp.abort()
    assert_empty(md)
    with pytest.raises(ValueError):
        tmp.write(b"x")


def test_context_manager_aborts_unless_delivered(md: Maildir) -> None:
    with pytest.raises(RuntimeError):
        with md.open_tmp() as tmp:
            tmp.write(b"half a message")
            raise RuntimeError("connection lost")
    assert_empty(md)
    with md.open_tmp() as tmp:
        tmp.write(b"whole")
        key = md.deliver(tmp, frozenset())
    assert listing(md)["new"] == [key]


def test_write_enospc_cleans_up(md: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = md.open_tmp()
    tmp.write(b"x" * 100)

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(maildir_mod.os, "write", full)
    monkeypatch.setattr(maildir_mod.os, "writev", lambda fd, pieces: full(fd, b""))
    with pytest.raises(OSError) as info:
        tmp.write(b"y" * (1 << 17))
    assert info.value.errno == errno.ENOSPC
    assert_empty(md)
    tmp.abort()  # what a caller does on any error: harmless
    assert_empty(md)


def test_short_writevs_are_completed(md: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:
    # Many small chunks are written with one writev; a short one is resumed
    # mid-piece, whatever piece it stopped in.
    real = os.writev
    monkeypatch.setattr(maildir_mod.os, "writev", lambda fd, pieces: real(fd, [b"".join(pieces)[:1000]]))
    tmp = md.open_tmp()
    for i in range(3000):
        tmp.write(b"line %d\r\n" % i)
    monkeypatch.undo()
    key = md.deliver(tmp, frozenset())
    assert (md.path / "new" / key).read_bytes() == b"".join(b"line %d\n" % i for i in range(3000))


def test_short_writes_are_completed(md: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write
    monkeypatch.setattr(maildir_mod.os, "write", lambda fd, b: real(fd, bytes(b)[:7]))
    tmp = md.open_tmp()
    tmp.write(b"abc\r\n" * 30000)
    monkeypatch.undo()
    key = md.deliver(tmp, frozenset())
    assert (md.path / "new" / key).read_bytes() == b"abc\n" * 30000


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC, errno.EROFS])
def test_file_fsync_failure_in_deliver(
    md: Maildir, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    tmp = md.open_tmp()
    tmp.write(b"message\r\n")

    def broken(fd: int) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(maildir_mod.os, "fsync", broken)
    with pytest.raises(OSError) as info:
        md.deliver(tmp, frozenset({SEEN}))
    assert info.value.errno == err
    monkeypatch.undo()
    assert_empty(md)


def test_rename_failure_in_deliver(md: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = md.open_tmp()
    tmp.write(b"message")

    def erofs(src: object, dst: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(maildir_mod.os, "rename", erofs)
    with pytest.raises(OSError):
        md.deliver(tmp, frozenset())
    monkeypatch.undo()
    assert_empty(md)


def test_directory_fsync_failure_takes_the_file_back(
    md: Maildir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file is complete in new/ but not known durable: the caller gets an
    # error and records nothing, so the file must not stay as an orphan.
    def broken(path: Path) -> None:
        raise OSError(errno.EIO, "I/O error")

    tmp = md.open_tmp()
    tmp.write(b"message")
    monkeypatch.setattr(maildir_mod, "_fsync_dir", broken)
    with pytest.raises(OSError):
        md.deliver(tmp, frozenset())
    monkeypatch.undo()
    assert_empty(md)


def test_deliver_many_is_all_or_nothing(md: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:
    items = []
    for i in range(6):
        tmp = md.open_tmp()
        tmp.write(b"m%d" % i)
        items.append((tmp, frozenset({SEEN}) if i % 2 else frozenset()))
    real = os.rename
    calls = []

    def fail_fourth(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 4:
            raise OSError(errno.EIO, "I/O error")
        real(src, dst)

    monkeypatch.setattr(maildir_mod.os, "rename", fail_fourth)
    with pytest.raises(OSError):
        md.deliver_many(items)
    monkeypatch.undo()
    assert_empty(md)


def test_interrupt_mid_deliver_cleans_up(md: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = md.open_tmp()
    tmp.write(b"m")

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(maildir_mod.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        md.deliver(tmp, frozenset())
    monkeypatch.undo()
    assert_empty(md)


def test_clean_tmp_removes_crash_debris(md: Maildir) -> None:
    # What a killed process leaves: files in tmp/ nobody has open.
    for name in ("1.M1P99Q1Rdead.host", "2.M2P99Q2Rdead.host", ".hidden"):
        (md.path / "tmp" / name).write_bytes(b"partial")
    live = md.open_tmp()
    live.write(b"being fetched")
    assert md.clean_tmp() == 3
    assert os.listdir(md.path / "tmp") == [live.key]
    md.deliver(live, frozenset())
    assert listing(md)["tmp"] == []


def test_clean_tmp_respects_age(md: Maildir) -> None:
    old, fresh = md.path / "tmp" / "old", md.path / "tmp" / "fresh"
    old.write_bytes(b"")
    fresh.write_bytes(b"")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert md.clean_tmp(older_than=600) == 1
    assert os.listdir(md.path / "tmp") == ["fresh"]


def test_crash_before_rename_is_invisible_then_cleaned(md: Maildir) -> None:
    tmp = md.open_tmp()
    tmp.write(b"half")
    # Simulate the process dying: the fd is gone, nobody aborts, the registry
    # of live files belongs to a process that no longer exists.
    os.close(tmp._fd)  # type: ignore[arg-type]
    maildir_mod._live_tmp.discard(tmp.key)
    assert md.scan() == {}
    assert Maildir(md.path).clean_tmp() == 1
    assert_empty(md)


# -- scan -------------------------------------------------------------------------------


def test_scan_finds_files_a_reader_renamed(md: Maildir) -> None:
    a = put(md, b"a")
    b = put(md, b"b", frozenset({FLAGGED}))
    c = put(md, b"c", frozenset({SEEN}))
    # The reader lists a (new -> cur, no flags), reads and replies to b,
    # and flags c; it also adds a letter IMAP cannot express ("P", passed).
    os.rename(md.path / "new" / a, md.path / "cur" / f"{a}:2,")
    os.rename(md.path / "new" / f"{b}:2,F", md.path / "cur" / f"{b}:2,FRS")
    os.rename(md.path / "cur" / f"{c}:2,S", md.path / "cur" / f"{c}:2,FPS")
    found = md.scan()
    assert found == {
        a: LocalFile("cur", f"{a}:2,", frozenset()),
        b: LocalFile("cur", f"{b}:2,FRS", frozenset({FLAGGED, ANSWERED, SEEN})),
        c: LocalFile("cur", f"{c}:2,FPS", frozenset({FLAGGED, SEEN})),
    }


def test_scan_ignores_dotfiles_dirs_symlinks_and_tmp(md: Maildir) -> None:
    key = put(md, b"x")
    (md.path / "cur" / ".mutt-lock").write_bytes(b"")
    (md.path / "new" / "subdir").mkdir()
    (md.path / "cur" / "link").symlink_to(md.path / "new" / key)
    (md.path / "tmp" / "inflight").write_bytes(b"")
    assert list(md.scan()) == [key]


def test_scan_accepts_bang_separator_and_other_info(md: Maildir) -> None:
    (md.path / "cur" / "111.A.host!2,RS").write_bytes(b"")
    (md.path / "cur" / "222.B.host:1,experimental").write_bytes(b"")
    (md.path / "new" / "333.C.host:2,Fab").write_bytes(b"")  # dovecot keyword letters
    found = md.scan()
    assert found["111.A.host"].flags == {ANSWERED, SEEN}
    assert found["222.B.host"].flags == frozenset()
    assert found["333.C.host"].flags == {FLAGGED}


def test_scan_prefers_cur_copy_of_a_duplicate(md: Maildir) -> None:
    # A crash between the two directory fsyncs of a new -> cur rename.
    (md.path / "new" / "k").write_bytes(b"")
    (md.path / "cur" / "k:2,S").write_bytes(b"")
    assert md.scan() == {"k": LocalFile("cur", "k:2,S", frozenset({SEEN}))}


# -- set_flags --------------------------------------------------------------------------


def test_set_flags_new_to_cur_when_seen(md: Maildir) -> None:
    key = put(md, b"x")
    lf = md.set_flags(key, frozenset({SEEN, "$Junk"}))
    assert lf == LocalFile("cur", f"{key}:2,S", frozenset({SEEN}))
    assert listing(md)["new"] == [] and listing(md)["cur"] == [f"{key}:2,S"]
    assert md.scan()[key] == lf


def test_many_flag_renames_leave_the_directory_fsyncs_to_one_call(
    md: Maildir, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [put(md, b"m%d" % i) for i in range(5)]
    synced: list[Path] = []
    real = maildir_mod._fsync_dir
    monkeypatch.setattr(maildir_mod, "_fsync_dir", lambda p: (synced.append(p), real(p)))
    for key in keys:
        md.set_flags(key, frozenset({SEEN}), sync=False)
    assert synced == [] and len(listing(md)["cur"]) == 5
    md.sync_dirs({"cur", "new", "cur"})
    assert synced == [md.path / "cur", md.path / "new"]
    md.set_flags(keys[0], frozenset({SEEN, FLAGGED}))  # alone: fsynced at once
    assert synced[2:] == [md.path / "cur"]


def test_set_flags_stays_in_new_while_unseen(md: Maildir) -> None:
    key = put(md, b"x")
    md.set_flags(key, frozenset({FLAGGED}))
    assert listing(md)["new"] == [f"{key}:2,F"]
    md.set_flags(key, frozenset())
    assert listing(md)["new"] == [key]


def test_set_flags_never_moves_back_to_new(md: Maildir) -> None:
    key = put(md, b"x", frozenset({SEEN, FLAGGED}))
    md.set_flags(key, frozenset({FLAGGED}))
    assert listing(md)["cur"] == [f"{key}:2,F"]
    md.set_flags(key, frozenset())
    assert listing(md)["cur"] == [f"{key}:2,"] and listing(md)["new"] == []


def test_set_flags_drops_letters_the_server_does_not_have(md: Maildir) -> None:
    key = put(md, b"x", frozenset({SEEN}))
    os.rename(md.path / "cur" / f"{key}:2,S", md.path / "cur" / f"{key}:2,PS")
    md.set_flags(key, frozenset({SEEN, DELETED}))
    assert listing(md)["cur"] == [f"{key}:2,ST"]


def test_set_flags_noop_does_not_rename(md: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:
    key = put(md, b"x", frozenset({SEEN, FLAGGED}))
    (md.path / "new" / "bang!2,F").write_bytes(b"")
    current = md.scan()

    def no_rename(src: object, dst: object) -> None:
        raise AssertionError("renamed")

    def no_fsync(path: Path) -> None:
        raise AssertionError("fsynced")

    monkeypatch.setattr(maildir_mod.os, "rename", no_rename)
    monkeypatch.setattr(maildir_mod, "_fsync_dir", no_fsync)
    md.set_flags(key, frozenset({"\\seen", "\\Flagged", "$Label1"}), current[key])
    md.set_flags(key, frozenset({SEEN, FLAGGED}))
    md.set_flags("bang", frozenset({FLAGGED}))


def test_set_flags_with_stale_current_falls_back(md: Maildir) -> None:
    key = put(md, b"x")
    stale = md.scan()[key]
    os.rename(md.path / "new" / key, md.path / "cur" / f"{key}:2,")  # the reader moved it
    md.set_flags(key, frozenset({SEEN}), stale)
    assert listing(md) == {"new": [], "cur": [f"{key}:2,S"], "tmp": []}


def test_set_flags_missing_file(md: Maildir) -> None:
    with pytest.raises(FileNotFoundError):
        md.set_flags("nosuchkey", frozenset({SEEN}))
    key = put(md, b"x")
    lf = md.scan()[key]
    os.unlink(md.path / "new" / key)  # the user deleted it
    with pytest.raises(FileNotFoundError):
        md.set_flags(key, frozenset({SEEN}), lf)


def test_set_flags_keeps_content_and_mode(md: Maildir, umask0: None) -> None:
    key = put(md, b"hello\r\n")
    md.set_flags(key, frozenset({SEEN}))
    path = md.path / "cur" / f"{key}:2,S"
    assert path.read_bytes() == b"hello\n" and mode(path) == 0o600


# -- remove -----------------------------------------------------------------------------


def test_remove(md: Maildir) -> None:
    a = put(md, b"a")
    b = put(md, b"b", frozenset({SEEN}))
    c = put(md, b"c", frozenset({FLAGGED}))
    found = md.scan()
    md.remove(a, found[a])
    md.remove(b)
    assert list(md.scan()) == [c]
    md.remove(a)  # already gone: fine
    md.remove(a, found[a])
    md.remove("never-existed")
    assert list(md.scan()) == [c]


def test_remove_finds_renamed_file_and_duplicates(md: Maildir) -> None:
    key = put(md, b"x")
    stale = md.scan()[key]
    os.rename(md.path / "new" / key, md.path / "cur" / f"{key}:2,S")
    (md.path / "new" / f"{key}:2,F").write_bytes(b"copy")
    md.remove(key, stale)
    assert_empty(md)


def test_remove_many(md: Maildir) -> None:
    keys = [put(md, b"%d" % i, frozenset({SEEN}) if i % 3 == 0 else frozenset()) for i in range(9)]
    found = md.scan()
    md.remove_many(keys[:4], {k: found[k] for k in keys[:2]})
    assert set(md.scan()) == set(keys[4:])
    md.remove_many(keys)
    assert_empty(md)


def test_trash_keeps_removed_copies_then_expires_them(tmp_path: Path) -> None:
    import time as _time

    from mirrord.store.maildir import Trash

    md = Maildir(tmp_path / "INBOX")
    tmp = md.open_tmp()
    tmp.write(b"Subject: x\r\n\r\nbody\r\n")
    key = md.deliver(tmp, frozenset({"\\Seen"}))
    trash = Trash(tmp_path / "trash", days=7)
    md.remove_many([key], None, trash)
    assert md.scan() == {}
    (kept,) = list((tmp_path / "trash").iterdir())
    assert kept.read_bytes() == b"Subject: x\n\nbody\n"
    assert trash.expire(now=_time.time() + 6 * 86400) == 0
    assert trash.expire(now=_time.time() + 8 * 86400) == 1
    assert list((tmp_path / "trash").iterdir()) == []


def test_trash_of_zero_days_unlinks_at_once(tmp_path: Path) -> None:
    from mirrord.store.maildir import Trash

    md = Maildir(tmp_path / "INBOX")
    tmp = md.open_tmp()
    tmp.write(b"x")
    key = md.deliver(tmp, frozenset())
    md.remove_many([key], None, Trash(tmp_path / "trash", days=0))
    assert md.scan() == {} and not (tmp_path / "trash").exists()


def test_a_tail_left_for_sync_is_written_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    md = Maildir(tmp_path / "m")
    tmp = md.open_tmp()
    tmp.write(b"Subject: x\r\n\r\nbody\r")
    tmp.close_write(flush=False)
    assert os.path.getsize(tmp.path) == 0  # nothing written yet: the syncing thread will
    tmp.sync()
    assert tmp.path.read_bytes() == b"Subject: x\n\nbody\r"
    key = md.deliver(tmp, frozenset())
    assert key in md.scan()
    # A write that fails there fails the sync, and the message can only be aborted.
    bad = md.open_tmp()
    bad.write(b"more")
    bad.close_write(flush=False)

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        bad.sync()
    monkeypatch.undo()
    with pytest.raises(ValueError):
        md.deliver(bad, frozenset())
    assert os.listdir(md.path / "tmp") == []


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(1, 120), max_size=8))
def test_the_message_id_is_read_as_the_body_streams_by(tmp_path_factory: pytest.TempPathFactory, cuts: list[int]) -> None:
    """Whatever the chunks (a header, a CRLF split between two), the Message-ID is the header's."""
    md = Maildir(tmp_path_factory.mktemp("md") / "box")
    raw = (b"From: a@example.org\r\nMessage-ID:\r\n <folded@example.org>\r\nSubject: x\r\n\r\n"
           b"Message-ID: <in-the-body@example.org>\r\n" + b"body\r\n" * 40)
    tmp = md.open_tmp()
    pos = 0
    for cut in sorted(set(cuts)):
        tmp.write(raw[pos:cut])
        pos = max(pos, cut)
    tmp.write(raw[pos:])
    assert tmp.message_id == "<folded@example.org>"
    tmp.abort()


def test_a_message_without_a_message_id_has_none(tmp_path: Path) -> None:
    tmp = Maildir(tmp_path / "box").open_tmp()
    tmp.write(b"From: a@example.org\r\n\r\nMessage-ID: <body@x>\r\n")
    assert tmp.message_id is None
    tmp.abort()
