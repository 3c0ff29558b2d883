"""The per-mailbox operation queue: events in any order and at any moment, one operation at a time."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task

from mirrord.flags import Flags
from mirrord.sync.live import CHANGE_WINDOW, RETRY_DELAY, LiveMailbox
from mirrord.sync.mailbox import MailboxResult


class FakeSync:
    """Records operations; full syncs and fetches wait until the test releases them."""

    label = "acct/INBOX"

    def __init__(self) -> None:
        self.ops: list[tuple[Any, ...]] = []
        self.pending: list[defer.Deferred[MailboxResult]] = []
        self.running = 0
        self.max_running = 0

    async def _op(self, name: str) -> MailboxResult:
        self.ops.append((name,))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        d: defer.Deferred[MailboxResult] = defer.Deferred()
        self.pending.append(d)
        try:
            return await d
        finally:
            self.running -= 1

    async def run(self) -> MailboxResult:
        return await self._op("full")

    async def fetch_new(self) -> MailboxResult:
        return await self._op("new")

    def apply_changes(self, expunged: list[int], flags: dict[int, Flags]) -> MailboxResult:
        self.ops.append(("changes", tuple(expunged), dict(flags)))
        return MailboxResult("acct", "INBOX", removed=len(expunged), flags_changed=len(flags))

    def release(self, result: MailboxResult | None = None) -> None:
        self.pending.pop(0).callback(result or MailboxResult("acct", "INBOX"))


def make() -> tuple[LiveMailbox, FakeSync, task.Clock]:
    sync = FakeSync()
    clock = task.Clock()
    return LiveMailbox(sync, clock), sync, clock  # type: ignore[arg-type]


def test_catch_up_first_then_events_in_one_operation_at_a_time() -> None:
    live, sync, _ = make()
    live.watching()
    live.new_messages()
    live.flags_changed({5: frozenset({"\\Seen"})})
    live.expunged([3])
    assert sync.ops == [("full",)]
    sync.release()
    assert live.first_sync.called
    # Local changes go first; mail announced during the full sync may have
    # come after its listing, so a fetch follows.
    assert sync.ops[1] == ("changes", (3,), {5: frozenset({"\\Seen"})})
    assert sync.ops[2:] == [("new",)]
    sync.release()
    assert not live.busy
    assert sync.max_running == 1


def test_new_mail_before_a_full_sync_starts_is_covered_by_it() -> None:
    live, sync, _ = make()
    live.new_messages()  # a fetch starts
    live.resync_needed("lost track")
    live.new_messages()  # queued behind the fetch, and the full sync covers it
    sync.release()
    assert sync.ops == [("new",), ("full",)]
    sync.release()
    assert not live.busy


def test_events_during_a_fetch_wait_for_it() -> None:
    live, sync, _ = make()
    live.new_messages()
    assert sync.ops == [("new",)]
    live.new_messages()
    live.new_messages()
    live.flags_changed({9: frozenset()})
    assert sync.ops == [("new",)]
    sync.release()
    assert sync.ops[1:] == [("changes", (), {9: frozenset()}), ("new",)]
    sync.release()
    assert not live.busy
    assert sync.max_running == 1


def test_synchronous_operations_do_not_wedge_the_queue() -> None:
    """Local changes finish without I/O; the queue must still take the next event."""
    live, sync, clock = make()
    live.flags_changed({1: frozenset()})
    clock.advance(CHANGE_WINDOW)
    live.expunged([2])
    clock.advance(CHANGE_WINDOW)
    live.flags_changed({3: frozenset()})
    clock.advance(CHANGE_WINDOW)
    assert [op[0] for op in sync.ops] == ["changes", "changes", "changes"]
    live.new_messages()
    assert sync.ops[-1] == ("new",)


def test_a_burst_of_flag_changes_and_expunges_is_applied_as_one_batch() -> None:
    """Issue #11 item 15: ten events in a moment, one apply_changes and so one log line."""
    live, sync, clock = make()
    for uid in range(1, 11):
        live.flags_changed({uid: frozenset({"\\Seen"})})
        clock.advance(CHANGE_WINDOW / 20)
    for uid in range(20, 30):
        live.expunged([uid])
    assert sync.ops == [], "the window is still open"
    clock.advance(CHANGE_WINDOW)
    assert sync.ops == [("changes", tuple(range(20, 30)), {uid: frozenset({"\\Seen"}) for uid in range(1, 11)})]
    clock.advance(CHANGE_WINDOW * 10)
    assert len(sync.ops) == 1
    assert not live.busy


def test_another_operation_takes_gathered_changes_along() -> None:
    """Changes are never held back behind new mail: the fetch's queue applies them first."""
    live, sync, clock = make()
    live.flags_changed({1: frozenset()})
    live.new_messages()
    assert sync.ops == [("changes", (), {1: frozenset()}), ("new",)]
    sync.release()
    clock.advance(CHANGE_WINDOW)
    assert len(sync.ops) == 2


def test_expunge_cancels_a_pending_flag_change_of_the_same_uid() -> None:
    live, sync, _ = make()
    live.new_messages()
    live.flags_changed({4: frozenset({"\\Seen"})})
    live.expunged([4])
    sync.release()
    assert sync.ops[1] == ("changes", (4,), {})


def test_failure_retries_with_a_full_sync() -> None:
    live, sync, clock = make()
    live.new_messages()
    sync.pending.pop(0).errback(RuntimeError("connection lost"))
    assert live.last_error == "connection lost"
    assert not live.busy
    live.new_messages()  # waits for the retry
    assert sync.ops == [("new",)]
    clock.advance(RETRY_DELAY * 2)
    assert sync.ops[-1] == ("full",)


def test_failed_full_sync_is_retried_unless_it_needs_the_user() -> None:
    live, sync, clock = make()
    live.watching()
    sync.release(MailboxResult("acct", "INBOX", error="server went away"))
    clock.advance(RETRY_DELAY * 2)
    assert sync.ops == [("full",), ("full",)]
    sync.release(MailboxResult("acct", "INBOX", error="UIDVALIDITY changed", needs_user=True))
    clock.advance(RETRY_DELAY * 10)
    assert sync.ops == [("full",), ("full",)]


def test_stop_waits_for_the_operation_in_hand_and_takes_no_more() -> None:
    live, sync, _ = make()
    live.new_messages()
    stopped = live.stop()
    live.new_messages()
    assert not stopped.called
    sync.release()
    assert stopped.called
    assert sync.ops == [("new",)]


def test_a_disconnected_watcher_still_counts_as_a_first_sync() -> None:
    live, _, _ = make()
    live.disconnected("connection refused")
    assert live.first_sync.called
    assert live.last_error == "connection refused"


def test_the_first_sync_is_not_reported_as_new_mail() -> None:
    sync = FakeSync()
    reported: list[MailboxResult] = []
    live = LiveMailbox(sync, task.Clock(), on_new_mail=reported.append)  # type: ignore[arg-type]
    live.watching()
    sync.release(MailboxResult("acct", "INBOX", fetched=5000))
    assert reported == []
    live.new_messages()
    sync.release(MailboxResult("acct", "INBOX", fetched=1))
    assert [r.fetched for r in reported] == [1]
