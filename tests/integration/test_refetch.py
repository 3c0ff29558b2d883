"""A fetch cut part-way and retried leaves one file per server message (invariant 7).

Five messages land in INBOX at once (one COPY), and the connection fetching
their bodies is reset at one of three points: right after the first
message's response, in the middle of the third message's literal, and after
the last message's response but before the tagged OK. Whatever the worker
recorded before the cut must not be fetched and recorded a second time by
the retry: every path that fetches bodies is tried, the daemon's live one
(``fetch_new``), the catch-up's small fetch and the first sync's batches.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import pytest

from mirrord.testing import ImapAccount, make_message
from mirrord.testing.faultproxy import FaultProxy
from mirrord.testing.imapclient import ImapClient
from tests.integration._mirrord import DaemonProcess, mirrord
from tests.integration.test_faults import MAILBOX, check_exact, converge, proxied_config

STAGING = "Staging"
FIRST = 100
"""Index of the first of the five messages (make_message's ``i``)."""


def _closing(i: int) -> bytes:
    """The last line of message ``i``'s body, as make_message writes it."""
    digest = hashlib.sha256(f"mirrord-test-message-{i}".encode()).hexdigest()
    return f"\r\n--=_mirrord_{i}_{digest[:16]}--\r\n".encode("ascii")


def _message_id(i: int) -> bytes:
    digest = hashlib.sha256(f"mirrord-test-message-{i}".encode()).hexdigest()
    return f"<{i}.{digest[:20]}@mirrord.test>".encode("ascii")


# (pattern, bytes after it): the body is the last item of each FETCH
# response, so its closing boundary plus ")\r\n" ends the response.
CUTS = {
    "after-message-1": (_closing(FIRST), 3),
    "mid-message-3": (_message_id(FIRST + 2), 200),
    "after-last-before-ok": (_closing(FIRST + 4), 3),
}


def _stage(account: ImapAccount) -> None:
    """Put the five messages in a staging mailbox, ready for one COPY."""
    account.client.create(STAGING)
    for i in range(FIRST, FIRST + 5):
        account.client.append(STAGING, make_message(i), ())


def _copy_all(client: ImapClient) -> None:
    """COPY every staged message into INBOX at once: one EXISTS announces all five."""
    conn, _ = client._select(STAGING, False)
    client._run("UID COPY", conn.uid, "COPY", "1:*", MAILBOX)
    client._unselect(conn)


def _one_file_per_message(account: ImapAccount, root: Path, state_dir: Path) -> None:
    check_exact(account, root)
    with sqlite3.connect(state_dir / "state.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM pending").fetchone()[0] == 0


def _state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_live_fetch_cut_and_retried(imap_account: ImapAccount, tmp_path: Path, cut: str) -> None:
    """The daemon's fetch of new mail (fetch_new), cut, retries from what is on disk."""
    _stage(imap_account)
    root = tmp_path / "Mail"
    pattern, after = CUTS[cut]
    with FaultProxy(imap_account.host, imap_account.port) as proxy:
        config = proxied_config(tmp_path, imap_account, proxy.port)
        with DaemonProcess(config) as daemon:
            # Ready means every watcher idles already.
            fetched = proxy.watch(pattern)
            proxy.cut_when(pattern, after_bytes=after, times=1)
            started = time.monotonic()
            _copy_all(imap_account.client)
            assert fetched.wait(20), f"the cut's pattern never went through:\n{daemon.log}"
            converge(imap_account, root, started, count=5)
            time.sleep(0.5)  # a duplicate would come with the retry, just after
            _one_file_per_message(imap_account, root, _state_dir(tmp_path))
        run = mirrord("-c", str(config), "run", "--once")
        assert run.status == 0, run.stderr
        _one_file_per_message(imap_account, root, _state_dir(tmp_path))


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_catchup_fetch_cut_and_retried(imap_account: ImapAccount, tmp_path: Path, cut: str) -> None:
    """A catch-up's small fetch (one command for a handful of new messages), cut, retries what is missing."""
    _stage(imap_account)
    imap_account.client.append(MAILBOX, make_message(1), ())
    root = tmp_path / "Mail"
    pattern, after = CUTS[cut]
    with FaultProxy(imap_account.host, imap_account.port) as proxy:
        config = proxied_config(tmp_path, imap_account, proxy.port)
        run = mirrord("-c", str(config), "run", "--once")
        assert run.status == 0, run.stderr
        _copy_all(imap_account.client)
        fetched = proxy.watch(pattern)
        proxy.cut_when(pattern, after_bytes=after, times=1)
        run = mirrord("-c", str(config), "run", "--once")
        assert fetched.fired, "the cut's pattern never went through"
        assert run.status == 0, run.stderr
        _one_file_per_message(imap_account, root, _state_dir(tmp_path))
        run = mirrord("-c", str(config), "run", "--once")
        assert run.status == 0, run.stderr
        _one_file_per_message(imap_account, root, _state_dir(tmp_path))


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_first_sync_fetch_cut_and_retried(imap_account: ImapAccount, tmp_path: Path, cut: str) -> None:
    """A first sync's batches, one of them cut, retry only what the dropped connection did not record."""
    _stage(imap_account)
    _copy_all(imap_account.client)
    root = tmp_path / "Mail"
    pattern, after = CUTS[cut]
    with FaultProxy(imap_account.host, imap_account.port) as proxy:
        config = proxied_config(tmp_path, imap_account, proxy.port)
        fetched = proxy.watch(pattern)
        proxy.cut_when(pattern, after_bytes=after, times=1)
        run = mirrord("-c", str(config), "run", "--once")
        assert fetched.fired, "the cut's pattern never went through"
        assert run.status == 0, run.stderr
        _one_file_per_message(imap_account, root, _state_dir(tmp_path))
