"""The local change watcher: debounce, own changes, lost events, on the real inotify too."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task
from twisted.python.filepath import FilePath

from mirrord.localwatch import (
    IN_CREATE,
    IN_DELETE_SELF,
    IN_ISDIR,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    LocalChangeWatcher,
)


class FakeNotifier:
    def __init__(self) -> None:
        self.watched: dict[bytes, Any] = {}
        self.closed = False

    def watch(self, path: FilePath[Any], mask: int = 0, autoAdd: bool = False, callbacks: Any = None,
              recursive: bool = False) -> int:
        self.watched[path.path] = callbacks
        return len(self.watched)

    def ignore(self, path: FilePath[Any]) -> None:
        del self.watched[path.path]

    def loseConnection(self) -> None:
        self.closed = True

    def fire(self, directory: Path, name: str | None, mask: int) -> None:
        target = directory if name is None else directory / name
        for callback in self.watched[os.fsencode(directory)]:
            callback(None, FilePath(os.fsencode(target)), mask)


def _maildir(root: Path, name: str) -> Path:
    path = root / name
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True)
    return path


@pytest.fixture
def setup(tmp_path: Path) -> tuple[task.Clock, FakeNotifier, LocalChangeWatcher, list[str], Path]:
    clock = task.Clock()
    notifier = FakeNotifier()
    seen: list[str] = []
    watcher = LocalChangeWatcher(clock, seen.append, notifier, debounce=0.2, max_wait=1.0)
    inbox = _maildir(tmp_path, "INBOX")
    watcher.watch("INBOX", inbox)
    return clock, notifier, watcher, seen, inbox


def test_a_burst_is_one_look_after_the_quiet(setup: Any) -> None:
    clock, notifier, _, seen, inbox = setup
    for i in range(5):
        notifier.fire(inbox / "cur", f"m{i}:2,S", IN_MOVED_TO)
        clock.advance(0.1)
    assert seen == []
    clock.advance(0.2)
    assert seen == ["INBOX"]
    clock.advance(10)
    assert seen == ["INBOX"]


def test_a_steady_stream_is_looked_at_within_max_wait(tmp_path: Path) -> None:
    clock = task.Clock()
    notifier = FakeNotifier()
    looked_at: list[float] = []
    watcher = LocalChangeWatcher(clock, lambda _: looked_at.append(clock.seconds()), notifier,
                                 debounce=0.2, max_wait=1.0)
    inbox = _maildir(tmp_path, "INBOX")
    watcher.watch("INBOX", inbox)
    for i in range(24):  # every 1/8 s for 3 s: never 0.2 s of quiet
        notifier.fire(inbox / "cur", f"m{i}", IN_MOVED_TO)
        clock.advance(0.125)
    assert looked_at[0] == 1.0
    assert len(looked_at) == 3  # one look per second of the stream


def test_our_own_changes_ask_for_no_look(setup: Any) -> None:
    clock, notifier, watcher, seen, inbox = setup
    watcher.ours("INBOX", ["k1:2,", "k1:2,S"])
    notifier.fire(inbox / "new", "k1:2,", IN_MOVED_FROM)
    notifier.fire(inbox / "cur", "k1:2,S", IN_MOVED_TO)
    clock.advance(5)
    assert seen == []
    # Consumed: the same name changed again by a reader is the reader's.
    notifier.fire(inbox / "cur", "k1:2,S", IN_MOVED_FROM)
    clock.advance(5)
    assert seen == ["INBOX"]


def test_a_delivery_announced_by_key_asks_for_no_look(setup: Any) -> None:
    clock, notifier, watcher, seen, inbox = setup
    watcher.delivering("INBOX", ["k5", "k6"])
    notifier.fire(inbox / "new", "k5", IN_MOVED_TO)
    notifier.fire(inbox / "cur", "k6:2,S", IN_MOVED_TO)  # where it lands is the Maildir's business
    clock.advance(5)
    assert seen == []
    # One event per delivery: the reader's rename of the file that follows is the reader's.
    notifier.fire(inbox / "new", "k5", IN_MOVED_FROM)
    clock.advance(5)
    assert seen == ["INBOX"]
    # Another mailbox's delivery of the same key is not this one's.
    watcher.delivering("Archive", ["k7"])
    notifier.fire(inbox / "new", "k7", IN_MOVED_TO)
    clock.advance(5)
    assert seen == ["INBOX", "INBOX"]


@pytest.mark.parametrize(("announce", "event"), [("ours", IN_CREATE), ("delivering", IN_MOVED_TO)])
def test_an_announcement_nobody_used_expires(setup: Any, announce: str, event: int) -> None:
    """Names (``ours``) and delivery keys (``delivering``) alike: a stale one hides no reader's change."""
    clock, notifier, watcher, seen, inbox = setup
    getattr(watcher, announce)("INBOX", ["k2"])
    clock.advance(60)
    notifier.fire(inbox / "new", "k2", event)
    clock.advance(1)
    assert seen == ["INBOX"]


def test_lost_events_and_vanished_directories_ask_for_a_look(setup: Any, tmp_path: Path) -> None:
    clock, notifier, watcher, seen, inbox = setup
    other = _maildir(tmp_path, "Archive")
    watcher.watch("Archive", other)
    callback = notifier.watched[os.fsencode(inbox / "cur")][0]
    callback(None, FilePath(b"/"), IN_Q_OVERFLOW)
    clock.advance(1)
    assert sorted(seen) == ["Archive", "INBOX"]
    seen.clear()
    notifier.fire(other / "cur", None, IN_DELETE_SELF)
    clock.advance(1)
    assert seen == ["Archive"]


def test_directories_and_unwatched_mailboxes_are_ignored(setup: Any) -> None:
    clock, notifier, watcher, seen, inbox = setup
    notifier.fire(inbox / "cur", "subdir", IN_CREATE | IN_ISDIR)
    clock.advance(1)
    assert seen == []
    notifier.fire(inbox / "cur", "x", IN_CREATE)
    watcher.unwatch("INBOX")
    clock.advance(1)
    assert seen == [] and not notifier.watched
    watcher.stop()
    assert notifier.closed


def test_the_real_inotify_sees_a_readers_rename_and_unlink(tmp_path: Path) -> None:
    inotify = pytest.importorskip("twisted.internet.inotify")
    notifier = inotify.INotify()
    clock = task.Clock()
    seen: list[str] = []
    watcher = LocalChangeWatcher(clock, seen.append, notifier)
    try:
        inbox = _maildir(tmp_path, "INBOX")
        (inbox / "new" / "m1").write_bytes(b"Subject: x\n\nbody\n")
        watcher.watch("INBOX", inbox)
        os.rename(inbox / "new" / "m1", inbox / "cur" / "m1:2,S")  # neomutt marks it read
        notifier.doRead()
        clock.advance(1)
        assert seen == ["INBOX"]
        watcher.ours("INBOX", ["m1:2,S", "m1:2,FS"])
        os.rename(inbox / "cur" / "m1:2,S", inbox / "cur" / "m1:2,FS")  # mirrord's own rename
        notifier.doRead()
        clock.advance(1)
        assert seen == ["INBOX"]
        os.unlink(inbox / "cur" / "m1:2,FS")  # the reader deletes it
        notifier.doRead()
        clock.advance(1)
        assert seen == ["INBOX", "INBOX"]
    finally:
        watcher.stop()


def test_new_folders_are_noticed_under_the_root_and_in_folders_made_later(tmp_path: Path) -> None:
    from mirrord.localwatch import IN_CREATE, IN_ISDIR, NewFolderWatcher

    root = tmp_path / "Mail"
    (root / "INBOX" / "cur").mkdir(parents=True)
    notifier = FakeNotifier()
    clock = task.Clock()
    seen: list[float] = []
    watcher = NewFolderWatcher(clock, lambda: seen.append(clock.seconds()), notifier, delay=1.0)
    watcher.watch_tree(root)
    assert os.fsencode(root) in notifier.watched and os.fsencode(root / "INBOX") in notifier.watched
    assert os.fsencode(root / "INBOX" / "cur") not in notifier.watched, "message files cause no events here"
    notifier.fire(root, "INBOX:2,S", IN_CREATE)  # a file, not a folder
    clock.advance(5)
    assert seen == []
    (root / "Projects").mkdir()
    notifier.fire(root, "Projects", IN_CREATE | IN_ISDIR)
    assert os.fsencode(root / "Projects") in notifier.watched, "watched as soon as it appears"
    clock.advance(0.5)
    (root / "Projects" / "2026").mkdir()
    notifier.fire(root / "Projects", "2026", IN_CREATE | IN_ISDIR)
    clock.advance(0.9)
    assert seen == [], "a burst of mkdirs is one look"
    clock.advance(0.2)
    assert len(seen) == 1
    watcher.stop()
    assert notifier.closed


def test_a_move_across_folders_is_told_for_both_in_one_turn(setup: Any, tmp_path: Path) -> None:
    """Gone from INBOX, new in Archive a moment later: both are named when the one timer fires."""
    clock, notifier, watcher, seen, inbox = setup
    archive = _maildir(tmp_path, "Archive")
    watcher.watch("Archive", archive)
    notifier.fire(inbox / "cur", "m1:2,S", IN_MOVED_FROM)
    clock.advance(0.05)
    notifier.fire(archive / "cur", "m1:2,S", IN_MOVED_TO)
    clock.advance(0.19)
    assert seen == []
    clock.advance(0.02)
    assert sorted(seen) == ["Archive", "INBOX"]
