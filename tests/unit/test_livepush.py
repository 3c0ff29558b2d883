"""LocalPush: rounds one at a time, over every folder touched so far, never beside a fetch of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from mirrord.sync.livepush import LocalPush
from mirrord.sync.pushing import PushFolder, PushResult


@dataclass
class FakeAccount:
    name: str = "acct"


@dataclass
class FakePusher:
    folders: dict[str, PushFolder]
    account: FakeAccount = field(default_factory=FakeAccount)
    calls: list[list[str]] = field(default_factory=list)
    pending: list[defer.Deferred[PushResult]] = field(default_factory=list)

    def round(self, names: list[str]) -> defer.Deferred[PushResult]:
        self.calls.append(list(names))
        d: defer.Deferred[PushResult] = defer.Deferred()
        self.pending.append(d)
        return d


@dataclass
class FakeLive:
    lock: defer.DeferredLock = field(default_factory=defer.DeferredLock)
    resyncs: list[str] = field(default_factory=list)

    def resync_needed(self, reason: str) -> None:
        self.resyncs.append(reason)


def make(tmp_path: Path, names: tuple[str, ...] = ("A", "B")) -> tuple[LocalPush, FakePusher, dict[str, Any], task.Clock]:
    folders = {n: PushFolder(n, n.encode(), tmp_path / n) for n in names}
    pusher = FakePusher(folders)
    lives = {n: FakeLive() for n in names}
    clock = task.Clock()
    push = LocalPush(pusher, clock, lambda: lives, None)  # type: ignore[arg-type]
    return push, pusher, lives, clock


def test_changes_during_a_round_are_gathered_into_the_next_one(tmp_path: Path) -> None:
    push, pusher, _, _ = make(tmp_path, ("A", "B", "C"))
    push.changed("A")
    assert pusher.calls == [["A"]]
    push.changed("C")
    push.changed("B")
    push.changed("C")
    assert pusher.calls == [["A"]], "one round at a time"
    pusher.pending[0].callback(PushResult("acct"))
    assert pusher.calls == [["A"], ["B", "C"]], "both halves of a move in one round"
    pusher.pending[1].callback(PushResult("acct"))
    assert len(pusher.calls) == 2


def test_a_round_waits_for_an_operation_on_its_folders(tmp_path: Path) -> None:
    push, pusher, lives, _ = make(tmp_path)
    fetch = lives["B"].lock.acquire()  # a fetch of B in progress
    assert fetch.called
    push.changed("A")
    push.changed("B")
    assert pusher.calls == [["A"]]
    pusher.pending[0].callback(PushResult("acct"))
    # The next round covers B: it must wait until B's fetch is done.
    assert pusher.calls == [["A"]]
    lives["B"].lock.release()
    assert pusher.calls == [["A"], ["B"]]
    assert lives["B"].lock.locked, "held for the round"
    pusher.pending[1].callback(PushResult("acct"))
    assert not lives["B"].lock.locked and not lives["A"].lock.locked


def test_a_failed_round_is_retried_with_backoff_and_keeps_its_folders(tmp_path: Path) -> None:
    push, pusher, lives, clock = make(tmp_path)
    push.changed("A")
    pusher.pending[0].errback(ConnectionError("cut"))
    assert push.last_error == "cut"
    assert not lives["A"].lock.locked
    push.changed("B")  # waits for the retry: no hammering a server that just failed
    assert pusher.calls == [["A"]]
    clock.advance(400)
    assert pusher.calls == [["A"], ["A", "B"]]
    pusher.pending[1].callback(PushResult("acct"))
    assert push.last_error is None


def test_refused_folders_are_remembered_until_a_round_sends_them(tmp_path: Path) -> None:
    push, pusher, lives, _ = make(tmp_path)
    push.changed("A")
    pusher.pending[0].callback(PushResult("acct", refused={"A": "7 of its 8 messages vanished"}, refetch={"A"}))
    assert push.refused == {"A": "7 of its 8 messages vanished"}
    assert lives["A"].resyncs, "what the round gave back to the server is fetched again"
    push.changed("A")
    pusher.pending[1].callback(PushResult("acct"))
    assert push.refused == {}


def test_stop_waits_for_the_round_in_hand(tmp_path: Path) -> None:
    push, pusher, _, _ = make(tmp_path)
    push.changed("A")
    stopped = push.stop()
    assert not stopped.called
    push.changed("B")
    pusher.pending[0].callback(PushResult("acct"))
    assert stopped.called and pusher.calls == [["A"]]
