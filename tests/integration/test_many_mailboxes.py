"""Many mailboxes under a connection cap (issue 13): the server's limit respected, the rest polled cheaply."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mirrord.testing import PrivateDovecot, make_message
from tests.integration._mirrord import (
    DaemonProcess,
    mirrord,
    mirrors,
    wait_until,
    write_config,
)

LIMIT_TEXT = "Maximum number of connections from user+IP exceeded"


def _refusals(server: PrivateDovecot) -> int:
    return server.log_path.read_text(errors="replace").count(LIMIT_TEXT) if server.log_path.exists() else 0


def test_a_server_cap_below_max_connections_shrinks_the_budget_once(
    dovecot_factory: Callable[..., PrivateDovecot], tmp_path: Path
) -> None:
    # The config says 12 (3 workers + 9 watchers); the server allows 5, and
    # the test's own client (a mail reader, say) holds one of them. (Dovecot
    # counts logins asynchronously: a burst may get a few past its cap, hence
    # a wide margin.)
    server = dovecot_factory(max_connections=5)
    account = server.new_account("capped")
    names = ["A", "B", "C", "D", "E", "F", "G", "H", "I"]
    for name in names:
        account.client.create(name)
    extra = "    max_connections: 12\n    poll_interval: 2s\n"
    config = write_config(tmp_path, account, extra=extra)
    for _attempt in range(3):
        # Dovecot's login processes learn the count from its anvil process
        # asynchronously, so a burst of logins can slip past the cap. Then
        # nobody was refused and there is nothing to test: start again.
        refused_before = _refusals(server)
        daemon = DaemonProcess(config)
        daemon.start()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and "the server refused a connection beyond" not in daemon.log:
            time.sleep(0.05)
        if _refusals(server) > refused_before:
            break
        daemon.stop()
    else:
        pytest.fail("Dovecot never refused a connection over its cap")
    try:
        assert "the server refused a connection beyond" in daemon.log
        # No reconnect loop: the server sees no new refused logins after the budget shrank.
        time.sleep(0.5)
        before = _refusals(server)
        time.sleep(3.0)  # a watcher's first reconnect comes after 0.5-1 s
        assert _refusals(server) == before, "mirrord kept trying connections beyond the server's cap"
        assert daemon.log.count("the server refused a connection beyond") == 1
        assert "watcher disconnected" not in daemon.log
        for i, name in enumerate(["INBOX", *names]):
            account.client.append(name, make_message(i), ())
        for name in ["INBOX", *names]:
            wait_until(lambda name=name: mirrors(account, tmp_path / "Mail", name), 20, f"{name} to follow")
    except BaseException:
        print(f"--- mirrord's log ---\n{daemon.log}")
        raise
    finally:
        daemon.stop()


def _polled_mail_arrives(server: PrivateDovecot, tmp_path: Path, method: str) -> None:
    """8 mailboxes, room for one watcher: the watch: name gets it, the rest are polled with ``method``."""
    account = server.new_account("polled")
    names = [f"Lists/{i}" for i in range(7)]
    for name in names:
        account.client.create(name)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    extra = "    max_connections: 4\n    poll_interval: 1s\n    watch: [Lists/3]\n"
    config = write_config(tmp_path, account, extra=extra)
    with DaemonProcess(config, env=env) as daemon:
        daemon.wait_for_log(f"polling the mailboxes without a watcher with {method}")
        data = json.loads(mirrord("-c", str(config), "status", "--json", env=env).stdout)
        how = {r["mailbox"]: r["watched_by"] for r in data["mailboxes"]}
        every = "LIST-STATUS every 1 s" if method == "one LIST-STATUS" else "STATUS every 1 s"
        assert how == {"Lists/3": "IDLE", "INBOX": every, **{n: every for n in names if n != "Lists/3"}}
        shown = mirrord("-c", str(config), "status", env=env).stdout
        assert f"polling ({every})" in shown
        started = time.monotonic()
        account.client.append("Lists/5", make_message(1), ())
        wait_until(lambda: mirrors(account, tmp_path / "Mail", "Lists/5"), 10, "mail in a polled mailbox")
        # Within the poll interval and a second (a loaded test machine gets one more).
        assert time.monotonic() - started < 3.0


def test_without_notify_unwatched_mailboxes_are_polled_with_one_list_status(
    dovecot_factory: Callable[..., PrivateDovecot], tmp_path: Path
) -> None:
    _polled_mail_arrives(dovecot_factory(hide_capabilities=("NOTIFY",)), tmp_path, "one LIST-STATUS")


def test_without_list_status_they_are_polled_with_pipelined_status(
    dovecot_factory: Callable[..., PrivateDovecot], tmp_path: Path
) -> None:
    server = dovecot_factory(hide_capabilities=("NOTIFY", "LIST-STATUS"))
    _polled_mail_arrives(server, tmp_path, "pipelined STATUS")


def test_with_notify_mail_and_folders_outside_the_watched_set_arrive_live(
    dovecot: PrivateDovecot, tmp_path: Path
) -> None:
    """NOTIFY on Dovecot: with polling at 10 minutes, only NOTIFY can explain anything arriving in seconds."""
    account = dovecot.new_account("notified")
    names = [f"Lists/{i}" for i in range(6)]
    for name in names:
        account.client.create(name)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    # 3 workers + 1 NOTIFY connection + 1 watcher (INBOX).
    config = write_config(tmp_path, account, extra="    max_connections: 5\n    poll_interval: 10m\n")
    mail = tmp_path / "Mail"
    with DaemonProcess(config, env=env) as daemon:
        daemon.wait_for_log("NOTIFY: listening")
        assert "1 watched with IDLE, 6 polled" in daemon.log
        data = json.loads(mirrord("-c", str(config), "status", "--json", env=env).stdout)
        how = {r["mailbox"]: r["watched_by"] for r in data["mailboxes"]}
        assert how["INBOX"] == "IDLE" and how["Lists/2"].startswith("NOTIFY")
        account.client.append("Lists/4", make_message(1), ())
        wait_until(lambda: mirrors(account, mail, "Lists/4"), 5, "mail in an unwatched mailbox, by NOTIFY")
        account.client.create("Fresh")
        account.client.append("Fresh", make_message(2), ())
        wait_until(lambda: mirrors(account, mail, "Fresh"), 5, "a folder created on the server")
        account.client.delete("Lists/5")
        wait_until(lambda: not (mail / "Lists/5" / "cur").exists(), 5, "a deleted folder set aside")
        account.client.rename("Lists/1", "Renamed")
        wait_until(lambda: (mail / "Renamed" / "cur").exists() and not (mail / "Lists/1" / "cur").exists(), 5,
                   "a renamed folder")
