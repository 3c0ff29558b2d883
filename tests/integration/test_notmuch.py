"""A real notmuch over the mirror: its tag changes reach the server (issue #12).

notmuch with ``maildir.synchronize_flags`` turns tag changes into renames:
``-unread`` adds S (and moves a file from new/ to cur/), ``+flagged`` adds F.
That is the reader the issue names, run as users run it: its database lives
in the mirror's Maildir root (``.notmuch/`` next to the folders), its config
comes from ``NOTMUCH_CONFIG``. Checked in ``run --once`` and in the daemon,
and the other way round: a flag set on the server reaches notmuch's tags at
its next ``notmuch new``, so neither side reverts the other. With every
extension Dovecot offers (the default run) and, marked slow, with UIDPLUS,
MOVE, CONDSTORE and QRESYNC hidden (plain STOREs, no UNCHANGEDSINCE).

Skipped when notmuch is not installed, except under CI (``CI`` set), where
.ci/run installs it and its absence would silently drop the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mirrord.testing import ImapAccount, PrivateDovecot, make_message
from tests._needs import missing
from tests.integration._mirrord import DaemonProcess, assert_mirrors, local_messages, mirrord, wait_until, write_config

NOTMUCH = shutil.which("notmuch")
HIDDEN = ("UIDPLUS", "MOVE", "CONDSTORE", "QRESYNC")


@pytest.fixture
def notmuch_env(tmp_path: Path) -> dict[str, str]:
    """NOTMUCH_CONFIG for a database over ``tmp_path/Mail`` that syncs tags and Maildir flags."""
    if NOTMUCH is None:
        missing("notmuch is not installed; run `apt-get install notmuch`")
    config = tmp_path / "notmuch-config"
    config.write_text(
        "[database]\n"
        f"path={tmp_path / 'Mail'}\n"
        "[user]\n"
        "name=Test User\n"
        "primary_email=test@example.org\n"
        "[new]\n"
        "tags=unread;inbox;\n"
        "ignore=\n"
        "[search]\n"
        "exclude_tags=\n"
        "[maildir]\n"
        "synchronize_flags=true\n"
    )
    return {**os.environ, "NOTMUCH_CONFIG": str(config)}


def notmuch(env: dict[str, str], *args: str) -> str:
    assert NOTMUCH is not None
    done = subprocess.run([NOTMUCH, *args], env=env, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"notmuch {' '.join(args)}: {done.stderr}"
    return done.stdout


@pytest.fixture(params=[
    "all-extensions",
    pytest.param("without-uidplus-move-condstore", marks=pytest.mark.slow),  # a server of its own: +1.5 s
])
def account(
    request: pytest.FixtureRequest, imap_account: ImapAccount, dovecot_factory: Callable[..., PrivateDovecot]
) -> ImapAccount:
    """The shared server's account, or one on a server hiding the extensions STOREs can do without."""
    if request.param == "all-extensions":
        return imap_account
    return dovecot_factory(hide_capabilities=HIDDEN).new_account("notmuch")


def message_id(i: int) -> str:
    """make_message(i)'s Message-ID without the angle brackets, as notmuch's id: wants it."""
    head = make_message(i, size=1200).split(b"\r\n\r\n", 1)[0]
    line = next(h for h in head.split(b"\r\n") if h.lower().startswith(b"message-id:"))
    return line.split(b":", 1)[1].strip().decode().strip("<>")


def tags(env: dict[str, str], i: int) -> set[str]:
    return set(notmuch(env, "search", "--output=tags", "--", f"id:{message_id(i)}").split())


def local_info(folder: Path, i: int) -> str | None:
    """The ``:2,`` letters of message ``i``'s file in ``folder`` (None: not found)."""
    wanted = f"Message-ID: <{message_id(i)}>".encode()
    for m in local_messages(folder):
        try:
            if wanted in m.path.read_bytes():
                return m.path.name.partition(":2,")[2]
        except FileNotFoundError:
            continue
    return None


def run_once(config: Path) -> None:
    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 0, run.stderr[-3000:]


def test_notmuch_tag_changes_reach_the_server(
    notmuch_env: dict[str, str], account: ImapAccount, tmp_path: Path
) -> None:
    uids = {i: account.client.append("INBOX", make_message(i, size=1200)) for i in range(5)}
    config = write_config(tmp_path, account)
    run_once(config)
    root = tmp_path / "Mail"

    notmuch(notmuch_env, "new", "--quiet")
    assert notmuch(notmuch_env, "count", "--", "*").strip() == "5"
    assert "unread" in tags(notmuch_env, 0)

    # run --once: read one message, flag another.
    notmuch(notmuch_env, "tag", "-unread", "--", f"id:{message_id(0)}")
    notmuch(notmuch_env, "tag", "+flagged", "--", f"id:{message_id(1)}")
    run_once(config)
    flags = account.client.flags("INBOX")
    assert "\\Seen" in flags[uids[0]] and "\\Flagged" not in flags[uids[0]]
    assert "\\Flagged" in flags[uids[1]] and "\\Seen" not in flags[uids[1]]
    assert not (flags[uids[2]] - {"\\Recent"})
    assert_mirrors(account, root, "INBOX")
    notmuch(notmuch_env, "new", "--quiet")
    assert "unread" not in tags(notmuch_env, 0) and "flagged" in tags(notmuch_env, 1)

    # The daemon: each tag change shows on the server within a few seconds.
    with DaemonProcess(config) as daemon:
        started = time.monotonic()
        notmuch(notmuch_env, "tag", "-unread", "+flagged", "--", f"id:{message_id(2)}")
        wait_until(lambda: {"\\Seen", "\\Flagged"} <= account.client.flags("INBOX")[uids[2]], 5,
                   "notmuch's -unread +flagged on the server")
        latency = time.monotonic() - started
        notmuch(notmuch_env, "tag", "-flagged", "--", f"id:{message_id(1)}")
        wait_until(lambda: "\\Flagged" not in account.client.flags("INBOX")[uids[1]], 5,
                   "notmuch's -flagged on the server")
        # And back: a flag set on the server renames the file; notmuch picks it up.
        account.client.add_flags("INBOX", uids[3], ["\\Seen"])
        wait_until(lambda: local_info(root / "INBOX", 3) == "S", 5, "the server's \\Seen locally")
        time.sleep(0.5)  # nothing reverted once settled
        assert_mirrors(account, root, "INBOX")
    notmuch(notmuch_env, "new", "--quiet")
    assert "unread" not in tags(notmuch_env, 3)
    assert "unread" not in tags(notmuch_env, 2) and "flagged" in tags(notmuch_env, 2)
    assert "flagged" not in tags(notmuch_env, 1)
    assert latency < 3.0, latency
    # notmuch's database (.notmuch/ in the mirror root) is not a folder and troubles no one.
    troubles = [line for line in daemon.lines if (" WARNING " in line or " ERROR " in line)
                and "has no UIDPLUS" not in line]
    assert not troubles, daemon.log
    assert account.client.mailboxes() == ["INBOX"]
