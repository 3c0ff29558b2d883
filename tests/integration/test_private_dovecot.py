"""The test support itself: if the private Dovecot lies, every integration test lies with it.

These pin down what the other tests rely on: verified TLS on both ports,
helpers that report exactly what the server holds (and change nothing by
looking), a bulk fill that Dovecot really sees, instances that stay apart,
and a stop that really stops.
"""

from __future__ import annotations

import email
import email.policy
import imaplib
import os
import random
import socket
import ssl
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

import mirrord.testing
import mirrord.testing.dovecot
from mirrord.testing import (
    DovecotError,
    DovecotMissing,
    ImapAccount,
    ImapCommandError,
    PrivateDovecot,
    make_message,
    sample_mailboxes,
)

Factory = Callable[..., PrivateDovecot]


def _read_response(stream: socket.socket, tag: bytes) -> list[bytes]:
    reader = stream.makefile("rb")
    lines: list[bytes] = []
    while True:
        line = reader.readline()
        if not line:
            raise ConnectionError(f"connection closed before the {tag!r} response; got {lines!r}")
        lines.append(line)
        if line.startswith(tag + b" "):
            return lines


def _login_over(stream: socket.socket, user: str, password: str) -> bytes:
    """LOGIN, then CAPABILITY; return the post-login capability line."""
    stream.sendall(b'a LOGIN "%s" "%s"\r\n' % (user.encode(), password.encode()))
    assert _read_response(stream, b"a")[-1].startswith(b"a OK")
    stream.sendall(b"b CAPABILITY\r\n")
    lines = _read_response(stream, b"b")
    assert lines[-1].startswith(b"b OK")
    return next(line for line in lines if line.startswith(b"* CAPABILITY"))


def _verifying_context(account: ImapAccount) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(account.ca_file))


# --------------------------------------------------------------------------
# Connecting


def test_imaps_port_verifies_against_the_ca_for_localhost(imap_account: ImapAccount) -> None:
    with socket.create_connection((imap_account.host, imap_account.imaps_port), timeout=10) as raw:
        with _verifying_context(imap_account).wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.makefile("rb").readline().startswith(b"* OK")
            capability = _login_over(tls, imap_account.user, imap_account.password)
    for name in (b"IDLE", b"CONDSTORE", b"QRESYNC", b"UIDPLUS", b"MOVE", b"ESEARCH", b"ENABLE", b"NOTIFY"):
        assert name in capability.split(), capability


def test_plain_port_offers_starttls_that_verifies(imap_account: ImapAccount) -> None:
    with socket.create_connection((imap_account.host, imap_account.port), timeout=10) as raw:
        greeting = raw.makefile("rb").readline()
        assert b"STARTTLS" in greeting
        raw.sendall(b"s STARTTLS\r\n")
        assert _read_response(raw, b"s")[-1].startswith(b"s OK")
        with _verifying_context(imap_account).wrap_socket(raw, server_hostname="localhost") as tls:
            capability = _login_over(tls, imap_account.user, imap_account.password)
    assert b"IDLE" in capability.split()


def test_stdlib_starttls_checks_the_ip_address_too(imap_account: ImapAccount) -> None:
    conn = imaplib.IMAP4(imap_account.host, imap_account.port, timeout=10)
    try:
        conn.starttls(_verifying_context(imap_account))  # server_hostname is "127.0.0.1"
        assert conn.login(imap_account.user, imap_account.password)[0] == "OK"
    finally:
        conn.logout()


@pytest.mark.parametrize(
    ("cafile", "hostname"),
    [(None, "localhost"), ("ca", "mail.example.org")],
    ids=["untrusted-ca", "wrong-hostname"],
)
def test_tls_refuses_what_it_should(imap_account: ImapAccount, cafile: str | None, hostname: str) -> None:
    context = _verifying_context(imap_account) if cafile else ssl.create_default_context()
    with socket.create_connection((imap_account.host, imap_account.imaps_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(raw, server_hostname=hostname)


def test_accounts_are_fresh_and_apart(dovecot: PrivateDovecot, imap_account: ImapAccount) -> None:
    other = dovecot.new_account("other")
    try:
        assert imap_account.user != other.user
        assert imap_account.client.messages("INBOX") == {}
        imap_account.client.append("INBOX", make_message(1))
        assert other.client.messages("INBOX") == {}
        assert len(imap_account.client.messages("INBOX")) == 1
        assert (dovecot.home(imap_account.user) / "Maildir").stat().st_uid == dovecot.mail_uid
    finally:
        other.close()


def test_default_user_logs_in(dovecot: PrivateDovecot) -> None:
    with dovecot.client() as client:
        assert client.user == PrivateDovecot.user == "mirror"
        assert "INBOX" in client.mailboxes()


# --------------------------------------------------------------------------
# The client helpers


def test_append_flags_expunge_round_trip(imap_account: ImapAccount) -> None:
    client = imap_account.client
    first, second, third = (make_message(i, attachment_bytes=3000 * i) for i in range(1, 4))
    uid1 = client.append("INBOX", first, ["\\Seen"])
    uid2 = client.append("INBOX", second)
    uid3 = client.append("INBOX", third, ("\\Flagged", "$Label1"))
    assert uid1 < uid2 < uid3

    assert client.messages("INBOX") == {
        uid1: (frozenset({"\\Seen"}), first),
        uid2: (frozenset(), second),
        uid3: (frozenset({"\\Flagged", "$Label1"}), third),
    }
    # Looking did not mark anything read.
    assert client.flags("INBOX")[uid2] == frozenset()

    client.add_flags("INBOX", uid2, ["\\Answered", "\\Seen"])
    client.remove_flags("INBOX", uid3, ["$Label1"])
    client.set_flags("INBOX", uid1, ["\\Draft"])
    assert client.flags("INBOX") == {
        uid1: frozenset({"\\Draft"}),
        uid2: frozenset({"\\Answered", "\\Seen"}),
        uid3: frozenset({"\\Flagged"}),
    }

    client.expunge("INBOX", [uid2])
    assert client.uids("INBOX") == [uid1, uid3]
    assert client.status("INBOX")["MESSAGES"] == 2
    client.set_flags("INBOX", [uid1, uid3], [])
    assert set(client.flags("INBOX").values()) == {frozenset()}


def test_expunge_leaves_other_deleted_messages(imap_account: ImapAccount) -> None:
    client = imap_account.client
    keep = client.append("INBOX", make_message(1), ["\\Deleted"])
    gone = client.append("INBOX", make_message(2))
    client.expunge("INBOX", gone)
    assert client.flags("INBOX") == {keep: frozenset({"\\Deleted"})}


def test_non_ascii_and_nested_mailboxes(imap_account: ImapAccount) -> None:
    client = imap_account.client
    client.create("Entwürfe")
    client.create("Archive/2024")
    client.create("Archive/2024")  # exist_ok by default
    with pytest.raises(ImapCommandError):
        client.create("Archive/2024", exist_ok=False)
    assert {"INBOX", "Entwürfe", "Archive", "Archive/2024"} <= set(client.mailboxes())

    message = make_message(7)
    uid = client.append("Entwürfe", message, ["\\Draft"])
    assert client.messages("Entwürfe") == {uid: (frozenset({"\\Draft"}), message)}
    assert client.uidvalidity("Entwürfe") > 0

    # On the wire the name is modified UTF-7, as mirrord will see it.
    conn = imaplib.IMAP4(imap_account.host, imap_account.port, timeout=10)
    try:
        conn.login(imap_account.user, imap_account.password)
        _, listing = conn.list('""', '"*"')
    finally:
        conn.logout()
    assert any(b"Entw&APw-rfe" in line for line in listing if isinstance(line, bytes))

    client.delete("Entwürfe")
    assert "Entwürfe" not in client.mailboxes()


def test_uidvalidity_changes_when_a_mailbox_is_recreated(imap_account: ImapAccount) -> None:
    client = imap_account.client
    client.create("Recycled")
    before = client.uidvalidity("Recycled")
    client.delete("Recycled")
    client.create("Recycled")
    assert client.uidvalidity("Recycled") != before


def test_client_reconnects_after_a_kick(imap_account: ImapAccount, dovecot: PrivateDovecot) -> None:
    client = imap_account.client
    uid = client.append("INBOX", make_message(1))
    dovecot.doveadm("kick", imap_account.user)
    assert client.uids("INBOX") == [uid]
    assert client.append("INBOX", make_message(2)) > uid


# --------------------------------------------------------------------------
# Bulk fill


def test_fill_is_seen_over_imap_in_order(imap_account: ImapAccount) -> None:
    rng = random.Random(5)
    messages = [make_message(i, size=rng.randint(300, 8000), rng=rng) for i in range(400)]
    assert imap_account.fill("Archive/2024", messages) == 400

    client = imap_account.client
    assert client.status("Archive/2024")["MESSAGES"] == 400
    stored = client.messages("Archive/2024")
    assert [body for _, (_, body) in sorted(stored.items())] == messages
    assert set(flags for flags, _ in stored.values()) == {frozenset()}


def test_fill_inbox_with_flags_and_then_append(imap_account: ImapAccount) -> None:
    client = imap_account.client
    imap_account.fill("INBOX", [make_message(i) for i in range(20)], flags=["\\Seen", "\\Answered"])
    uid = client.append("INBOX", make_message(99))
    flags = client.flags("INBOX")
    assert len(flags) == 21 and max(flags) == uid
    assert flags[uid] == frozenset()
    assert all(flags[u] == frozenset({"\\Seen", "\\Answered"}) for u in flags if u != uid)
    with pytest.raises(ValueError):
        imap_account.fill("INBOX", [make_message(1)], flags=["$Keyword"])


def test_fill_a_mailbox_with_a_non_ascii_name(imap_account: ImapAccount) -> None:
    imap_account.fill("Entwürfe", [make_message(i) for i in range(5)])
    assert imap_account.client.status("Entwürfe")["MESSAGES"] == 5


# --------------------------------------------------------------------------
# Lifecycle


def test_second_instance_runs_alongside_stops_and_restarts(
    dovecot: PrivateDovecot, dovecot_factory: Factory
) -> None:
    second = dovecot_factory()
    assert {second.port, second.imaps_port}.isdisjoint({dovecot.port, dovecot.imaps_port})
    assert second.instance_name != dovecot.instance_name
    with second.client() as client:
        uid = client.append("INBOX", make_message(1))
    with dovecot.client() as client:
        client.uids("INBOX")  # the shared server is unaffected

    pid = second.pid
    assert pid is not None
    second.stop()
    assert not second.running
    assert not _alive(pid)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((second.host, second.port), timeout=5).close()

    # Back on the same ports with the same mail: what a reconnect test needs.
    ports = (second.port, second.imaps_port)
    second.start()
    assert (second.port, second.imaps_port) == ports
    with second.client() as client:
        assert client.uids("INBOX") == [uid]


def _alive(pid: int) -> bool:
    """True unless the process is gone or a zombie nobody has reaped yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_hidden_capabilities_and_connection_limit(dovecot_factory: Factory) -> None:
    server = dovecot_factory(imap_capability="IMAP4rev1 LITERAL+ UIDPLUS", max_connections=2)
    sessions = []
    try:
        for _ in range(2):
            conn = imaplib.IMAP4(server.host, server.port, timeout=10)
            conn.login(server.user, server.password)
            sessions.append(conn)
        capabilities = sessions[0].capability()[1][0].split()
        assert b"UIDPLUS" in capabilities
        assert b"IDLE" not in capabilities and b"CONDSTORE" not in capabilities

        third = imaplib.IMAP4(server.host, server.port, timeout=10)
        try:
            with pytest.raises(imaplib.IMAP4.error, match=r"\[LIMIT\]"):
                third.login(server.user, server.password)
        finally:
            third.shutdown()
    finally:
        for conn in sessions:
            conn.logout()


def test_stop_leaves_a_stranger_alone(tmp_path: Path) -> None:
    """A stale master.pid naming someone else's process must not get it killed."""
    server = PrivateDovecot(tmp_path / "never-started")
    server.base_dir.mkdir(parents=True)
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        (server.base_dir / "master.pid").write_text(f"{stranger.pid}\n")
        assert not server.running
        server.stop()
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_missing_dovecot_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mirrord.testing.dovecot, "DOVECOT", tmp_path / "no-such-dovecot")
    with pytest.raises(DovecotMissing, match="apt-get install dovecot-imapd"):
        PrivateDovecot(tmp_path / "server").start()


def test_bad_config_fails_with_dovecots_own_words(dovecot_factory: Factory) -> None:
    with pytest.raises(DovecotError, match="no_such_setting_anywhere"):
        dovecot_factory(extra_config="no_such_setting_anywhere = 1\n")


def test_root_under_pytest_of_user_is_refused_with_a_reason() -> None:
    """As root, a server under pytest's 0700 per-user dir would break when the next run resets it."""
    if os.geteuid() != 0:
        pytest.skip("only root hands Dovecot's processes to another user")
    with tempfile.TemporaryDirectory() as parent:
        private = Path(parent) / "pytest-of-someone"
        private.mkdir(mode=0o700)
        with pytest.raises(DovecotError, match="not searchable by 'nobody'"):
            PrivateDovecot(private / "server").start()
        assert stat.S_IMODE(private.stat().st_mode) == 0o700


# --------------------------------------------------------------------------
# Messages


def test_make_message_is_deterministic_realistic_mime() -> None:
    assert make_message(3) == make_message(3)
    assert make_message(3) != make_message(4)
    assert make_message(3, rng=random.Random(1)) == make_message(3, rng=random.Random(1))

    raw = make_message(3, size=5000, attachment_bytes=20_000, subject="Grüße aus Zürich")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert raw.isascii()  # 8-bit content only in encoded form
    assert 20_000 * 4 // 3 + 4000 < len(raw) < 20_000 * 4 // 3 + 7000

    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["Subject"] == "Grüße aus Zürich"
    ids = {email.message_from_bytes(make_message(i))["Message-ID"] for i in range(50)}
    assert len(ids) == 50
    assert message.get_content_type() == "multipart/mixed"
    body = message.get_body(("plain",))
    assert body is not None and body["Content-Transfer-Encoding"] == "quoted-printable"
    (attachment,) = message.iter_attachments()
    assert len(attachment.get_content()) == 20_000


@pytest.mark.parametrize("size", [1000, 5000, 100_000])
def test_make_message_size_is_close(size: int) -> None:
    lengths = [len(make_message(i, size=size)) for i in range(20)]
    assert all(size * 0.95 <= n <= size * 1.1 for n in lengths), lengths


def test_sample_mailboxes_round_trip(imap_account: ImapAccount) -> None:
    samples = sample_mailboxes(random.Random(1))
    assert set(samples) == {"INBOX", "Archive/2024", "Entwürfe"}
    assert 30 <= sum(len(v) for v in samples.values()) <= 60
    uids = mirrord.testing.populate(imap_account.client, samples)
    for mailbox, sent in samples.items():
        stored = imap_account.client.messages(mailbox)
        assert [stored[u] for u in uids[mailbox]] == [(s.flags, s.message) for s in sent]
