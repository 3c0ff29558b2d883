"""mirrord as a systemd service: notifications, signals, reloads, and logs journald keeps well.

systemd itself is not needed: a real AF_UNIX datagram socket stands in for
$NOTIFY_SOCKET, and signals are sent the way systemctl sends them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord.testing import ImapAccount, make_message
from tests.integration._mirrord import (
    DaemonProcess,
    expected_messages,
    local_messages,
    mirrord,
    mirrors,
    wait_until,
    write_config,
)


class NotifySocket:
    """What systemd would receive from the service, with arrival times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[tuple[float, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, socket.timeout):
                return self.messages
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, line: str, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, message in self.drain():
                if line in message.splitlines():
                    return when
        raise AssertionError(f"{line!r} never arrived; got {[m for _, m in self.messages][-5:]}")

    def count(self, line: str) -> int:
        return sum(1 for _, message in self.drain() if line in message.splitlines())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    # Socket paths are limited to ~108 bytes: keep it short.
    path = Path(f"/tmp/mirrord-notify-{os.getpid()}-{time.monotonic_ns()}")
    sock = NotifySocket(path)
    yield sock
    sock.close()
    path.unlink(missing_ok=True)


def test_ready_after_first_catch_up_watchdog_pings_and_stopping_on_sigterm(
    imap_account: ImapAccount, tmp_path: Path, notify: NotifySocket
) -> None:
    imap_account.fill("INBOX", [make_message(i, size=3000) for i in range(400)])
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    daemon = DaemonProcess(write_config(tmp_path, imap_account), env=env)
    daemon.start()
    try:
        notify.wait_for("READY=1")
        # READY means the first catch-up is done: everything is already on disk.
        assert len(local_messages(tmp_path / "Mail" / "INBOX")) == 400
        status = [m for _, m in notify.messages if "STATUS=" in m]
        assert any("1 account, 1 mailbox watched, 0 polled" in m for m in status), status
        pings = notify.count("WATCHDOG=1")
        time.sleep(1.6)
        assert notify.count("WATCHDOG=1") >= pings + 2, "pings every WATCHDOG_USEC/2"
    finally:
        status_code = daemon.stop(signal.SIGTERM)
    assert status_code == 0
    notify.wait_for("STOPPING=1", timeout=5)
    assert "Traceback" not in daemon.log


def test_sighup_adds_a_mailbox_and_a_broken_config_keeps_the_old_one(
    imap_account: ImapAccount, tmp_path: Path, notify: NotifySocket
) -> None:
    client = imap_account.client
    client.create("Work")
    client.append("Work", make_message(1), ())
    client.append("INBOX", make_message(2), ())
    config = write_config(tmp_path, imap_account, extra='    mailboxes: ["INBOX"]\n')
    with DaemonProcess(config, env={"NOTIFY_SOCKET": str(notify.path)}) as daemon:
        assert not (tmp_path / "Mail" / "Work").exists()
        assert daemon.process is not None

        write_config(tmp_path, imap_account, extra='    mailboxes: ["INBOX", "Work"]\n')
        daemon.process.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        wait_until(lambda: mirrors(imap_account, tmp_path / "Mail", "Work"), what="Work to be mirrored")
        daemon.wait_for_log("config reloaded")

        text = config.read_text()
        config.write_text(text.replace("    workers: 3\n", "    workers: [3]\n"))
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for_log("keeping the old one")
        assert "workers" in daemon.log.splitlines()[-1]
        client.append("INBOX", make_message(3), ())
        wait_until(lambda: mirrors(imap_account, tmp_path / "Mail", "INBOX"), what="the old config to go on")
        assert daemon.process.poll() is None
    assert daemon.process.returncode == 0


def test_sigterm_during_a_large_first_sync_leaves_nothing_partial_and_resumes(
    imap_account: ImapAccount, tmp_path: Path
) -> None:
    imap_account.fill("INBOX", [make_message(i, size=20_000) for i in range(3000)])
    config = write_config(tmp_path, imap_account)
    inbox = tmp_path / "Mail" / "INBOX"
    # Started by hand, not with DaemonProcess (which waits for the first sync
    # to finish): the first sync must still be running when SIGTERM comes.
    process = subprocess.Popen(
        [sys.executable, "-m", "mirrord", "-c", str(config), "run"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    wait_until(lambda: (inbox / "new").is_dir() and len(os.listdir(inbox / "new")) >= 200, 60, "some mail")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    landed = local_messages(inbox)
    assert 0 < len(landed) < 3000, "stopped in the middle"
    server = {sha for sha, _ in expected_messages(imap_account, "INBOX")}
    assert all(m.sha256 in server for m in landed), "every visible file is complete"
    assert os.listdir(inbox / "tmp") == []
    with sqlite3.connect(tmp_path / "state" / "state.sqlite3") as db:
        rows = db.execute("SELECT COUNT(*) FROM message").fetchone()[0]
        pending = db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
    # A group whose renames finished in a syncer thread as the reactor stopped
    # may still be pending rows (with or without their files): the next start
    # adopts those whose file landed and drops the rest (recover()), which the
    # run below checks by fetching exactly what did not land.
    assert rows <= len(landed) <= rows + pending, "the state DB records what landed, or has it pending"

    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 0, run.stderr
    assert f"{3000 - len(landed)} fetched" in run.stderr, "nothing that landed is fetched again"
    assert len(local_messages(inbox)) == 3000


def test_logs_for_journald_carry_priorities_and_no_timestamps(imap_account: ImapAccount, tmp_path: Path) -> None:
    config = write_config(tmp_path, imap_account, password="Wrong-password-9")
    run = mirrord("-c", str(config), "run", "--once", env={"JOURNAL_STREAM": "8:12345"})
    lines = [line for line in run.stderr.splitlines() if line]
    assert lines and all(line[:3] in ("<3>", "<4>", "<6>", "<7>") for line in lines), lines
    assert any(line.startswith("<3>") and "refused the login" in line for line in lines)
    assert not any(":" in line[3:12] and line[3:5].isdigit() for line in lines), "no timestamp of ours"


def test_run_without_journal_has_timestamps(imap_account: ImapAccount, tmp_path: Path) -> None:
    run = mirrord("-c", str(write_config(tmp_path, imap_account)), "run", "--once")
    first = run.stderr.splitlines()[0]
    assert first[2] == ":" and first[5] == ":", first


def test_status_while_running_and_after(imap_account: ImapAccount, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    for i in range(3):
        imap_account.client.append("INBOX", make_message(i), ())
    config = write_config(tmp_path, imap_account)
    with DaemonProcess(config, env=env):
        shown = mirrord("-c", str(config), "status", env=env)
        assert shown.status == 0
        assert "mirrord is running" in shown.stdout
        assert "INBOX" in shown.stdout and "idling" in shown.stdout
        data = json.loads(mirrord("-c", str(config), "status", "--json", env=env).stdout)
        (row,) = [r for r in data["mailboxes"] if r["mailbox"] == "INBOX"]
        assert row["messages"] == 3 and row["state"] == "idling"
        assert data["daemon"]["pid"] > 0
    after = mirrord("-c", str(config), "status", env=env)
    assert "not running" in after.stdout and "INBOX" in after.stdout


def test_new_mail_hook_runs_with_its_environment(imap_account: ImapAccount, tmp_path: Path) -> None:
    out = tmp_path / "hook.out"
    script = tmp_path / "hook.py"
    script.write_text(
        "import os\n"
        f"with open({str(out)!r}, 'a') as f:\n"
        "    f.write(os.environ['MIRRORD_ACCOUNT'] + ' ' + os.environ['MIRRORD_MAILBOX'] + ' '"
        " + os.environ['MIRRORD_NEW'] + '\\n')\n"
    )
    imap_account.client.append("INBOX", make_message(0), ())
    extra = f"    on_new_mail: [{sys.executable}, {script}]\n"
    with DaemonProcess(write_config(tmp_path, imap_account, extra=extra)):
        time.sleep(0.5)
        assert not out.exists(), "the first sync is not new mail"
        imap_account.client.append("INBOX", make_message(1), ())
        wait_until(out.exists, what="the hook to run")
        wait_until(lambda: out.read_text().strip() != "", what="its output")
    assert out.read_text().splitlines()[0] == "test INBOX 1"


def test_wrong_password_is_said_once_and_not_hammered(imap_account: ImapAccount, tmp_path: Path) -> None:
    config = write_config(tmp_path, imap_account, password="Not-the-password-7")
    with DaemonProcess(config) as daemon:
        time.sleep(6)  # Dovecot answers a failed login after ~2 s; a hammering client would retry
        refusals = [line for line in daemon.lines if "refused the login" in line]
        assert len(refusals) == 1, daemon.log
        assert "ERROR" in refusals[0] and "Check the password" in refusals[0]
        assert "trying again in" in refusals[0]
        delay = float(refusals[0].rsplit("trying again in ", 1)[1].split()[0])
        assert delay >= 300, "a refused login waits minutes, not seconds"
        assert "Not-the-password-7" not in daemon.log


def test_an_account_that_never_connected_is_not_called_mirrored(
    imap_account: ImapAccount, tmp_path: Path, notify: NotifySocket
) -> None:
    """Server down at start: READY may come, but the log and STATUS say the account is retrying."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    config = write_config(tmp_path, imap_account, host="127.0.0.1")
    text = config.read_text().replace(f"port: {imap_account.imaps_port}", f"port: {closed_port}")
    config.write_text(text)
    with DaemonProcess(config, env={"NOTIFY_SOCKET": str(notify.path)}) as daemon:
        notify.wait_for("READY=1")
        started = next(line for line in daemon.lines if "first sync done" in line)
        assert "mirroring 1 accounts" not in started
        assert "not connected, retrying" in started and "test" in started, started
        ready = next(m for _, m in notify.messages if "READY=1" in m)
        assert "not connected, retrying: test" in ready, ready
