"""New mail in one round trip against Dovecot: UID FETCH alone on a worker with INBOX selected.

An EXAMINE (or a NOOP) before the fetch makes Dovecot's maildir rescan the
folder for that session, a cost that grows with the mailbox (issue 15); a
UID FETCH alone is answered at once, or from a view a few messages old
followed by an EXISTS, after which the same command brings the mail. Where
an EXAMINE is sent, the UID FETCH goes out behind it before its answer is
read (one round trip). The trace must show no NOOP, arrivals fetched
without EXAMINE, and every message landing. (Bursts:
tests/integration/test_daemon.py.)
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


def test_each_arrival_is_fetched_without_examine_or_noop_first(
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
    commands = _worker_commands(live)
    assert commands, live
    assert not any(c.startswith("NOOP") for _, c in commands), commands
    # Arrivals go to a worker that has INBOX selected: no EXAMINE before
    # their fetch (one per arrival was the rule before issue 15).
    lines = live.splitlines()
    examines = [i for i, line in enumerate(lines) if re.search(r"worker \d+ C: M\d+ EXAMINE", line)]
    assert len(examines) < 3, live
    fetches = [c for _, c in commands if re.match(r"UID FETCH \d+:\* \(UID FLAGS RFC822.SIZE BODY.PEEK\[\]\)", c)]
    assert len(fetches) >= 3, commands
    # An EXAMINE there is has the UID FETCH behind it, sent before its answer was read.
    for i in examines:
        worker = re.search(r"(worker \d+) C:", lines[i]).group(1)  # type: ignore[union-attr]
        after = [line for line in lines[i + 1 :] if f"{worker} " in line]
        assert re.search(r"C: M\d+ UID FETCH \d+:\* \(UID FLAGS RFC822.SIZE BODY.PEEK\[\]\)", after[0]), after[:3]
