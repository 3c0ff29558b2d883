"""Two-way sync against the private Dovecot: a reader's changes reach the server (issue #12).

Readers are imitated the way they change files: plain renames and unlinks
(neomutt, aerc), Python's ``mailbox.Maildir`` (what many scripts and some
readers use), and a save into another folder. Each case runs with every
extension Dovecot offers and with UIDPLUS, MOVE, CONDSTORE and QRESYNC
hidden, where mirrord must fall back (COPY + \\Deleted, no UID EXPUNGE,
finding the new UID by Message-ID and size).
"""

from __future__ import annotations

import json
import mailbox
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

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

HIDDEN = ("UIDPLUS", "MOVE", "CONDSTORE", "QRESYNC")


@pytest.fixture(params=["all-extensions", "without-uidplus-move-condstore"])
def account(request: pytest.FixtureRequest, dovecot_factory: Callable[..., PrivateDovecot]) -> ImapAccount:
    server = dovecot_factory(hide_capabilities=HIDDEN) if request.param != "all-extensions" else dovecot_factory()
    return server.new_account("twoway")


def run_once(config: Path, *extra: str) -> str:
    run = mirrord("-v", "-c", str(config), "run", "--once", *extra)
    with open(config.parent / "runs.log", "a") as log:
        log.write(run.stderr)
    assert run.status == 0, run.stderr[-3000:]
    return run.stderr


def setup(account: ImapAccount, tmp_path: Path, extra: str = "") -> Path:
    client = account.client
    client.create("Archive")
    for i in range(8):
        client.append("INBOX", make_message(i, size=1500), ("\\Seen",) if i % 2 else ())
    for i in range(8, 11):
        client.append("Archive", make_message(i, size=1500), ("\\Seen",))
    config = write_config(tmp_path, account, extra=extra)
    run_once(config)
    with sqlite3.connect(tmp_path / "state" / "state.sqlite3") as db:
        ids = {mid for (mid,) in db.execute("SELECT message_id FROM message")}
    assert ids == {mid(i) for i in range(11)}, "each Message-ID recorded as its message was fetched"
    return config


def file_of(root: Path, mailbox: str, message_id: str) -> Path:
    for m in local_messages(root / mailbox):
        if f"Message-ID: {message_id}".encode() in m.path.read_bytes():
            return m.path
    raise AssertionError(f"{message_id} not in {mailbox}")


def server_ids(account: ImapAccount, mailbox: str) -> dict[str, frozenset[str]]:
    """Message-ID -> flags (\\Recent left out) of what the server has."""
    out = {}
    for flags, body in account.client.messages(mailbox).values():
        mid = next(line for line in body.split(b"\r\n") if line.lower().startswith(b"message-id:"))
        out[mid.split(b":", 1)[1].strip().decode()] = frozenset(flags) - {"\\Recent"}
    return out


def mid(i: int) -> str:
    return next(
        line for line in make_message(i, size=1500).split(b"\n") if line.lower().startswith(b"message-id:")
    ).split(b":", 1)[1].strip().decode()


def test_flags_deletions_moves_and_new_files_reach_the_server(account: ImapAccount, tmp_path: Path) -> None:
    config = setup(account, tmp_path)
    root = tmp_path / "Mail"
    # A flag change as neomutt does it: a rename that changes the letters.
    path = file_of(root, "INBOX", mid(0))
    key = path.name.split(":2,")[0]
    os.rename(path, root / "INBOX" / "cur" / f"{key}:2,FS")
    # Unread again: S taken off a read message.
    path = file_of(root, "INBOX", mid(1))
    os.rename(path, path.with_name(path.name.split(":2,")[0] + ":2,"))
    # A deletion.
    file_of(root, "INBOX", mid(2)).unlink()
    # A move to another folder, the way a reader does it: one rename.
    path = file_of(root, "INBOX", mid(3))
    os.rename(path, root / "Archive" / path.parent.name / path.name)
    # A rename within the folder (mu gives moved files new names).
    path = file_of(root, "INBOX", mid(4))
    os.rename(path, root / "INBOX" / "cur" / ("renamed-by-mu:2," + path.name.partition(":2,")[2]))
    # A flag set through Python's mailbox module (it rewrites the file under its key).
    inbox_box = mailbox.Maildir(root / "INBOX", create=False)
    for key, message in inbox_box.iteritems():
        if message["Message-ID"] == mid(5):
            message.add_flag("F")
            message.set_subdir("cur")
            inbox_box[key] = message
    # A saved copy, through Python's mailbox module.
    box = mailbox.Maildir(root / "Archive", create=False)
    saved = make_message(50, size=1200)
    box.add(mailbox.MaildirMessage(saved))

    run_once(config)

    inbox, archive = server_ids(account, "INBOX"), server_ids(account, "Archive")
    assert inbox[mid(0)] == {"\\Flagged", "\\Seen"}
    assert inbox[mid(1)] == frozenset()
    assert inbox[mid(5)] == {"\\Flagged", "\\Seen"}
    # Without UIDPLUS no UID EXPUNGE: deleted and moved-away originals stay, marked \Deleted.
    deleted_kept = any("\\Deleted" in f for f in account.client.flags("INBOX").values())
    assert mid(2) not in inbox or (deleted_kept and "\\Deleted" in inbox[mid(2)])
    assert mid(3) not in inbox or (deleted_kept and "\\Deleted" in inbox[mid(3)])
    assert mid(3) in archive and mid(4) in inbox
    assert mid(50) in archive
    # Nothing was downloaded back or uploaded twice: each side has each message once.
    assert len(account.client.uids("Archive")) == 5
    for name in ("INBOX", "Archive"):
        local = [m.path.read_bytes() for m in local_messages(root / name)]
        assert len(local) == len(set(local)), f"{name}: a message twice"
    # A second run changes nothing and reverts nothing.
    before = sorted(p.path.name for p in local_messages(root / "INBOX"))
    run_once(config)
    assert sorted(p.path.name for p in local_messages(root / "INBOX")) == before
    if not deleted_kept:
        assert_mirrors(account, root, "INBOX")
    assert_mirrors(account, root, "Archive")


def test_a_server_change_and_a_local_change_to_one_message_both_survive(
    account: ImapAccount, tmp_path: Path
) -> None:
    config = setup(account, tmp_path)
    root = tmp_path / "Mail"
    path = file_of(root, "INBOX", mid(0))  # unread
    os.rename(path, root / "INBOX" / "cur" / (path.name.split(":2,")[0] + ":2,S"))  # read locally
    uid = account.client.uids("INBOX")[0]
    account.client.add_flags("INBOX", uid, ["\\Flagged"])  # flagged on the server meanwhile
    run_once(config)
    assert server_ids(account, "INBOX")[mid(0)] == {"\\Seen", "\\Flagged"}
    assert file_of(root, "INBOX", mid(0)).name.endswith(":2,FS")


def test_pull_mode_reverts_local_changes(account: ImapAccount, tmp_path: Path) -> None:
    config = setup(account, tmp_path, extra="    sync: pull\n")
    root = tmp_path / "Mail"
    file_of(root, "INBOX", mid(2)).unlink()
    path = file_of(root, "INBOX", mid(0))
    os.rename(path, root / "INBOX" / "cur" / (path.name.split(":2,")[0] + ":2,S"))
    run_once(config)
    assert mid(2) in server_ids(account, "INBOX")
    assert server_ids(account, "INBOX")[mid(0)] == frozenset()
    assert_mirrors(account, root, "INBOX")


@pytest.mark.parametrize("policy", ["flag", "keep"])
def test_local_delete_policies(account: ImapAccount, tmp_path: Path, policy: str) -> None:
    config = setup(account, tmp_path, extra=f"    local_delete: {policy}\n")
    root = tmp_path / "Mail"
    file_of(root, "INBOX", mid(2)).unlink()
    run_once(config)
    run_once(config)
    ids = server_ids(account, "INBOX")
    assert mid(2) in ids
    if policy == "flag":
        assert "\\Deleted" in ids[mid(2)]
        assert not any(b"Message-ID: " + mid(2).encode() in m.path.read_bytes()
                       for m in local_messages(root / "INBOX"))
    else:
        assert "\\Deleted" not in ids[mid(2)]
        assert_mirrors(account, root, "INBOX")


def test_a_folder_that_lost_most_files_sends_nothing_until_allowed(account: ImapAccount, tmp_path: Path) -> None:
    config = setup(account, tmp_path)
    root = tmp_path / "Mail"
    for m in local_messages(root / "INBOX")[:7]:
        m.path.unlink()
    run = mirrord("-c", str(config), "run", "--once")
    assert run.status != 0
    assert "--allow-delete test/INBOX" in run.stderr
    assert len(account.client.uids("INBOX")) == 8
    assert not any("\\Deleted" in f for f in account.client.flags("INBOX").values())
    run_once(config, "--allow-delete", "test/INBOX")
    kept = [f for f in server_ids(account, "INBOX").values() if "\\Deleted" not in f]
    assert len(kept) == 1


def test_the_daemon_sends_a_readers_changes_within_a_second(account: ImapAccount, tmp_path: Path) -> None:
    """Renames, an unlink, a move and a saved copy while ``mirrord run`` runs: each reaches the server."""
    config = setup(account, tmp_path)
    root = tmp_path / "Mail"
    with DaemonProcess(config) as daemon:
        path = file_of(root, "INBOX", mid(0))
        started = time.monotonic()
        os.rename(path, root / "INBOX" / "cur" / (path.name.partition(":2,")[0] + ":2,FS"))
        wait_until(lambda: server_ids(account, "INBOX")[mid(0)] == {"\\Flagged", "\\Seen"}, 10, "the flag change")
        flag_latency = time.monotonic() - started
        file_of(root, "INBOX", mid(2)).unlink()
        def deleted() -> bool:
            ids = server_ids(account, "INBOX")  # once: the message may go between two looks
            return mid(2) not in ids or "\\Deleted" in ids[mid(2)]

        wait_until(deleted, 10, "the deletion")
        path = file_of(root, "INBOX", mid(3))
        os.rename(path, root / "Archive" / path.parent.name / path.name)
        wait_until(lambda: mid(3) in server_ids(account, "Archive"), 10, "the move")
        box = mailbox.Maildir(root / "Archive", create=False)
        box.add(mailbox.MaildirMessage(make_message(60, size=900)))
        wait_until(lambda: mid(60) in server_ids(account, "Archive"), 10, "the saved copy")
        # Settled: nothing comes back twice, nothing is reverted.
        time.sleep(1.5)
        archive = [m.path.read_bytes() for m in local_messages(root / "Archive")]
        assert len(archive) == len(set(archive)) == 5
        assert file_of(root, "INBOX", mid(0)).name.endswith(":2,FS")
        assert "sent local changes to the server" in daemon.log
        assert "1 move" in daemon.log, "the move went as a UID MOVE, not a deletion and an upload"
    assert flag_latency < 3.0, flag_latency


@pytest.mark.parametrize("point", ["after-store", "after-expunge", "before-move", "after-move", "after-append"])
def test_a_kill_at_any_step_neither_loses_nor_repeats_a_local_change(
    account: ImapAccount, tmp_path: Path, point: str
) -> None:
    """SIGKILL at each step of sending (see mirrord/_crashpoints.py), then a normal run."""
    config = setup(account, tmp_path)
    root = tmp_path / "Mail"
    path = file_of(root, "INBOX", mid(0))
    os.rename(path, root / "INBOX" / "cur" / (path.name.partition(":2,")[0] + ":2,FS"))
    file_of(root, "INBOX", mid(2)).unlink()
    path = file_of(root, "INBOX", mid(3))
    os.rename(path, root / "Archive" / path.parent.name / path.name)
    mailbox.Maildir(root / "Archive", create=False).add(mailbox.MaildirMessage(make_message(70, size=1000)))

    killed = mirrord("-c", str(config), "run", "--once", env={"MIRRORD_TEST_CRASH_AT": point})
    # Without UIDPLUS nothing is expunged, and that point is never reached.
    assert killed.status in ((-9, 0) if point == "after-expunge" else (-9,)), (point, killed.stderr[-2000:])
    run_once(config)
    run_once(config)

    inbox, archive = server_ids(account, "INBOX"), server_ids(account, "Archive")
    live_inbox = {m for m, f in inbox.items() if "\\Deleted" not in f}
    assert inbox[mid(0)] == {"\\Flagged", "\\Seen"}
    assert mid(2) not in live_inbox and mid(3) not in live_inbox
    assert mid(3) in archive and mid(70) in archive
    assert len(account.client.uids("Archive")) == len(archive) == 5, "a message sent twice"
    for name in ("INBOX", "Archive"):
        local = [m.path.read_bytes() for m in local_messages(root / name)]
        assert len(local) == len(set(local)), f"{name}: a message twice"
    assert_mirrors(account, root, "Archive")
    assert len(local_messages(root / "INBOX")) == len(live_inbox)


def test_a_folder_made_locally_is_created_on_the_server_with_its_mail(account: ImapAccount, tmp_path: Path) -> None:
    """neomutt's save to a new folder: the Maildir appears, then the message; both reach the server."""
    config = setup(account, tmp_path)
    root = tmp_path / "Mail"
    (root / "Projects").mkdir()
    box = mailbox.Maildir(root / "Projects" / "2026", create=True)
    box.add(mailbox.MaildirMessage(make_message(80, size=900)))
    run_once(config)
    names = account.client.mailboxes()
    created = [n for n in names if n.replace(".", "/") == "Projects/2026"]
    assert created, names
    assert mid(80) in server_ids(account, created[0])
    run_once(config)
    assert len(account.client.uids(created[0])) == 1, "uploaded once"
    assert len(local_messages(root / "Projects" / "2026")) == 1, "not fetched back next to itself"


def test_a_maildir_that_predates_mirrord_is_not_uploaded(account: ImapAccount, tmp_path: Path) -> None:
    """The first sync never creates folders: another tool's Maildir must not be copied to the server."""
    root = tmp_path / "Mail"
    root.mkdir()
    mailbox.Maildir(root / "OldTool.Sent", create=True).add(mailbox.MaildirMessage(make_message(90, size=900)))
    account.client.append("INBOX", make_message(91, size=900), ())
    config = write_config(tmp_path, account)
    run_once(config)
    run_once(config)
    assert not any("OldTool" in n for n in account.client.mailboxes())


def test_the_daemon_creates_a_folder_made_locally_within_seconds(account: ImapAccount, tmp_path: Path) -> None:
    config = setup(account, tmp_path)
    root = tmp_path / "Mail"
    with DaemonProcess(config):
        box = mailbox.Maildir(root / "Lists", create=True)
        box.add(mailbox.MaildirMessage(make_message(85, size=900)))
        wait_until(lambda: "Lists" in account.client.mailboxes(), 10, "the folder on the server")
        wait_until(lambda: mid(85) in server_ids(account, "Lists"), 10, "its message on the server")
        time.sleep(1.0)
        assert len(local_messages(root / "Lists")) == 1, "not fetched back next to itself"
        assert len(account.client.uids("Lists")) == 1


def test_the_daemon_holds_a_mass_disappearance_and_status_says_so(account: ImapAccount, tmp_path: Path) -> None:
    config = setup(account, tmp_path)
    root = tmp_path / "Mail"
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(runtime)}

    def inbox_row() -> dict[str, object]:
        data = json.loads(mirrord("-c", str(config), "status", "--json", env=env).stdout)
        (row,) = [r for r in data["mailboxes"] if r["mailbox"] == "INBOX"]
        return row

    with DaemonProcess(config, env=env) as daemon:
        for m in local_messages(root / "INBOX")[:7]:
            m.path.unlink()
        wait_until(lambda: "local changes not sent" in str(inbox_row().get("last_error")), 10, "status to say so")
        assert "--allow-delete test/INBOX" in daemon.log
    assert not any("\\Deleted" in f for f in account.client.flags("INBOX").values())
    assert len(account.client.uids("INBOX")) == 8


QUOTA = """
mail_plugins = $mail_plugins quota
plugin {
  quota = maildir:User quota
  quota_rule = *:storage=60K
}
"""


def test_an_upload_the_server_refuses_stays_local_and_the_rest_goes_on(
    dovecot_factory: Callable[..., PrivateDovecot], tmp_path: Path
) -> None:
    account = dovecot_factory(extra_config=QUOTA).new_account("quota")
    config = setup(account, tmp_path)  # 11 messages of 1.5 kB: well under the quota
    root = tmp_path / "Mail"
    big = mailbox.Maildir(root / "Archive", create=False).add(mailbox.MaildirMessage(make_message(95, size=200_000)))
    path = file_of(root, "INBOX", mid(0))
    os.rename(path, root / "INBOX" / "cur" / (path.name.partition(":2,")[0] + ":2,FS"))
    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 1, run.stderr
    assert "Quota exceeded" in run.stderr and "refused a new message" in run.stderr, run.stderr
    assert server_ids(account, "INBOX")[mid(0)] == {"\\Flagged", "\\Seen"}, "the rest went on"
    assert mid(95) not in server_ids(account, "Archive")
    assert any(big in m.path.name for m in local_messages(root / "Archive")), "the file stays"


def test_without_appenduid_or_copyuid_the_new_uid_is_found_or_the_servers_copy_fetched(
    dovecot_factory: Callable[..., PrivateDovecot], tmp_path: Path
) -> None:
    """RFC 3501 servers without UIDPLUS say nothing of the UID an APPEND or COPY made.

    Dovecot says it even with UIDPLUS hidden, so the proxy strips the codes.
    A file with a Message-ID is found by it and its size above the UIDNEXT
    read before; one without (nothing to find it by) goes to the trash and
    the server's copy is fetched in its place. Either way each message is
    there once, on each side, with its bytes.
    """
    from mirrord.store.maildir import trash_dir
    from mirrord.testing.faultproxy import FaultProxy

    account = dovecot_factory(hide_capabilities=HIDDEN).new_account("nouid")
    account.client.create("Archive")
    for i in range(3):
        account.client.append("INBOX", make_message(i, size=1500))
    with FaultProxy(account.host, account.port) as proxy:
        proxy.rewrite(rb"\[(APPENDUID|COPYUID) [^]]*\] ?", b"")
        config = write_config(tmp_path, account, tls="none", host="127.0.0.1", ca_file=None, port=proxy.port)
        run_once(config)
        root = tmp_path / "Mail"
        with_id = make_message(60, size=1300).replace(b"\r\n", b"\n")
        without_id = b"\n".join(
            line for line in make_message(61, size=1300).replace(b"\r\n", b"\n").split(b"\n")
            if not line.lower().startswith(b"message-id:")
        )
        (root / "INBOX" / "new" / "saved-by-a-reader").write_bytes(with_id)
        (root / "INBOX" / "new" / "no-message-id").write_bytes(without_id)
        moved = file_of(root, "INBOX", mid(0))
        os.rename(moved, root / "Archive" / "cur" / moved.name)

        log = run_once(config)

        assert "did not say which UID" in log, "the message without a Message-ID was given up on"
        for name in ("INBOX", "Archive"):
            server = sorted(body.replace(b"\r\n", b"\n")
                            for flags, body in account.client.messages(name).values() if "\\Deleted" not in flags)
            local = sorted(m.path.read_bytes() for m in local_messages(root / name))
            assert local == server, f"{name}: each message once on each side, byte for byte"
        inbox_files = {m.path.name.split(":2,")[0] for m in local_messages(root / "INBOX")}
        assert "saved-by-a-reader" in inbox_files, "found by Message-ID: the file keeps its name, nothing fetched"
        assert "no-message-id" not in inbox_files, "its place is taken by the server's copy"
        trash = trash_dir(tmp_path / "state", "trash", "test", "INBOX")
        assert [p.read_bytes() for p in trash.glob("*-no-message-id")] == [without_id]
        assert mid(0) in server_ids(account, "Archive")
        # Settled: the next run sends and fetches nothing.
        before = {name: sorted(m.path.name for m in local_messages(root / name)) for name in ("INBOX", "Archive")}
        run_once(config)
        assert {name: sorted(m.path.name for m in local_messages(root / name)) for name in ("INBOX", "Archive")} == before


def test_a_catch_up_with_nothing_changed_locally_does_not_list_the_maildir(
    account: ImapAccount, tmp_path: Path
) -> None:
    """The last pull's exact Maildir stamp tells the round there is nothing to send (issue #15);
    a reader's rename, new file or deletion changes the stamp, and is sent."""
    config = setup(account, tmp_path)
    root = tmp_path / "Mail"
    quiet = run_once(config)
    assert "INBOX: Maildir as the last sync left it: nothing to send" in quiet
    assert "Archive: Maildir as the last sync left it: nothing to send" in quiet
    path = file_of(root, "INBOX", mid(2))
    os.rename(path, root / "INBOX" / "cur" / (path.name.partition(":2,")[0] + ":2,F"))
    mailbox.Maildir(root / "Archive", create=False).add(mailbox.MaildirMessage(make_message(96, size=1500)))
    busy = run_once(config)
    assert "INBOX: Maildir as the last sync left it" not in busy
    assert "Archive: Maildir as the last sync left it" not in busy
    assert server_ids(account, "INBOX")[mid(2)] == {"\\Flagged"}
    assert mid(96) in server_ids(account, "Archive")
    os.unlink(file_of(root, "INBOX", mid(4)))
    run_once(config)
    ids = server_ids(account, "INBOX")
    assert mid(4) not in ids or "\\Deleted" in ids[mid(4)], "expunged, or marked where there is no UIDPLUS"


def test_a_refused_upload_is_tried_again_by_a_catch_up_that_changed_nothing(
    dovecot_factory: Callable[..., PrivateDovecot], tmp_path: Path
) -> None:
    """A file no row names keeps the Maildir stamp inexact, so the next round looks again."""
    account = dovecot_factory(extra_config=QUOTA).new_account("quota")
    config = setup(account, tmp_path)
    root = tmp_path / "Mail"
    mailbox.Maildir(root / "Archive", create=False).add(mailbox.MaildirMessage(make_message(95, size=200_000)))
    for _ in range(2):
        run = mirrord("-v", "-c", str(config), "run", "--once")
        assert run.status == 1, run.stderr
        assert "refused a new message" in run.stderr, run.stderr
        assert "Archive: Maildir as the last sync left it" not in run.stderr
    assert "INBOX: Maildir as the last sync left it: nothing to send" in run.stderr
