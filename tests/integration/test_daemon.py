"""``mirrord run`` against a real Dovecot: changes on the server show up locally, live.

The daemon runs as a separate process, as systemd would start it; a second
client changes the server, and the Maildir must follow without a restart.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from mirrord.testing import ImapAccount, make_message
from tests.integration._mirrord import (
    DaemonProcess,
    assert_mirrors,
    converged,
    local_messages,
    mirrors,
    wait_until,
    write_config,
)


def test_new_message_appears_while_running(imap_account: ImapAccount, tmp_path: Path) -> None:
    imap_account.client.append("INBOX", make_message(0), ())
    with DaemonProcess(write_config(tmp_path, imap_account)) as daemon:
        assert len(local_messages(tmp_path / "Mail" / "INBOX")) == 1
        imap_account.client.append("INBOX", make_message(1), ())
        wait_until(lambda: len(local_messages(tmp_path / "Mail" / "INBOX")) == 2, what="the new message")
        assert_mirrors(imap_account, tmp_path / "Mail", "INBOX")
        assert "1 new" in daemon.log
        assert "UID FETCH" not in daemon.log  # no trace without -v
    assert daemon.process is not None and daemon.process.returncode == 0


def test_burst_of_1000_from_4_clients_lands_exactly_once(imap_account: ImapAccount, tmp_path: Path) -> None:
    config = write_config(tmp_path, imap_account)
    with DaemonProcess(config):
        def append(start: int) -> None:
            with imap_account.dovecot.client(imap_account.user) as client:
                for i in range(start, start + 250):
                    client.append("INBOX", make_message(i, size=800), ())

        threads = [threading.Thread(target=append, args=(n * 250,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_until(lambda: len(local_messages(tmp_path / "Mail" / "INBOX")) >= 1000, 60, "1000 messages")
        wait_until(lambda: mirrors(imap_account, tmp_path / "Mail", "INBOX"), 30, "an exact mirror")
    local = local_messages(tmp_path / "Mail" / "INBOX")
    assert len(local) == 1000
    assert len({m.sha256 for m in local}) == 1000, "no message twice"


def test_expunges_remove_exactly_those_copies(imap_account: ImapAccount, tmp_path: Path) -> None:
    imap_account.fill("INBOX", [make_message(i, size=600) for i in range(300)])
    uids = imap_account.client.uids("INBOX")
    with DaemonProcess(write_config(tmp_path, imap_account)):
        assert len(local_messages(tmp_path / "Mail" / "INBOX")) == 300
        gone = uids[::3][:100]
        imap_account.client.expunge("INBOX", gone)
        wait_until(lambda: len(local_messages(tmp_path / "Mail" / "INBOX")) == 200, 30, "100 removals")
        assert_mirrors(imap_account, tmp_path / "Mail", "INBOX")


def test_flag_changes_follow(imap_account: ImapAccount, tmp_path: Path) -> None:
    client = imap_account.client
    uids = [client.append("INBOX", make_message(i), ()) for i in range(5)]
    client.add_flags("INBOX", uids[4], ["\\Seen"])
    with DaemonProcess(write_config(tmp_path, imap_account)):
        client.add_flags("INBOX", uids[0], ["\\Seen", "\\Flagged"])
        client.add_flags("INBOX", uids[1], ["\\Answered"])
        client.remove_flags("INBOX", uids[4], ["\\Seen"])
        wait_until(lambda: mirrors(imap_account, tmp_path / "Mail", "INBOX"), what="flags to follow")
        client.remove_flags("INBOX", uids[0], ["\\Flagged"])
        wait_until(lambda: mirrors(imap_account, tmp_path / "Mail", "INBOX"), what="a flag to be cleared")


def test_new_message_with_flags_set_at_once(imap_account: ImapAccount, tmp_path: Path) -> None:
    """A flag change right after arrival, while the new UID is being learned, is not lost."""
    client = imap_account.client
    with DaemonProcess(write_config(tmp_path, imap_account)):
        for i in range(5):
            uid = client.append("INBOX", make_message(i), ())
            client.add_flags("INBOX", uid, ["\\Seen"])
        wait_until(lambda: mirrors(imap_account, tmp_path / "Mail", "INBOX"), what="the mirror")


def test_mail_appended_while_stopped_arrives_on_start(imap_account: ImapAccount, tmp_path: Path) -> None:
    config = write_config(tmp_path, imap_account)
    client = imap_account.client
    client.append("INBOX", make_message(0), ())
    with DaemonProcess(config):
        pass
    client.append("INBOX", make_message(1), ())
    client.create("Later")
    client.append("Later", make_message(2), ())
    with DaemonProcess(config):
        assert_mirrors(imap_account, tmp_path / "Mail", "INBOX")
        assert_mirrors(imap_account, tmp_path / "Mail", "Later")


def test_several_mailboxes_are_watched_independently(imap_account: ImapAccount, tmp_path: Path) -> None:
    client = imap_account.client
    client.create("Lists/dev")
    with DaemonProcess(write_config(tmp_path, imap_account)) as daemon:
        assert "2 watched with IDLE" in daemon.log
        client.append("Lists/dev", make_message(1), ())
        client.append("INBOX", make_message(2), ())
        wait_until(lambda: mirrors(imap_account, tmp_path / "Mail", "Lists/dev"), what="Lists/dev")
        wait_until(lambda: mirrors(imap_account, tmp_path / "Mail", "INBOX"), what="INBOX")


def test_mailboxes_beyond_the_connection_budget_are_polled(imap_account: ImapAccount, tmp_path: Path) -> None:
    client = imap_account.client
    for name in ("A", "B", "C"):
        client.create(name)
    extra = "    max_connections: 4\n    poll_interval: 2s\n"
    with DaemonProcess(write_config(tmp_path, imap_account, extra=extra)) as daemon:
        # 3 workers + 1 watcher: INBOX is watched, A, B, C polled.
        assert "1 watched with IDLE, 3 polled" in daemon.log
        assert "polled (no connection left under max_connections=4): A, B, C" in daemon.log
        client.append("B", make_message(1), ())
        wait_until(lambda: mirrors(imap_account, tmp_path / "Mail", "B"), 15, "a polled mailbox")


def test_sigint_stops_cleanly_too(imap_account: ImapAccount, tmp_path: Path) -> None:
    daemon = DaemonProcess(write_config(tmp_path, imap_account))
    daemon.start()
    # Once (CI, 2026-12-05) the daemon was still running 20 s after SIGINT
    # and this said only -9: the log says where it stood.
    assert daemon.stop(signal.SIGINT) == 0, daemon.log
    assert "Traceback" not in daemon.log and "Unhandled" not in daemon.log


def test_a_mailbox_recreated_while_watched_is_rematched_at_the_next_renewal(
    imap_account: ImapAccount, tmp_path: Path
) -> None:
    client = imap_account.client
    client.create("Work")
    messages = [make_message(i) for i in range(4)]
    for m in messages:
        client.append("Work", m, ("\\Seen",))
    config = write_config(tmp_path, imap_account, extra="    idle_renew: 10s\n")
    with DaemonProcess(config) as daemon:
        old_inodes = {m.path.stat().st_ino for m in local_messages(tmp_path / "Mail" / "Work")}
        client.delete("Work")
        client.create("Work")
        client.close()
        # Dovecot tells a session nothing when its selected mailbox is recreated;
        # the watcher finds out when it renews IDLE and looks again.
        imap_account.fill("Work", [*messages, make_message(50)], flags=("\\Seen",))
        # Generous: for a while after a recreation Dovecot may answer "Mailbox
        # was deleted under us" to sessions, mirrord's included; it retries.
        converged(imap_account, tmp_path / "Mail", "Work", timeout=90)
        daemon.wait_for_log("re-matched to their new UIDs")
    assert old_inodes <= {m.path.stat().st_ino for m in local_messages(tmp_path / "Mail" / "Work")}


def test_a_mailbox_whose_folder_cannot_be_made_leaves_the_others_watched(
    imap_account: ImapAccount, tmp_path: Path
) -> None:
    client = imap_account.client
    for name in ("Aaa", "Zed"):
        client.create(name)
    (tmp_path / "Mail").mkdir(mode=0o700)
    (tmp_path / "Mail" / "Aaa").write_text("not a folder\n")
    with DaemonProcess(write_config(tmp_path, imap_account)) as daemon:
        assert "test/Aaa: FAILED" in daemon.log
        client.append("INBOX", make_message(1), ())
        client.append("Zed", make_message(2), ())
        converged(imap_account, tmp_path / "Mail", "INBOX")
        converged(imap_account, tmp_path / "Mail", "Zed")
        assert local_messages(tmp_path / "Mail" / "INBOX"), "arrived"
