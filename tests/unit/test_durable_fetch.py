"""Fetched messages made durable off the reactor: ordering, failures, the tmp/ reserve.

The fsyncs run in the syncer's threads; these tests use a syncer whose calls
the test completes by hand, so the order in which the reactor side renames
and commits can be checked against the fsyncs without threads or sleeps.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from mirrord import _fs
from mirrord.protocol.client import FetchedMessage, ListEntry
from mirrord.store import maildir as maildir_mod
from mirrord.store.maildir import Maildir
from mirrord.store.state import StateDB
from mirrord.sync.mailbox import MailboxResult, MailboxSync


class HeldSyncer:
    """A syncer whose calls wait until the test runs them (``release``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[[], Any], defer.Deferred[Any]]] = []

    @property
    def pending(self) -> int:
        return len(self.calls)

    def run(self, fn: Callable[[], Any], *, first: bool = False) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((fn, d))
        return d

    def release(self, fail: BaseException | None = None) -> None:
        """Run (or fail) every waiting call, and those they lead to."""
        while self.calls:
            self._release_once(fail)

    def _release_once(self, fail: BaseException | None) -> None:
        calls, self.calls = self.calls, []
        for fn, d in calls:
            if fail is not None:
                d.errback(fail)
                continue
            try:
                value = fn()
            except BaseException as e:  # noqa: BLE001
                d.errback(e)
            else:
                d.callback(value)


@pytest.fixture
def sync(tmp_path: Path) -> MailboxSync:
    state = StateDB(tmp_path / "state" / "state.sqlite3")
    state.set_mailbox("acct", "INBOX", 7)
    s = MailboxSync(
        account="acct",
        entry=ListEntry(b"INBOX", "INBOX", "/", frozenset()),
        local_name="INBOX",
        maildir=Maildir(tmp_path / "Mail" / "INBOX"),
        state=state,
        pool=None,  # type: ignore[arg-type]
    )
    s.syncer = HeldSyncer()  # type: ignore[assignment]
    return s


def fake_fetch(sync: MailboxSync, count: int, after: Callable[[], None] | None = None) -> Any:
    """A fetch command that 'receives' ``count`` messages, then ends (or raises)."""

    async def fetch(arrived: Callable[[FetchedMessage], None]) -> None:
        for uid in range(1, count + 1):
            tmp = sync.maildir.open_tmp()
            tmp.write(b"Subject: %d\r\n\r\nbody\r\n" % uid)
            arrived(FetchedMessage(uid, frozenset({"\\Seen"}) if uid % 2 else frozenset(), None, tmp))
        if after is not None:
            after()

    return fetch


def tmp_files(sync: MailboxSync) -> list[str]:
    return os.listdir(sync.maildir.path / "tmp")


def test_rename_follows_fsync_and_commit_follows_directory_fsync(
    sync: MailboxSync, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    fd_paths: dict[int, str] = {}
    real_open, real_fsync, real_rename = os.open, os.fsync, os.rename
    real_fsync_dir = maildir_mod._fsync_dir
    real_promote = sync.state.promote_pending

    def op(path: Any, flags: int, *a: Any) -> int:
        fd = real_open(path, flags, *a)
        fd_paths[fd] = os.path.basename(str(path))
        return fd

    def fsync(fd: int) -> None:
        events.append(("fsync", fd_paths.get(fd, "?")))
        real_fsync(fd)

    def rename(src: Any, dst: Any) -> None:
        events.append(("rename", os.path.basename(str(src))))
        real_rename(src, dst)

    def fsync_dir(path: Path) -> None:
        events.append(("fsync_dir", path.name))
        real_fsync_dir(path)

    def promote(account: str, mailbox: str, uids: Any) -> None:
        events.append(("commit", ",".join(map(str, uids))))
        real_promote(account, mailbox, uids)

    monkeypatch.setattr(maildir_mod.os, "open", op)
    monkeypatch.setattr(maildir_mod.os, "fsync", fsync)
    monkeypatch.setattr(maildir_mod.os, "rename", rename)
    monkeypatch.setattr(maildir_mod, "_fsync_dir", fsync_dir)
    monkeypatch.setattr(sync.state, "promote_pending", promote)
    result = MailboxResult("acct", "INBOX")
    d = defer.Deferred.fromCoroutine(sync._receive(fake_fetch(sync, 7), result, flush_every=3))
    # Every message has arrived; none is durable yet, so nothing may be visible.
    assert not d.called
    assert [e for e in events if e[0] != "fsync"] == []
    assert sync.maildir.scan() == {}
    assert sync.state.count("acct", "INBOX") == 0
    sync.syncer.release()  # type: ignore[attr-defined]
    assert d.called
    d.result  # noqa: B018 - raises if it failed
    assert result.fetched == 7
    assert sync.state.count("acct", "INBOX") == 7
    assert len(sync.maildir.scan()) == 7
    for name in {n for kind, n in events if kind == "rename"}:
        assert events.index(("fsync", name)) < events.index(("rename", name))
    # Each commit comes after a directory fsync that follows the group's last rename.
    for i, (kind, _) in enumerate(events):
        if kind == "commit":
            last_rename = max(j for j in range(i) if events[j][0] == "rename")
            assert any(events[j][0] == "fsync_dir" for j in range(last_rename, i))
    assert [e[1] for e in events if e[0] == "commit"] == ["1,2,3", "4,5,6", "7"]


def test_tails_left_for_the_fsync_threads_stay_under_their_byte_bound(sync: MailboxSync) -> None:
    """A body's tail waits in memory for its fsync thread only within DEFER_TAIL_BYTES:
    past it, the reading thread writes the tail itself (the file is the same)."""
    from mirrord.sync import fetching

    bodies: list[Any] = []
    text = b"Subject: x\r\n\r\n" + b"0123456789abcdef\r\n" * 3000  # 54 KB: all of it one tail

    async def fetch(arrived: Callable[[FetchedMessage], None]) -> None:
        for uid in range(1, 81):
            tmp = sync.maildir.open_tmp()
            tmp.write(text)
            bodies.append(tmp)
            arrived(FetchedMessage(uid, frozenset(), None, tmp))

    result = MailboxResult("acct", "INBOX")
    d = defer.Deferred.fromCoroutine(sync._receive(fetch, result))
    # 80 bodies arrived, none fsynced yet: the tails still held are bounded.
    held = sum(b.buffered for b in bodies)  # 4 MB when the bound counted calls, not bytes
    assert 0 < held <= fetching.DEFER_TAIL_BYTES
    assert fetching._tails.held == held
    sync.syncer.release()  # type: ignore[attr-defined]
    d.result  # noqa: B018 - raises if it failed
    assert fetching._tails.held == 0
    assert result.fetched == 80
    files = sync.maildir.scan()
    assert len(files) == 80
    for lf in files.values():
        assert (sync.maildir.path / lf.subdir / lf.filename).read_bytes() == text.replace(b"\r\n", b"\n")


def test_a_failed_fsync_in_a_thread_fails_the_fetch_and_leaves_nothing(sync: MailboxSync) -> None:
    result = MailboxResult("acct", "INBOX")
    d = defer.Deferred.fromCoroutine(sync._receive(fake_fetch(sync, 5), result, flush_every=2))
    sync.syncer.release(OSError(errno.EIO, "Input/output error"))  # type: ignore[attr-defined]
    failure = d.result
    d.addErrback(lambda _: None)
    assert isinstance(failure.value, OSError) and failure.value.errno == errno.EIO
    assert sync.maildir.scan() == {}
    assert tmp_files(sync) == []
    assert sync.state.count("acct", "INBOX") == 0
    assert sync.state.pending("acct", "INBOX") == {}


def test_a_failed_fsync_is_the_mailbox_error_users_see(sync: MailboxSync, monkeypatch: pytest.MonkeyPatch) -> None:
    async def run(result: MailboxResult) -> None:
        await sync._receive(fake_fetch(sync, 3), result)

    monkeypatch.setattr(sync, "_run", run)
    monkeypatch.setattr(sync, "syncer", _fs.InlineSyncer())

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(maildir_mod.os, "fsync", eio)
    d = defer.Deferred.fromCoroutine(sync.run())
    result = d.result
    assert result.error is not None and result.error.startswith("cannot write the mirror: Input/output error")
    assert sync.maildir.scan() == {} and tmp_files(sync) == []


def test_messages_complete_before_a_dropped_connection_are_kept(sync: MailboxSync) -> None:
    def drop() -> None:
        raise ConnectionError("connection lost")

    result = MailboxResult("acct", "INBOX")
    recorded: set[int] = set()
    d = defer.Deferred.fromCoroutine(
        sync._receive(fake_fetch(sync, 4, after=drop), result, flush_every=3, recorded=recorded)
    )
    assert not d.called  # waits for the groups before it reports the drop
    sync.syncer.release()  # type: ignore[attr-defined]
    failure = d.result
    d.addErrback(lambda _: None)
    assert isinstance(failure.value, ConnectionError)
    assert recorded == {1, 2, 3, 4}
    assert sync.state.count("acct", "INBOX") == 4 and len(sync.maildir.scan()) == 4


def test_failure_of_one_group_discards_the_rest_of_the_command(sync: MailboxSync) -> None:
    taken: list[int] = []

    async def fetch(arrived: Callable[[FetchedMessage], None]) -> None:
        for uid in range(1, 5):
            tmp = sync.maildir.open_tmp()
            tmp.write(b"m")
            try:
                arrived(FetchedMessage(uid, frozenset(), None, tmp))
                taken.append(uid)
            except OSError:
                tmp.abort()  # what the client does with a body on_message refused
            if uid == 2:
                sync.syncer.release(OSError(errno.ENOSPC, "No space left on device"))  # type: ignore[attr-defined]

    d = defer.Deferred.fromCoroutine(sync._receive(fetch, MailboxResult("acct", "INBOX"), flush_every=2))
    failure = d.result
    d.addErrback(lambda _: None)
    assert failure.value.errno == errno.ENOSPC
    assert taken == [1, 2]
    assert sync.maildir.scan() == {} and tmp_files(sync) == []


def _disk_full_at_fsync(nth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``nth`` fsync of the store fails as on a full disk; the others are real."""
    calls: list[int] = []
    real_fsync = maildir_mod.os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == nth:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(maildir_mod.os, "fsync", fsync)


def test_a_message_that_cannot_be_made_durable_costs_only_itself(
    sync: MailboxSync, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk fails some files of a group, not the group: the others are kept, so a
    first sync on a nearly full disk makes progress instead of starting over each time."""
    _disk_full_at_fsync(4, monkeypatch)  # the fourth message's file
    recorded: set[int] = set()
    d = defer.Deferred.fromCoroutine(
        sync._receive(fake_fetch(sync, 6), MailboxResult("acct", "INBOX"), flush_every=6, recorded=recorded)
    )
    sync.syncer.release()  # type: ignore[attr-defined]
    failure = d.result
    d.addErrback(lambda _: None)
    assert failure.value.errno == errno.ENOSPC, "the error is still the command's"
    assert recorded == {1, 2, 3, 5, 6}
    assert sync.state.count("acct", "INBOX") == 5 and len(sync.maildir.scan()) == 5
    assert tmp_files(sync) == [], "the failed file is removed"


def test_new_mail_is_fsynced_renamed_and_recorded_in_one_hand_off(
    sync: MailboxSync, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: on the push path a lone new message costs one syncer call
    (fsync, rename, directory fsync), not an fsync call and then a delivery
    call, each a hand-off to a thread and a wake-up of the reactor. The
    pending row is committed before that call; the file is fsynced before
    its rename and the row made real after the directory fsync."""
    from twisted.internet import task

    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename
    real_add, real_promote = sync.state.add_pending, sync.state.promote_pending

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def rename(src: Any, dst: Any) -> None:
        events.append("rename")
        real_rename(src, dst)

    def fsync_dir(path: Path) -> None:
        events.append("fsync_dir")
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            real_fsync(fd)
        finally:
            os.close(fd)

    def add(*a: Any) -> Any:
        events.append("pending")
        return real_add(*a)

    def promote(*a: Any) -> None:
        events.append("commit")
        real_promote(*a)

    monkeypatch.setattr(maildir_mod.os, "fsync", fsync)
    monkeypatch.setattr(maildir_mod.os, "rename", rename)
    monkeypatch.setattr(maildir_mod, "_fsync_dir", fsync_dir)
    monkeypatch.setattr(sync.state, "add_pending", add)
    monkeypatch.setattr(sync.state, "promote_pending", promote)
    clock = task.Clock()
    result = MailboxResult("acct", "INBOX")
    d = defer.Deferred.fromCoroutine(sync._receive(fake_fetch(sync, 1), result, flush_every=1, flush_soon=clock))
    assert len(sync.syncer.calls) == 1  # type: ignore[attr-defined]
    assert events == ["pending"] and sync.maildir.scan() == {}
    sync.syncer._release_once(None)  # type: ignore[attr-defined]
    assert sync.syncer.calls == []  # type: ignore[attr-defined]
    d.result  # noqa: B018 - raises if it failed
    assert events == ["pending", "fsync", "rename", "fsync_dir", "commit"]
    assert result.fetched == 1 and len(sync.maildir.scan()) == 1
    assert sync.state.count("acct", "INBOX") == 1 and sync.state.pending("acct", "INBOX") == {}


def test_new_mail_that_cannot_be_made_durable_costs_only_itself(
    sync: MailboxSync, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The push path's one-call delivery keeps the rule: a failed fsync drops
    that message (no file, no row, no tmp/ file) and fails the command; the
    others of its group are in place and recorded."""
    from twisted.internet import task

    _disk_full_at_fsync(2, monkeypatch)  # the second message's file
    recorded: set[int] = set()
    d = defer.Deferred.fromCoroutine(
        sync._receive(fake_fetch(sync, 3), MailboxResult("acct", "INBOX"), flush_every=1,
                      recorded=recorded, flush_soon=task.Clock())
    )
    sync.syncer.release()  # type: ignore[attr-defined]
    failure = d.result
    d.addErrback(lambda _: None)
    assert failure.value.errno == errno.ENOSPC
    assert recorded == {1, 3}
    assert sync.state.count("acct", "INBOX") == 2 and len(sync.maildir.scan()) == 2
    assert sync.state.pending("acct", "INBOX") == {}
    assert tmp_files(sync) == []


def test_a_burst_of_new_mail_commits_its_pending_rows_while_its_fsyncs_run(
    sync: MailboxSync, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15, 50 arrivals a second: one EXISTS brings a burst, whose bodies
    go to the syncer's threads in small chunks as they arrive. The pending
    rows are committed while those fsyncs run, not after them (the commit
    has an fsync of its own); still no file is renamed before every fsync of
    the group is done, and the rows are made real after the directory fsync."""
    from twisted.internet import task

    from mirrord.sync.fetching import NEW_MAIL_SYNC_CHUNK

    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename
    real_add, real_promote = sync.state.add_pending, sync.state.promote_pending
    monkeypatch.setattr(maildir_mod.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(maildir_mod.os, "rename", lambda a, b: (events.append("rename"), real_rename(a, b))[1])
    monkeypatch.setattr(maildir_mod, "_fsync_dir", lambda path: events.append("fsync_dir"))
    monkeypatch.setattr(sync.state, "add_pending", lambda *a: (events.append("pending"), real_add(*a))[1])
    monkeypatch.setattr(sync.state, "promote_pending", lambda *a: (events.append("commit"), real_promote(*a))[1])
    early = 2 * NEW_MAIL_SYNC_CHUNK
    count = early + 1  # two chunks go ahead; the last body is fsynced by the delivering call
    result = MailboxResult("acct", "INBOX")
    d = defer.Deferred.fromCoroutine(
        sync._receive(fake_fetch(sync, count), result, flush_every=1, flush_soon=task.Clock())
    )
    # The chunks' fsyncs are under way (held); the rows are committed already.
    assert len(sync.syncer.calls) == 2  # type: ignore[attr-defined]
    assert events == ["pending"]
    assert sync.state.pending("acct", "INBOX").keys() == set(range(1, count + 1))
    sync.syncer._release_once(None)  # type: ignore[attr-defined]
    assert events == ["pending"] + ["fsync"] * early
    assert sync.maildir.scan() == {}  # the rest of the group is not durable yet
    sync.syncer.release()  # type: ignore[attr-defined]
    d.result  # noqa: B018 - raises if it failed
    # Both new/ and cur/ got files (read and unread mail): two directory fsyncs.
    assert events == ["pending"] + ["fsync"] * count + ["rename"] * count + ["fsync_dir"] * 2 + ["commit"]
    assert result.fetched == count and len(sync.maildir.scan()) == count
    assert sync.state.count("acct", "INBOX") == count and sync.state.pending("acct", "INBOX") == {}


@pytest.mark.parametrize("nth", [2, 5], ids=["in-an-early-chunk", "in-the-delivering-call"])
def test_a_burst_of_new_mail_that_cannot_all_be_made_durable_keeps_the_rest(
    sync: MailboxSync, monkeypatch: pytest.MonkeyPatch, nth: int
) -> None:
    """A failed fsync in a burst drops that message (no file, no row, no
    tmp/ file) whether it failed in a chunk that ran beside the commit of
    the pending rows or in the call that delivers; the command fails with
    the disk's error, and every other message is in place and recorded."""
    from twisted.internet import task

    from mirrord.sync.fetching import NEW_MAIL_SYNC_CHUNK

    count = 2 * NEW_MAIL_SYNC_CHUNK + 1  # the 5th fsync belongs to the delivering call
    assert count == 5
    _disk_full_at_fsync(nth, monkeypatch)
    recorded: set[int] = set()
    d = defer.Deferred.fromCoroutine(
        sync._receive(fake_fetch(sync, count), MailboxResult("acct", "INBOX"), flush_every=1,
                      recorded=recorded, flush_soon=task.Clock())
    )
    sync.syncer.release()  # type: ignore[attr-defined]
    failure = d.result
    d.addErrback(lambda _: None)
    assert failure.value.errno == errno.ENOSPC
    assert recorded == set(range(1, count + 1)) - {nth}
    assert sync.state.count("acct", "INBOX") == count - 1 and len(sync.maildir.scan()) == count - 1
    assert sync.state.pending("acct", "INBOX") == {}
    assert tmp_files(sync) == []


def test_a_burst_whose_pending_rows_cannot_be_committed_leaves_no_file(
    sync: MailboxSync, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit fails (a full disk under the state DB) while the burst's
    fsyncs are still running: every body is discarded, nothing reaches new/
    or cur/, and the command fails with the commit's error."""
    import sqlite3

    from twisted.internet import task

    def no_space(*a: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(sync.state, "add_pending", no_space)
    d = defer.Deferred.fromCoroutine(
        sync._receive(fake_fetch(sync, 5), MailboxResult("acct", "INBOX"), flush_every=1,
                      flush_soon=task.Clock())
    )
    sync.syncer.release()  # type: ignore[attr-defined]
    failure = d.result
    d.addErrback(lambda _: None)
    assert isinstance(failure.value, sqlite3.OperationalError)
    assert sync.state.count("acct", "INBOX") == 0 and sync.state.pending("acct", "INBOX") == {}
    assert sync.maildir.scan() == {}
    assert tmp_files(sync) == []


def test_a_burst_whose_fsync_call_breaks_leaves_no_row_and_no_file(sync: MailboxSync) -> None:
    """Not a disk error of one file but the call itself failing (a bug, a
    thread gone): the pending rows committed beside it are dropped, no file
    is in place, and the command fails with that error."""
    from twisted.internet import task

    d = defer.Deferred.fromCoroutine(
        sync._receive(fake_fetch(sync, 5), MailboxResult("acct", "INBOX"), flush_every=1,
                      flush_soon=task.Clock())
    )
    sync.syncer._release_once(RuntimeError("the fsync thread broke"))  # type: ignore[attr-defined]
    sync.syncer.release()  # type: ignore[attr-defined]
    failure = d.result
    d.addErrback(lambda _: None)
    assert isinstance(failure.value, RuntimeError)
    assert sync.state.count("acct", "INBOX") == 0 and sync.state.pending("acct", "INBOX") == {}
    assert sync.maildir.scan() == {}
    assert tmp_files(sync) == []


# -- the tmp/ reserve -----------------------------------------------------------


def test_reserved_tmp_files_are_used_then_released(tmp_path: Path) -> None:
    md = Maildir(tmp_path / "m")
    md.reserve_tmp(3)
    assert md.reserved == 3
    reserved = set(os.listdir(md.path / "tmp"))
    assert md.clean_tmp() == 0  # files made ahead are live, not debris
    tmp = md.open_tmp()
    assert tmp.key in reserved and md.reserved == 2
    tmp.write(b"hello\r\n")
    key = md.deliver(tmp, frozenset())
    assert (md.path / "new" / key).read_bytes() == b"hello\n"
    assert oct(os.stat(md.path / "new" / key).st_mode & 0o777) == oct(maildir_mod.FILE_MODE)
    md.release_reserve()
    assert md.reserved == 0 and os.listdir(md.path / "tmp") == []


def test_reserved_files_are_bounded_across_maildirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maildir_mod, "MAX_RESERVED", 5)
    # The count is process-wide: files another test's Maildir still holds
    # (until the garbage collector closes them) must not count here.
    monkeypatch.setattr(maildir_mod, "_reserved_count", 0)
    a, b = Maildir(tmp_path / "a"), Maildir(tmp_path / "b")
    a.reserve_tmp(4)
    b.reserve_tmp(4)
    assert (a.reserved, b.reserved) == (4, 1)
    a.open_tmp().abort()
    b.reserve_tmp(4)
    assert b.reserved == 2
    a.release_reserve()
    b.release_reserve()
    assert maildir_mod._reserved_count == 0
    assert os.listdir(a.path / "tmp") == os.listdir(b.path / "tmp") == []


def test_sync_waits_for_a_concurrent_abort_and_never_reuses_a_closed_descriptor(tmp_path: Path) -> None:
    md = Maildir(tmp_path / "m")
    tmp = md.open_tmp()
    tmp.write(b"x")
    tmp.close_write()
    tmp.abort()
    with pytest.raises(ValueError):
        tmp.sync()


def test_a_second_fsync_after_a_failed_one_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md = Maildir(tmp_path / "m")
    tmp = md.open_tmp()
    tmp.write(b"x")
    tmp.close_write()

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(maildir_mod.os, "fsync", eio)
    with pytest.raises(OSError):
        tmp.sync()
    monkeypatch.undo()
    with pytest.raises(ValueError):
        tmp.sync()  # the data may be lost: a later fsync's success would lie
    with pytest.raises(ValueError):
        md.deliver(tmp, frozenset())
    assert md.scan() == {} and os.listdir(md.path / "tmp") == []


# -- the Syncer -------------------------------------------------------------------


class QueueReactor:
    """Enough of a reactor for the Syncer: results are queued, then run by the test."""

    def __init__(self) -> None:
        self.queue: list[tuple[Any, tuple[Any, ...]]] = []
        self.triggers: list[Any] = []

    def callFromThread(self, f: Any, *args: Any) -> None:  # noqa: N802 - Twisted's name
        self.queue.append((f, args))

    def addSystemEventTrigger(self, *args: Any) -> None:  # noqa: N802
        self.triggers.append(args)

    def run_queued(self) -> None:
        queue, self.queue = self.queue, []
        for f, args in queue:
            f(*args)


def test_syncer_runs_in_threads_and_in_place_beyond_its_limit() -> None:
    import threading

    reactor = QueueReactor()
    syncer = _fs.Syncer(reactor, threads=2, max_pending=2)
    gate = threading.Event()
    started = threading.Semaphore(0)
    where: list[str] = []

    def slow() -> str:
        started.release()
        gate.wait(5)
        where.append(threading.current_thread().name)
        return "done"

    first, second = syncer.run(slow), syncer.run(slow)
    assert syncer.pending == 2 and not first.called
    third = syncer.run(lambda: threading.current_thread().name)  # over the limit: here, now
    assert third.called and third.result == threading.current_thread().name
    assert started.acquire(timeout=5) and started.acquire(timeout=5)
    gate.set()
    syncer.join()  # joins the threads: both calls (already running) have finished
    reactor.run_queued()
    assert first.result == second.result == "done"
    assert syncer.pending == 0
    assert all(name != threading.current_thread().name for name in where)
    assert reactor.triggers  # stops its threads at shutdown


def test_syncer_runs_calls_marked_first_ahead_of_those_queued() -> None:
    """tmp/ files made ahead must not wait behind a queue of fsyncs (``run(first=True)``)."""
    import threading

    reactor = QueueReactor()
    syncer = _fs.Syncer(reactor, threads=1, max_pending=10)
    gate = threading.Event()
    started = threading.Semaphore(0)
    order: list[str] = []

    def blocking() -> None:
        started.release()
        gate.wait(5)

    syncer.run(blocking)
    assert started.acquire(timeout=5)  # the only thread is busy
    queued = [syncer.run(lambda n=n: order.append(f"fsync {n}")) for n in (1, 2)]
    ahead = syncer.run(lambda: order.append("reserve"), first=True)
    done = threading.Event()
    syncer.run(done.set)
    gate.set()
    assert done.wait(5)
    syncer.join()
    reactor.run_queued()
    assert order == ["reserve", "fsync 1", "fsync 2"]
    assert ahead.called and all(d.called for d in queued)
    assert syncer.pending == 0


def test_syncer_wakes_the_reactor_once_for_results_that_finish_together() -> None:
    import threading

    reactor = QueueReactor()
    syncer = _fs.Syncer(reactor, threads=3, max_pending=10)
    gate = threading.Event()
    started = threading.Semaphore(0)

    def slow(value: int) -> int:
        started.release()
        gate.wait(5)
        if value == 2:
            raise OSError(errno.EIO, "Input/output error")
        return value

    ds = [syncer.run(lambda v=v: slow(v)) for v in (1, 2, 3)]
    for _ in ds:
        assert started.acquire(timeout=5)
    gate.set()
    syncer.join()
    # Three results, one wake-up: the reactor collects them all at once.
    assert len(reactor.queue) == 1
    reactor.run_queued()
    assert ds[0].result == 1 and ds[2].result == 3
    assert ds[1].result.check(OSError)
    ds[1].addErrback(lambda _: None)
    assert syncer.pending == 0


def test_a_failed_delivery_in_a_thread_leaves_no_row_and_no_file(sync: MailboxSync) -> None:
    result = MailboxResult("acct", "INBOX")
    d = defer.Deferred.fromCoroutine(sync._receive(fake_fetch(sync, 4), result, flush_every=2))
    held: HeldSyncer = sync.syncer  # type: ignore[assignment]
    held._release_once(None)  # the fsyncs succeed...
    assert len(held.calls) == 2  # ...and the two groups' deliveries wait, their rows pending
    assert set(sync.state.pending("acct", "INBOX")) == {1, 2, 3, 4}
    held.release(OSError(errno.EIO, "Input/output error"))
    failure = d.result
    d.addErrback(lambda _: None)
    assert failure.value.errno == errno.EIO
    assert sync.state.pending("acct", "INBOX") == {} and sync.state.count("acct", "INBOX") == 0
    assert sync.maildir.scan() == {} and tmp_files(sync) == []


def test_abort_unfinished_removes_what_threads_left_behind(tmp_path: Path) -> None:
    md = Maildir(tmp_path / "m")
    md.reserve_tmp(3)  # two are taken below, one stays reserved
    written = md.open_tmp()
    written.write(b"complete, waiting for its fsync")
    written.close_write()
    done = md.open_tmp()
    md.deliver(done, frozenset())
    assert maildir_mod.abort_unfinished() >= 2
    assert os.listdir(md.path / "tmp") == [] and md.reserved == 0
    assert len(md.scan()) == 1  # delivered files are not touched


def test_pool_close_waits_for_running_jobs() -> None:
    from mirrord.pool import WorkerPool

    settings = type("S", (), {"name": "acct"})()
    pool = WorkerPool(None, settings, "pw", 2)  # type: ignore[arg-type]
    gate: defer.Deferred[None] = defer.Deferred()

    async def job(worker: Any) -> str:
        await gate
        return "recorded"

    running = defer.Deferred.fromCoroutine(pool.run(job))
    closed = defer.Deferred.fromCoroutine(pool.close())
    assert not closed.called  # the job's last writes come first
    gate.callback(None)
    assert running.result == "recorded"
    assert closed.called
