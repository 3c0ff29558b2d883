"""The Maildir stamp's margin: one kernel clock tick (and a millisecond) where the tick is known.

The margin only has to outlast the coarse clock the kernel stamps file
changes with; waiting 20 ms after every sync that fetched something cost a
100-new catch-up a fifth of its time (issue #15).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from twisted.internet import defer, task

from mirrord.sync import stamp
from mirrord.sync.stamp import (
    FINE_MARGIN_NS,
    STAMP_MARGIN_NS,
    maildir_stamp,
    settled_stamp,
)

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the coarse clock is Linux's")


def maildir(root: Path) -> Path:
    for sub in ("new", "cur", "tmp"):
        (root / sub).mkdir(parents=True)
    return root


@linux
def test_the_margin_is_one_tick_of_the_coarse_clock_and_a_millisecond() -> None:
    tick = time.clock_getres(5)
    assert FINE_MARGIN_NS == min(STAMP_MARGIN_NS, int(tick * 1e9) + 1_000_000)
    assert FINE_MARGIN_NS <= STAMP_MARGIN_NS


@linux
def test_after_the_margin_a_change_gets_another_mtime(tmp_path: Path) -> None:
    """What the margin stands for, on this kernel: once a stamp is that old, the coarse clock is past it."""
    folder = maildir(tmp_path / "box")
    for i in range(10):
        (folder / "new" / f"m{i}").write_bytes(b"x")
        changed = os.stat(folder / "new").st_mtime_ns
        while not stamp._past((changed, changed)):  # a few ms
            pass
        assert time.clock_gettime_ns(5) > changed or time.time_ns() - changed >= STAMP_MARGIN_NS
        (folder / "new" / f"m{i}").unlink()
        assert os.stat(folder / "new").st_mtime_ns != changed


def test_a_fresh_stamp_is_waited_out_for_the_fine_margin_only(tmp_path: Path) -> None:
    folder = maildir(tmp_path / "box")
    (folder / "new" / "m1").write_bytes(b"x")
    clock = task.Clock()
    d = defer.Deferred.fromCoroutine(settled_stamp(folder, list, clock, None, time.time_ns()))
    [wait] = clock.getDelayedCalls()
    assert 0 < wait.getTime() <= FINE_MARGIN_NS / 1e9
    d.cancel()
    d.addErrback(lambda f: f.trap(defer.CancelledError))


def test_whole_second_times_still_ask_for_two_seconds() -> None:
    now = time.time_ns() // 1_000_000_000 * 1_000_000_000
    assert stamp._margin((now, now)) == 2_000_000_000
    assert not stamp._past((now - 1_000_000_000, now - 1_000_000_000))
    assert stamp._past((now - 3_000_000_000, now - 3_000_000_000))


@linux
def test_a_stamp_is_not_past_while_the_coarse_clock_has_not_passed_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = time.time_ns() - FINE_MARGIN_NS - 1_000_000 + 1  # old enough by our clock, not by the margin
    real = time.clock_gettime_ns
    monkeypatch.setattr(stamp.time, "clock_gettime_ns", lambda clock: fresh if clock == 5 else real(clock))
    assert not stamp._past((fresh, fresh))
    monkeypatch.setattr(stamp.time, "clock_gettime_ns", lambda clock: fresh + 1 if clock == 5 else real(clock))
    assert stamp._past((fresh, fresh))


def test_a_stamp_older_than_the_margin_is_taken_without_waiting(tmp_path: Path) -> None:
    folder = maildir(tmp_path / "box")
    old = time.time_ns() - 10 * STAMP_MARGIN_NS
    for sub in ("new", "cur"):
        os.utime(folder / sub, ns=(old, old))
    current = maildir_stamp(folder)
    clock = task.Clock()
    d = defer.Deferred.fromCoroutine(settled_stamp(folder, list, clock, current, time.time_ns()))
    assert clock.getDelayedCalls() == []
    assert d.result == (current, False)
