"""An idle daemon sleeps: once every mailbox is idling, nothing of ours wakes it.

The wakeup probe of tests/bench/bench_idle.py is loaded into the real
``mirrord run`` (through PYTHONPATH) and records every return from a
blocking epoll_wait with the timers that ran. Over 12 quiet seconds the old
daemon woke about four times (the clock check every 5 s, the status file
every 10 s); now it must not wake at all. Renewals (20 min) and Dovecot's
``* OK Still here`` (2 min) are far outside the window.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from mirrord.status import find_status
from mirrord.testing import ImapAccount, make_message
from tests.integration._mirrord import DaemonProcess, wait_until, write_config

PROBE = Path(__file__).resolve().parents[1] / "bench" / "_idle_probe"


@pytest.mark.slow
def test_an_idle_daemon_is_not_woken_by_timers_of_its_own(imap_account: ImapAccount, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    imap_account.client.create("Work")
    imap_account.client.append("INBOX", make_message(1), ())
    imap_account.client.append("Work", make_message(2), ())
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    out = tmp_path / "probe.json"
    env = {
        "XDG_RUNTIME_DIR": str(runtime),
        "PYTHONPATH": os.pathsep.join([str(PROBE), os.environ.get("PYTHONPATH", "")]),
        "MIRRORD_IDLE_PROBE": str(out),
    }
    config = write_config(tmp_path, imap_account)
    with DaemonProcess(config, env=env) as daemon:
        assert daemon.process is not None

        def all_idling() -> bool:
            status = find_status(config, tmp_path / "state")
            states = [m.state for a in status.accounts for m in a.mailboxes] if status else []
            return states == ["idling", "idling"]

        wait_until(all_idling, what="both mailboxes idling")
        time.sleep(1)
        daemon.process.send_signal(signal.SIGUSR1)
        time.sleep(12)
        daemon.process.send_signal(signal.SIGUSR2)
        wait_until(out.exists, what="the probe's report")
        wakeups = json.loads(out.read_text())["wakeups"]
    ours = [w for w in wakeups if not w["lines"]]
    assert ours == [], f"woken with nothing from the server: {ours}"
