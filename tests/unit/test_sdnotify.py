"""sd_notify against real AF_UNIX datagram sockets, and the watchdog loop on task.Clock.

The receiving end is a socket bound where systemd's would be, so what is
asserted is the bytes systemd would read, not what we meant to send.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import task

from mirrord.sdnotify import MAX_DATAGRAM, MAX_STATUS, Notifier, start_watchdog


class Receiver:
    """The manager's end of $NOTIFY_SOCKET: a bound datagram socket we read from."""

    def __init__(self, env_value: str) -> None:
        self.env_value = env_value
        self.address = "\0" + env_value[1:] if env_value.startswith("@") else env_value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)

    def messages(self) -> list[str]:
        """Every datagram queued so far (delivery to a local socket is synchronous)."""
        got = []
        while True:
            try:
                got.append(self.sock.recv(65536, socket.MSG_DONTWAIT).decode())
            except BlockingIOError:
                return got

    def vanish(self) -> None:
        self.sock.close()
        if not self.address.startswith("\0"):
            os.unlink(self.address)


def _path_receiver(tmp_path: Path) -> Receiver:
    path = tmp_path / "notify"
    if len(os.fsencode(path)) >= 108:  # sun_path's limit; pytest's tmp_path is normally far shorter
        pytest.skip(f"socket path too long for AF_UNIX: {path}")
    return Receiver(str(path))


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Receiver]:
    if request.param == "path":
        r = _path_receiver(tmp_path)
    else:
        r = Receiver(f"@mirrord-test-{uuid.uuid4().hex}")
    yield r
    r.sock.close()


@pytest.fixture
def notifier(receiver: Receiver) -> Iterator[Notifier]:
    n = Notifier.from_environment({"NOTIFY_SOCKET": receiver.env_value})
    yield n
    n.close()


def warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "mirrord.sdnotify" and r.levelno >= logging.WARNING]


# -- what arrives -------------------------------------------------------------------


def test_messages_arrive_exactly(receiver: Receiver, notifier: Notifier) -> None:
    assert notifier.enabled
    notifier.send("READY=1", "STATUS=3 accounts, 12 mailboxes")
    notifier.ready()
    notifier.ready("mirroring")
    notifier.status("syncing personal/INBOX")
    notifier.stopping()
    notifier.watchdog()
    notifier.notify(EXTEND_TIMEOUT_USEC="60000000", STATUS="still starting")
    assert receiver.messages() == [
        "READY=1\nSTATUS=3 accounts, 12 mailboxes",
        "READY=1",
        "READY=1\nSTATUS=mirroring",
        "STATUS=syncing personal/INBOX",
        "STOPPING=1",
        "WATCHDOG=1",
        "EXTEND_TIMEOUT_USEC=60000000\nSTATUS=still starting",
    ]


def test_reloading_carries_the_monotonic_clock(receiver: Receiver, notifier: Notifier) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [message] = receiver.messages()
    reloading, monotonic = message.split("\n")
    assert reloading == "RELOADING=1"
    name, value = monotonic.split("=")
    assert name == "MONOTONIC_USEC" and before <= int(value) <= after


def test_a_newline_in_text_cannot_add_fields(receiver: Receiver, notifier: Notifier) -> None:
    # A status built from a server's error message must not turn into STOPPING=1.
    notifier.status("server said: bye\nSTOPPING=1")
    notifier.send("STATUS=a\r\nREADY=1")
    assert receiver.messages() == ["STATUS=server said: bye STOPPING=1", "STATUS=a  READY=1"]


def test_long_status_is_shortened(receiver: Receiver, notifier: Notifier) -> None:
    notifier.status("x" * 10_000)
    [message] = receiver.messages()
    assert message == "STATUS=" + "x" * (MAX_STATUS - 1) + "…"


def test_oversized_datagram_is_cut_on_a_character_boundary(receiver: Receiver, notifier: Notifier) -> None:
    notifier.send("READY=1", "X_NOTE=" + "é" * MAX_DATAGRAM)
    [message] = receiver.messages()  # .decode() in messages() fails on broken UTF-8
    assert message.startswith("READY=1\nX_NOTE=é")
    assert len(message.encode()) <= MAX_DATAGRAM


def test_bad_field_names_are_a_programming_error(notifier: Notifier) -> None:
    with pytest.raises(ValueError):
        notifier.notify(status="lowercase is not a field")


# -- no systemd ----------------------------------------------------------------------


def test_unset_notify_socket_is_a_silent_no_op(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    n = Notifier.from_environment({"WATCHDOG_USEC": "garbage", "WATCHDOG_PID": "x"})
    assert not n.enabled
    assert n.watchdog_interval is None  # no socket: nobody to ping
    n.ready("x")
    n.status("x")
    n.watchdog()
    n.reloading()
    n.stopping()
    n.send("READY=1")
    n.notify(STATUS="x")
    n.close()
    assert start_watchdog(n, task.Clock()) is None
    assert [r for r in caplog.records if r.name == "mirrord.sdnotify"] == []


def test_empty_notify_socket_counts_as_unset() -> None:
    assert not Notifier.from_environment({"NOTIFY_SOCKET": ""}).enabled


@pytest.mark.parametrize("value", ["relative/path", "@", "vsock:2:1234"])
def test_unusable_addresses_disable_with_a_warning(value: str, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_environment({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog_interval is None
    n.ready()
    assert len(warnings(caplog)) == 1


def test_the_default_environment_is_os_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    r = _path_receiver(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", r.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with Notifier.from_environment() as n:
        n.ready()
        assert n.watchdog_interval == 2.0
    assert r.messages() == ["READY=1"]
    assert not n.enabled
    r.sock.close()


# -- failures never reach the daemon -------------------------------------------------


def test_vanished_socket_logs_once_and_does_not_raise(
    receiver: Receiver, notifier: Notifier, caplog: pytest.LogCaptureFixture
) -> None:
    notifier.ready()
    receiver.vanish()
    for _ in range(5):
        notifier.watchdog()
        notifier.status("still here")
    [warning] = warnings(caplog)
    assert receiver.env_value in warning.getMessage()


def test_delivery_resumes_when_the_socket_comes_back(
    receiver: Receiver, notifier: Notifier, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.vanish()
    notifier.watchdog()
    back = Receiver(receiver.env_value)  # as after `systemctl --user daemon-reexec`
    try:
        notifier.watchdog()
        assert back.messages() == ["WATCHDOG=1"]
        back.vanish()
        notifier.watchdog()  # a new outage is worth a new warning
    finally:
        back.sock.close()
    assert len(warnings(caplog)) == 2


def test_a_full_socket_drops_messages_instead_of_blocking(
    receiver: Receiver, notifier: Notifier, caplog: pytest.LogCaptureFixture
) -> None:
    # Nobody reads: the receive queue fills after a few datagrams (net.unix.max_dgram_qlen).
    started = time.monotonic()
    for _ in range(2000):
        notifier.watchdog()
    assert time.monotonic() - started < 5
    queued = receiver.messages()
    assert 0 < len(queued) < 2000 and set(queued) == {"WATCHDOG=1"}
    [warning] = warnings(caplog)
    assert "not reading" in warning.getMessage()


def test_close_stops_sending(receiver: Receiver, notifier: Notifier) -> None:
    notifier.close()
    notifier.ready()
    notifier.close()  # twice is fine
    assert receiver.messages() == []


# -- the watchdog settings ----------------------------------------------------------


def env(receiver: Receiver, **extra: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": receiver.env_value, **extra}


def test_watchdog_interval_is_half_of_watchdog_usec(receiver: Receiver) -> None:
    n = Notifier.from_environment(env(receiver, WATCHDOG_USEC="120000000"))
    assert n.watchdog_interval == 60.0


def test_watchdog_pid_of_this_process_is_honoured(receiver: Receiver) -> None:
    n = Notifier.from_environment(env(receiver, WATCHDOG_USEC="3000000", WATCHDOG_PID=str(os.getpid())))
    assert n.watchdog_interval == 1.5


def test_watchdog_meant_for_another_process_is_ignored(receiver: Receiver) -> None:
    # What a child of the daemon (a password helper) would inherit.
    n = Notifier.from_environment(env(receiver, WATCHDOG_USEC="3000000", WATCHDOG_PID=str(os.getpid() + 1)))
    assert n.enabled  # notifications still go out; only the watchdog is not ours
    assert n.watchdog_interval is None


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "2min"},
        {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "self"},
    ],
)
def test_missing_or_malformed_watchdog_means_no_watchdog(receiver: Receiver, extra: dict[str, str]) -> None:
    assert Notifier.from_environment(env(receiver, **extra)).watchdog_interval is None


# -- the watchdog loop --------------------------------------------------------------


def test_watchdog_loop_pings_at_half_the_interval_until_stopped(receiver: Receiver) -> None:
    clock = task.Clock()
    n = Notifier.from_environment(env(receiver, WATCHDOG_USEC="120000000", WATCHDOG_PID=str(os.getpid())))
    loop = start_watchdog(n, clock)
    assert loop is not None and loop.running
    assert receiver.messages() == ["WATCHDOG=1"]  # at once: a slow start must not eat the first period
    clock.advance(59.9)
    assert receiver.messages() == []
    clock.advance(0.1)
    assert receiver.messages() == ["WATCHDOG=1"]
    clock.pump([60.0] * 3)
    assert receiver.messages() == ["WATCHDOG=1"] * 3
    loop.stop()
    clock.advance(600)
    assert receiver.messages() == []
    assert clock.getDelayedCalls() == []
    n.close()


def test_no_watchdog_loop_without_watchdog_usec(receiver: Receiver) -> None:
    clock = task.Clock()
    assert start_watchdog(Notifier.from_environment(env(receiver)), clock) is None
    assert clock.getDelayedCalls() == []


def test_watchdog_loop_survives_a_vanished_socket(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    clock = task.Clock()
    n = Notifier.from_environment(env(receiver, WATCHDOG_USEC="2000000"))
    loop = start_watchdog(n, clock)
    assert loop is not None
    receiver.vanish()
    clock.pump([1.0] * 10)
    assert loop.running
    assert len(warnings(caplog)) == 1
    loop.stop()
    n.close()
