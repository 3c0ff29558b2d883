"""COMPRESS=DEFLATE against a real Dovecot (imap_zlib loaded): the mirror is the same, byte for byte.

The trace must show the workers asking for compression; the watcher does not
(it carries a few lines an hour). Over TLS and in the clear, and live: new
mail fetched through a compressed worker lands like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mirrord.testing import ImapAccount, PrivateDovecot, make_message
from tests.integration._mirrord import (
    DaemonProcess,
    assert_mirrors,
    local_messages,
    mirrord,
    wait_until,
    write_config,
)


@pytest.fixture(scope="module")
def zlib_dovecot(dovecot_roots: Any) -> Any:
    server = PrivateDovecot(dovecot_roots.new("dovecot-zlib"), compress=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _fill(account: ImapAccount) -> None:
    account.fill("INBOX", (make_message(i, size=8000) for i in range(1, 41)))
    account.client.append("INBOX", make_message(99, attachment_bytes=300_000), ("\\Seen", "\\Flagged"))
    account.client.append("INBOX", b"Subject: bare\r\n\r\nbare\rcr and bare\nlf\r\r\n" + b"x\r" * 5000, ())


@pytest.mark.parametrize("tls", ["none", "implicit"])
def test_compressed_sync_is_byte_identical(zlib_dovecot: PrivateDovecot, tmp_path: Path, tls: str) -> None:
    account = zlib_dovecot.new_account(f"zlib-{tls}")
    try:
        _fill(account)
        config = write_config(tmp_path, account, tls=tls, host="127.0.0.1" if tls == "none" else "localhost",
                              ca_file=None if tls == "none" else "default", extra="    compress: yes\n")
        run = mirrord("-c", str(config), "run", "--once", "-v")
        assert run.status == 0, run.stderr
        assert "C: M2 COMPRESS DEFLATE" in run.stderr or "COMPRESS DEFLATE" in run.stderr
        assert "compression on" in run.stderr
        assert "dropping connection" not in run.stderr  # not even at LOGOUT, where the stream ends
        assert_mirrors(account, tmp_path / "Mail", "INBOX")
        assert len(local_messages(tmp_path / "Mail" / "INBOX")) == 42
    finally:
        account.close()


def test_auto_does_not_compress_to_loopback(zlib_dovecot: PrivateDovecot, tmp_path: Path) -> None:
    account = zlib_dovecot.new_account("zlib-auto")
    try:
        account.client.append("INBOX", make_message(1), ())
        config = write_config(tmp_path, account, tls="none", host="127.0.0.1", ca_file=None)
        run = mirrord("-c", str(config), "run", "--once", "-v")
        assert run.status == 0, run.stderr
        assert "COMPRESS=DEFLATE" in run.stderr  # offered...
        assert "C: M2 COMPRESS" not in run.stderr and "compression on" not in run.stderr  # ...not taken
        assert_mirrors(account, tmp_path / "Mail", "INBOX")
    finally:
        account.close()


def test_live_mail_through_a_compressed_worker(zlib_dovecot: PrivateDovecot, tmp_path: Path) -> None:
    account = zlib_dovecot.new_account("zlib-live")
    try:
        account.client.append("INBOX", make_message(0), ())
        config = write_config(tmp_path, account, tls="none", host="127.0.0.1", ca_file=None,
                              extra="    compress: yes\n")
        with DaemonProcess(config, "-v") as daemon:
            for i in range(1, 4):
                account.client.append("INBOX", make_message(i, size=20_000), ())
                wait_until(lambda: len(local_messages(tmp_path / "Mail" / "INBOX")) == i + 1,
                           what=f"new message {i}")
            assert_mirrors(account, tmp_path / "Mail", "INBOX")
            assert "compression on" in daemon.log
            asked = [line for line in daemon.log.splitlines() if "C: " in line and "COMPRESS DEFLATE" in line]
            assert asked and all(" worker " in line for line in asked), asked
            assert "C: M4 IDLE" in daemon.log or " IDLE" in daemon.log  # a watcher ran, uncompressed
    finally:
        account.close()
