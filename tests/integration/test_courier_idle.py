"""A stock Courier-IMAP, whose IDLE looks at the mailbox once a minute: mirrord notices and bounds the lag.

Slow (a private Courier and a daemon, some 20 s) and root-only; it needs
courier-imap unpacked as mirrord/testing/courier.py says, and is skipped
where it is not. tests/bench/bench_courier_idle.py measures the same over
20 APPENDs.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord.testing.courier import PrivateCourier
from mirrord.watcher import NO_PUSH_RENEW
from tests.integration._mirrord import DaemonProcess, mirrord, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def courier() -> Iterator[PrivateCourier]:
    why = PrivateCourier.available()
    if why:
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="mirrord-courier-"))  # nobody must reach the Maildir
    os.chmod(root, 0o755)
    try:
        with PrivateCourier(root) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _append(server: PrivateCourier, subject: str) -> None:
    imap = imaplib.IMAP4(server.host, server.port)
    imap.login(server.user, server.password)
    imap.append("INBOX", None, None, f"Subject: {subject}\r\n\r\n{subject}\r\n".encode())
    imap.logout()


def test_mail_arrives_within_the_bound_and_status_says_why(courier: PrivateCourier, tmp_path: Path) -> None:
    _append(courier, "seed")  # Courier gives an empty mailbox a new UIDVALIDITY at its first message
    password = tmp_path / "password"
    password.write_text(courier.password + "\n")
    password.chmod(0o600)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\naccounts:\n  courier:\n    host: 127.0.0.1\n"
        f"    port: {courier.port}\n    tls: none\n    username: {courier.user}\n"
        f"    password_file: {password}\n    maildir: {tmp_path / 'Mail'}\n    watch: [INBOX]\n"
        "    workers: 1\n    max_connections: 4\n"
    )
    config.chmod(0o600)
    inbox = tmp_path / "Mail" / "INBOX"
    with DaemonProcess(config) as daemon:
        time.sleep(1.0)  # past IDLE's start, when Courier looks anyway
        for i in range(3):
            _append(courier, f"m{i}")
            started = time.monotonic()
            wait_until(lambda n=i + 2: len(os.listdir(inbox / "new")) + len(os.listdir(inbox / "cur")) == n,
                       timeout=NO_PUSH_RENEW + 5, what=f"message {i} in the Maildir")
            assert time.monotonic() - started < NO_PUSH_RENEW + 3
            time.sleep(1.3 * i)
        status = mirrord("-c", str(config), "status").stdout
    assert "re-entered every 5 s (server does not push)" in status, status
    said = [line for line in daemon.lines if "does not push" in line]
    assert len(said) == 1 and "WARNING" in said[0], said
