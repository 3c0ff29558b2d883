"""The new-mail hook's coalescing, on task.Clock with a fake process launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from twisted.internet import task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

from mirrord.hooks import MIN_INTERVAL, NewMailHook


class FakeReactor(task.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, str, list[str], dict[str, str]]] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: dict[str, str], **kw: Any) -> None:  # noqa: N802
        self.spawned.append((proto, executable, args, env))

    def finish(self, index: int = -1, code: int = 0) -> None:
        proto = self.spawned[index][0]
        proto.processEnded(Failure(ProcessDone(0) if code == 0 else ProcessTerminated(exitCode=code)))


def make() -> tuple[NewMailHook, FakeReactor]:
    reactor = FakeReactor()
    hook = NewMailHook(reactor, "personal", [sys.executable, "-c", "pass"])
    hook.enabled = True
    return hook, reactor


def test_runs_with_account_mailbox_and_count_in_its_environment() -> None:
    hook, reactor = make()
    hook.new_mail("INBOX", 2)
    reactor.advance(0)
    (_, executable, args, env), = reactor.spawned
    # Run through a launcher that gives the command its own process group.
    assert executable == sys.executable and args[-4:] == [sys.executable, sys.executable, "-c", "pass"]
    assert (env["MIRRORD_ACCOUNT"], env["MIRRORD_MAILBOX"], env["MIRRORD_NEW"]) == ("personal", "INBOX", "2")


def test_a_burst_is_coalesced_into_one_run_per_interval() -> None:
    hook, reactor = make()
    hook.new_mail("INBOX", 1)
    reactor.advance(0)
    reactor.finish()
    for mailbox in ("INBOX", "Lists/dev", "INBOX"):
        hook.new_mail(mailbox, 3)
    reactor.advance(MIN_INTERVAL - 0.1)
    assert len(reactor.spawned) == 1, "not before the interval is over"
    reactor.advance(0.1)
    assert len(reactor.spawned) == 2
    env = reactor.spawned[1][3]
    assert env["MIRRORD_NEW"] == "9" and env["MIRRORD_MAILBOXES"] == "INBOX\nLists/dev"


def test_never_two_at_once() -> None:
    hook, reactor = make()
    hook.new_mail("INBOX", 1)
    reactor.advance(0)
    hook.new_mail("INBOX", 1)
    reactor.advance(MIN_INTERVAL * 3)
    assert len(reactor.spawned) == 1, "the first is still running"
    reactor.finish(code=1)  # a failing hook is logged, and does not stop the next
    reactor.advance(0)
    assert len(reactor.spawned) == 2


def test_nothing_when_disabled_or_for_zero() -> None:
    hook, reactor = make()
    hook.enabled = False
    hook.new_mail("INBOX", 500)
    hook.enabled = True
    hook.new_mail("INBOX", 0)
    reactor.advance(MIN_INTERVAL)
    assert reactor.spawned == []


def test_environment_has_nothing_meant_for_the_daemon_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook that inherits NOTIFY_SOCKET can tell systemd the daemon is ready or alive."""
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        monkeypatch.setenv(key, "x")
    monkeypatch.setenv("LANG", "C.UTF-8")
    hook, reactor = make()
    hook.new_mail("INBOX", 1)
    reactor.advance(0)
    env = reactor.spawned[0][3]
    assert not {k for k in env if k == "NOTIFY_SOCKET" or k.startswith(("WATCHDOG_", "LISTEN_"))}
    assert env["LANG"] == "C.UTF-8" and env["PATH"] == os.environ["PATH"]


def test_control_characters_in_mailbox_names_are_visible() -> None:
    hook, reactor = make()
    hook.new_mail("a\x1b]0;owned\x07\nb", 1)
    reactor.advance(0)
    env = reactor.spawned[0][3]
    assert env["MIRRORD_MAILBOX"] == "a\\x1b]0;owned\\x07\\x0ab"
    assert "\n" not in env["MIRRORD_MAILBOXES"]


def test_a_hook_past_its_timeout_is_killed_and_the_next_one_runs() -> None:
    hook, reactor = make()
    hook.timeout = 3.0
    hook.new_mail("INBOX", 1)
    reactor.advance(0)
    reactor.advance(3.0)  # the fake process has no pid: only the log and the timer
    reactor.finish(code=0)
    hook.new_mail("INBOX", 1)
    reactor.advance(MIN_INTERVAL)
    assert len(reactor.spawned) == 2


_REAL_RUN = textwrap.dedent(
    """
    import sys, time
    from twisted.internet import defer, task
    from mirrord import hooks

    async def main(reactor):
        done = defer.Deferred()
        hook = hooks.NewMailHook(reactor, "acct", sys.argv[1:], timeout=0.5)
        ended = hook._ended
        def _ended(code, signal):
            ended(code, signal)
            done.callback((code, signal))
        hook._ended = _ended
        hook.new_mail("INBOX", 1)
        start = time.monotonic()
        code, signal = await done
        print(code, signal, round(time.monotonic() - start, 2))

    task.react(main)
    """
)


def test_a_real_hung_hook_is_killed_with_its_children(tmp_path: Path) -> None:
    """A shell that started ``sleep 60`` and waits: both are killed after the timeout."""
    pids = tmp_path / "pids"
    script = f"echo $$ > {pids}; sleep 60 & echo $! >> {pids}; wait"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", _REAL_RUN, "/bin/sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    took = time.monotonic() - start
    assert out.returncode == 0, out.stderr
    code, sig, elapsed = out.stdout.split()
    assert sig == str(int(signal.SIGKILL)) and float(elapsed) < 5, out.stdout
    assert "still running after 0.5s: killed" in out.stderr
    assert took < 20
    for pid in map(int, pids.read_text().split()):
        for _ in range(100):  # the sleep is reparented; give init a moment to reap it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"process {pid} of the hook survived")


def test_a_real_hook_does_not_inherit_notify_socket(tmp_path: Path) -> None:
    out_file = tmp_path / "env"
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "NOTIFY_SOCKET": "/run/user/0/systemd/notify",
        "WATCHDOG_USEC": "1000",
    }
    out = subprocess.run(
        [sys.executable, "-c", _REAL_RUN, "/bin/sh", "-c", f"env > {out_file}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    seen = out_file.read_text()
    assert "MIRRORD_MAILBOX=INBOX" in seen and "PATH=" in seen
    assert "NOTIFY_SOCKET" not in seen and "WATCHDOG_USEC" not in seen
