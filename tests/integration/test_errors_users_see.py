"""What a user sees when something is wrong: clear words, the right exit status, nothing written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord.testing import ImapAccount, PrivateDovecot, make_message
from tests.integration._mirrord import mirrord, write_config


def test_untrusted_certificate_is_refused(imap_account: ImapAccount, tmp_path: Path) -> None:
    # No ca_file: the system store does not know the throwaway CA.
    run = mirrord("-c", str(write_config(tmp_path, imap_account, ca_file=None)), "run", "--once")
    assert run.status == 1
    assert "not trusted" in run.stderr
    assert "Traceback" not in run.stderr
    assert not list((tmp_path / "Mail").glob("*/cur/*")) if (tmp_path / "Mail").exists() else True


def test_untrusted_certificate_is_refused_for_starttls_too(imap_account: ImapAccount, tmp_path: Path) -> None:
    run = mirrord("-c", str(write_config(tmp_path, imap_account, tls="starttls", ca_file=None)), "run", "--once")
    assert run.status == 1
    assert "not trusted" in run.stderr
    assert "LOGIN" not in run.stderr.upper().replace("LOGIN OF", "")  # never got as far as logging in


@pytest.fixture(scope="module")
def mismatched_server() -> Iterator[PrivateDovecot]:
    # Not under pytest's tmp dir: that is 0700, and Dovecot's mail processes
    # run as an unprivileged user when the tests run as root.
    with tempfile.TemporaryDirectory(prefix="mirrord-mismatch-") as root:
        server = PrivateDovecot(Path(root), cert_names=("mail.other.test",))
        server.start()
        yield server
        server.stop()


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_certificate_for_another_host_is_refused(
    mismatched_server: PrivateDovecot, tmp_path: Path, tls: str
) -> None:
    account = mismatched_server.new_account("mismatch")
    account.client.append("INBOX", make_message(1), ())
    run = mirrord("-c", str(write_config(tmp_path, account, tls=tls)), "run", "--once")
    assert run.status == 1
    assert "does not match" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_wrong_password_says_so(imap_account: ImapAccount, tmp_path: Path) -> None:
    run = mirrord("-c", str(write_config(tmp_path, imap_account, password="Xq9-not-it")), "run", "--once")
    assert run.status == 1
    assert "refused the login" in run.stderr
    assert "Xq9-not-it" not in run.stderr
    assert "Traceback" not in run.stderr


def test_verbose_trace_redacts_credentials(imap_account: ImapAccount, tmp_path: Path) -> None:
    imap_account.client.append("INBOX", make_message(1), ())
    run = mirrord("-c", str(write_config(tmp_path, imap_account)), "run", "--once", "-v")
    assert run.status == 0
    assert "C: M" in run.stderr, "the trace is on"
    assert "AUTHENTICATE PLAIN <redacted>" in run.stderr or "LOGIN <redacted>" in run.stderr
    assert imap_account.password not in run.stderr
    assert imap_account.password.split()[-1] not in run.stderr


def test_check_lists_capabilities_and_mailboxes_and_writes_nothing(
    imap_account: ImapAccount, tmp_path: Path
) -> None:
    imap_account.client.create("Archive/2024")
    config = write_config(tmp_path, imap_account)
    run = mirrord("-c", str(config), "check")
    assert run.status == 0, run.stderr
    assert "IMAP4REV1" in run.stdout and "IDLE" in run.stdout
    assert "INBOX" in run.stdout and "Archive/2024" in run.stdout
    assert not (tmp_path / "Mail").exists()
    assert not (tmp_path / "state").exists()


def test_check_reports_a_refused_login(imap_account: ImapAccount, tmp_path: Path) -> None:
    run = mirrord("-c", str(write_config(tmp_path, imap_account, password="nope")), "check")
    assert run.status == 1
    assert "refused the login" in run.stdout


BAD_CONFIGS = {
    "yaml syntax": ("accounts:\n  a: [unclosed\n", "config.yaml:"),
    "unknown key": ("accounts:\n  a:\n    host: h\n    hots: x\n", "accounts.a.hots"),
    "wrong type": ("accounts:\n  a:\n    host: h\n    username: u\n    password: p\n    maildir: /m\n    port: abc\n",
                   "accounts.a.port"),
    "missing host": ("accounts:\n  a:\n    username: u\n    password: p\n    maildir: /m\n", "host"),
    "both password sources": (
        "accounts:\n  a:\n    host: h\n    username: u\n    password: p\n    password_file: /f\n    maildir: /m\n",
        "password",
    ),
    "tls none off loopback": (
        "accounts:\n  a:\n    host: imap.example.org\n    tls: none\n    username: u\n    password: p\n    maildir: /m\n",
        "accounts.a.tls",
    ),
    "no accounts": ("state_dir: /tmp/x\n", "accounts"),
    "workers out of range": (
        "accounts:\n  a:\n    host: h\n    username: u\n    password: p\n    maildir: /m\n    workers: 0\n",
        "accounts.a.workers",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
def test_bad_config_exits_2_naming_file_line_and_key(tmp_path: Path, kind: str) -> None:
    text, must_mention = BAD_CONFIGS[kind]
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n" + text if "state_dir" not in text else text)
    os.chmod(config, 0o600)
    for command in (["run", "--once"], ["check"]):
        run = mirrord("-c", str(config), *command)
        assert run.status == 2, (kind, run.stderr)
        first = run.stderr.strip().splitlines()[-1]
        assert str(config) in first and must_mention in first, first
        assert "Traceback" not in run.stderr
    assert not (tmp_path / "state").exists(), "nothing is written for a bad config"


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    run = mirrord("-c", str(tmp_path / "nope.yaml"), "run", "--once")
    assert run.status == 2
    assert "nope.yaml" in run.stderr


def test_usage_error_exits_2() -> None:
    assert mirrord("frobnicate").status == 2
