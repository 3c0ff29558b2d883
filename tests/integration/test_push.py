"""New mail in one round trip against Dovecot: EXAMINE and UID FETCH go out together.

Dovecot answers a UID FETCH pipelined behind a NOOP from the session's old
view (the new message is not there); behind an EXAMINE it is. So the trace
must show the worker sending both before reading either answer, no NOOP, and
every message landing. (Bursts: tests/integration/test_daemon.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

from mirrord.testing import ImapAccount, make_message
from tests.integration._mirrord import DaemonProcess, assert_mirrors, local_messages, wait_until, write_config


def _worker_commands(log: str) -> list[tuple[str, str]]:
    """(worker, command) for every command a worker sent, in order."""
    found = []
    for line in log.splitlines():
        m = re.search(r" (\S+ worker \d+) C: M\d+ (.*)$", line)
        if m:
            found.append((m.group(1), m.group(2)))
    return found


def test_each_arrival_is_fetched_with_examine_and_uid_fetch_pipelined(
    imap_account: ImapAccount, tmp_path: Path
) -> None:
    imap_account.client.append("INBOX", make_message(0), ())
    inbox = tmp_path / "Mail" / "INBOX"
    with DaemonProcess(write_config(tmp_path, imap_account, tls="none", host="127.0.0.1", ca_file=None), "-v") as daemon:
        first_sync = len(daemon.lines)
        for i in range(1, 4):
            imap_account.client.append("INBOX", make_message(i), ())
            wait_until(lambda: len(local_messages(inbox)) == i + 1, what=f"message {i}")
        assert_mirrors(imap_account, tmp_path / "Mail", "INBOX")
        live = "\n".join(daemon.lines[first_sync:])
    # Two-way (the default): the files the daemon itself put in place are not
    # a reader's change, so no arrival made it list the folder (issue #15).
    looks = [line for line in live.splitlines() if "looking for local changes" in line]
    assert len(looks) <= 1, looks  # the look every start makes may come after the first sync
    commands = _worker_commands(live)
    assert commands, live
    assert not any(c.startswith("NOOP") for _, c in commands), commands
    # Each EXAMINE is followed on its worker by the UID FETCH of what is new,
    # and that FETCH was sent before the EXAMINE's answer was read.
    lines = live.splitlines()
    examines = [i for i, line in enumerate(lines) if re.search(r"worker \d+ C: M\d+ EXAMINE", line)]
    assert len(examines) >= 3, live
    for i in examines:
        worker = re.search(r"(worker \d+) C:", lines[i]).group(1)  # type: ignore[union-attr]
        after = [line for line in lines[i + 1 :] if f"{worker} " in line]
        assert re.search(r"C: M\d+ UID FETCH \d+:\* \(UID FLAGS RFC822.SIZE BODY.PEEK\[\]\)", after[0]), after[:3]
