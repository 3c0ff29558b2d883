"""Periodic timers that share wakeups, so an idle daemon wakes as rarely as it can.

Every timer is a wakeup of the whole process: the CPU leaves its sleep
state, the reactor runs, then sleeps again. A daemon with a renewal per
watched mailbox and a few periodic chores would wake at many slightly
different moments for work that could as well be done together. The
timers here end on a grid of the clock instead (like the kernel's timer
slack), so whatever is due in the same window runs in one wakeup.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

log = logging.getLogger("mirrord.timers")

MAX_SLACK = 60.0
"""How much earlier than asked a periodic timer may fire so that it shares a wakeup with others."""


def coalesced_delay(now: float, delay: float, slack: float | None = None) -> float:
    """A delay of at most ``delay`` (and more than ``delay - slack``) ending on a shared instant.

    Twenty watchers that entered IDLE within the same few seconds would
    otherwise renew at twenty slightly different moments, each a wakeup of
    its own. Rounding every deadline down to a multiple of ``slack`` on the
    clock makes timers due within the same ``slack``-long window fire
    together, in one wakeup; and renewals that fire together stay together
    (each new deadline lands on the grid again). Firing early is safe for
    what uses it: IDLE is renewed a little sooner, never later, than
    ``idle_renew``. ``slack`` defaults to a quarter of ``delay``, at most
    :data:`MAX_SLACK`.
    """
    if slack is None:
        slack = min(MAX_SLACK, delay / 4)
    if slack <= 0:
        return delay
    at = math.floor((now + delay) / slack) * slack
    return max(at - now, 0.0)


class CoalescedLoop:
    """Calls ``f`` about every ``interval`` seconds, on the shared grid; a LoopingCall that shares wakeups.

    Each run is at most ``interval`` after the previous one ended (and more
    than ``interval`` minus the slack). ``f`` may return an awaitable; the
    next run is scheduled when it is done, so runs never overlap. An
    exception is logged and the loop goes on: a chore that failed once
    (listing mailboxes while the server restarts) should be tried again.
    """

    def __init__(self, clock: IReactorTime, interval: float, f: Callable[[], Awaitable[Any] | None], *,
                 label: str = "") -> None:
        self.clock = clock
        self.interval = interval
        self.f = f
        self.label = label
        self.running = False
        self._call: IDelayedCall | None = None

    def start(self, now: bool = False) -> None:
        self.running = True
        if now:
            self._run()
        else:
            self._schedule()

    def stop(self) -> None:
        self.running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self) -> None:
        if self.running:
            self._call = self.clock.callLater(coalesced_delay(self.clock.seconds(), self.interval), self._run)

    def _run(self) -> None:
        self._call = None
        try:
            result = self.f()
        except Exception:  # noqa: BLE001 - logged; the loop goes on
            log.exception("%s failed", self.label or self.f)
            self._schedule()
            return
        if result is None:
            self._schedule()
            return
        d = result if isinstance(result, defer.Deferred) else defer.ensureDeferred(result)
        d.addErrback(lambda f: log.error("%s failed: %s", self.label or self.f, f.getErrorMessage()))
        d.addBoth(lambda _: self._schedule())
