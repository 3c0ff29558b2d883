"""Be woken when the wall clock is set or the machine resumes, without polling (Linux).

A daemon that must notice a suspend and resume could look at the clocks
every few seconds, but that wakes the CPU all day for an event that happens
a few times a day. Linux can wake us instead: a ``timerfd`` on
``CLOCK_REALTIME`` armed with ``TFD_TIMER_CANCEL_ON_SET`` becomes readable
(``read`` fails with ``ECANCELED``) whenever the realtime clock changes
discontinuously: ``settimeofday``, an NTP step, and resume from suspend,
which the kernel treats as a clock set (``timerfd_resume()``, Linux 5.14;
earlier kernels did the same through ``clock_was_set_delayed()``).

The alarm only says "the clock may have moved"; whoever listens compares
the wall and monotonic clocks to decide whether it matters. Python has no
timerfd before 3.13, so it is reached through ctypes; where it cannot be
(not Linux, no libc symbol) :meth:`ClockSetAlarm.create` returns None and
the caller falls back to looking at the clocks now and then.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mirrord.clockset")

CLOCK_REALTIME = 0
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
TFD_TIMER_ABSTIME = 1
TFD_TIMER_CANCEL_ON_SET = 2
FAR_AHEAD = 10 * 365 * 86400
"""The alarm's expiry, from now: it is there to be cancelled, not to go off."""


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create  # noqa: B018 - raises AttributeError where missing
        libc.timerfd_settime  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


class ClockSetAlarm:
    """A readable file descriptor for the reactor that fires on every clock set.

    Add it with ``reactor.addReader(alarm)``; ``on_set`` is called from
    ``doRead`` each time the fd becomes readable, after re-arming (a
    cancelled timerfd stays readable until it is armed again).
    """

    def __init__(self, fd: int, libc: Any, on_set: Callable[[], None], *, wall: Callable[[], float] = time.time,
                 read: Callable[[int, int], bytes] = os.read) -> None:
        self._fd = fd
        self._libc = libc
        self.on_set = on_set
        self._wall = wall
        self._read = read

    @classmethod
    def create(cls, on_set: Callable[[], None]) -> ClockSetAlarm | None:
        """An armed alarm, or None where the kernel or platform has no way to give one."""
        libc = _libc()
        if libc is None:
            return None
        fd = libc.timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            log.debug("timerfd_create: %s", os.strerror(ctypes.get_errno()))
            return None
        alarm = cls(fd, libc, on_set)
        if not alarm.arm():
            os.close(fd)
            return None
        return alarm

    def arm(self) -> bool:
        """(Re)arm: expire far in the future, be cancelled by any clock set before."""
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(int(self._wall()) + FAR_AHEAD, 0))
        if self._libc.timerfd_settime(self._fd, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET,
                                      ctypes.byref(spec), None) != 0:
            log.debug("timerfd_settime: %s", os.strerror(ctypes.get_errno()))
            return False
        return True

    # -- IReadDescriptor ----------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> None:  # noqa: N802 - Twisted's name
        try:
            self._read(self._fd, 8)
        except BlockingIOError:
            return  # nothing happened after all
        except OSError as e:
            if e.errno != errno.ECANCELED:
                log.warning("clock alarm: %s", e)
                return
        # Cancelled by a clock set (or, ten years on, expired): arm it again first.
        self.arm()
        self.on_set()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
        self.close()

    def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
        return "clockset"

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
