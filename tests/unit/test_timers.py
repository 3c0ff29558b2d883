"""Timers that share wakeups: the grid arithmetic and the loop built on it (task.Clock, no sleeps)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, task

from mirrord.timers import CoalescedLoop, coalesced_delay


@given(now=st.floats(0, 2e9), delay=st.floats(10, 29 * 60))
def test_a_coalesced_delay_is_never_late_and_early_by_less_than_the_slack(now: float, delay: float) -> None:
    slack = min(60.0, delay / 4)
    got = coalesced_delay(now, delay)
    assert delay - slack - 1e-6 <= got <= delay + 1e-6
    # It ends on the grid, so every timer due in the same window ends at the same instant.
    assert abs((now + got) / slack - round((now + got) / slack)) < 1e-6


def test_timers_due_in_the_same_window_end_at_the_same_instant() -> None:
    ends = {round(now + coalesced_delay(now, 300.0), 9) for now in (1000.5, 1010.0, 1019.9)}
    assert ends == {1260.0}


def test_zero_slack_means_exact() -> None:
    assert coalesced_delay(12.3, 5.0, slack=0) == 5.0


def test_loop_runs_about_every_interval_and_stops() -> None:
    clock = task.Clock()
    clock.advance(7)
    runs: list[float] = []
    loop = CoalescedLoop(clock, 300.0, lambda: runs.append(clock.seconds()))
    loop.start(now=True)
    clock.pump([1.0] * 1300)
    assert runs[0] == 7
    assert runs[1:] == [300.0, 600.0, 900.0, 1200.0], "on the grid, each at most one interval after the last"
    loop.stop()
    assert not loop.running and clock.getDelayedCalls() == []
    clock.advance(3600)
    assert len(runs) == 5


def test_loop_waits_for_an_async_run_and_survives_a_failure() -> None:
    clock = task.Clock()
    runs: list[defer.Deferred[None]] = []

    def f() -> defer.Deferred[None]:
        runs.append(defer.Deferred())
        return runs[-1]

    loop = CoalescedLoop(clock, 100.0, f, label="chore")
    loop.start()
    clock.advance(100)
    assert len(runs) == 1
    clock.advance(500)
    assert len(runs) == 1, "no second run while the first is in hand"
    runs[0].errback(RuntimeError("server away"))
    assert clock.getDelayedCalls(), "a failure is logged and the loop goes on"
    clock.advance(100)
    assert len(runs) == 2
    loop.stop()
    runs[1].callback(None)
    assert clock.getDelayedCalls() == [], "stopped: the finished run schedules nothing"


def test_loop_survives_a_synchronous_exception() -> None:
    clock = task.Clock()
    calls: list[int] = []

    def f() -> None:
        calls.append(1)
        raise ValueError("boom")

    loop = CoalescedLoop(clock, 100.0, f)
    loop.start()
    clock.advance(100)
    clock.advance(100)
    assert len(calls) == 2
    loop.stop()


def test_relisting_rides_the_renewals_wakeup() -> None:
    """With the defaults, re-listing and IDLE renewals come due on the same instant."""
    from dataclasses import replace
    from pathlib import Path

    from mirrord.config import Account
    from mirrord.daemon import relist_interval

    account = Account("a", "h", 993, "implicit", None, "u", None, Path("/m"))  # type: ignore[arg-type]
    assert relist_interval(account) == account.idle_renew == 1200
    assert relist_interval(replace(account, poll_interval=3600)) == 3600, "never more often than asked"
    for start in (5000.0, 5020.5, 5039.0):  # started a few seconds apart, as at start-up
        renew_at = start + coalesced_delay(start, account.idle_renew)
        relist_at = start + coalesced_delay(start, relist_interval(account))
        assert renew_at == relist_at == 6180.0
