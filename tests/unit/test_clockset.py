"""The kernel's clock-set alarm (timerfd with TFD_TIMER_CANCEL_ON_SET), without setting the clock.

Setting the clock needs privileges a test must not use; the ECANCELED a
clock set produces is injected through the read function instead. What is
real: creating and arming the timerfd, and that an armed alarm is quiet.
"""

from __future__ import annotations

import errno
import os
import select
import sys

import pytest

from mirrord.clockset import ClockSetAlarm

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's")


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_an_armed_alarm_is_quiet_and_a_spurious_read_does_nothing() -> None:
    calls: list[None] = []
    alarm = ClockSetAlarm.create(lambda: calls.append(None))
    assert alarm is not None, "this Linux should offer timerfd"
    try:
        assert not readable(alarm.fileno()), "armed far ahead: nothing to read until the clock is set"
        alarm.doRead()  # the real read: EAGAIN
        assert calls == []
    finally:
        alarm.close()
    assert alarm.fileno() == -1


def test_a_clock_set_rearms_and_tells() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    armed: list[int] = []

    class Libc:
        def timerfd_settime(self, fd: int, flags: int, spec: object, old: object) -> int:
            armed.append(flags)
            return 0

    def cancelled(fd: int, n: int) -> bytes:
        raise OSError(errno.ECANCELED, os.strerror(errno.ECANCELED))

    calls: list[None] = []
    alarm = ClockSetAlarm(fd, Libc(), lambda: calls.append(None), read=cancelled)
    try:
        alarm.doRead()
        assert calls == [None]
        assert armed == [3], "re-armed (ABSTIME | CANCEL_ON_SET), else it would stay readable"
    finally:
        alarm.close()


def test_other_read_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    fd = os.open("/dev/null", os.O_RDONLY)

    def broken(fd: int, n: int) -> bytes:
        raise OSError(errno.EIO, "I/O error")

    calls: list[None] = []
    alarm = ClockSetAlarm(fd, object(), lambda: calls.append(None), read=broken)
    try:
        alarm.doRead()
    finally:
        alarm.close()
    assert calls == [] and "clock alarm" in caplog.text
