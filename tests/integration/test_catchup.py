"""Catch-up after a restart against a real Dovecot: which commands, and that the mirror converges.

With QRESYNC (Dovecot offers it) a catch-up asks the server what changed
since the HIGHESTMODSEQ of the last complete sync; with CONDSTORE alone it
asks for a compact UID list and the flags changed since; with neither it
lists every message. The commands come from mirrord's protocol trace (``-v``).
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

import pytest

from mirrord.testing import ImapAccount, PrivateDovecot, make_message
from tests.integration._mirrord import assert_mirrors, local_messages, mirrord, write_config

FULL_LISTING = "UID FETCH 1:* (UID FLAGS RFC822.SIZE)"


def commands(stderr: str) -> list[str]:
    """The commands mirrord sent, tags stripped, in order."""
    return [m.group(1) for m in re.finditer(r" C: M\d+ (.*)$", stderr, re.MULTILINE)]


def fill(account: ImapAccount) -> None:
    client = account.client
    client.create("Archive")
    for i in range(12):
        client.append("INBOX", make_message(i, size=2000), ("\\Seen",) if i % 2 else ())
    for i in range(12, 18):
        client.append("Archive", make_message(i, size=3000), ("\\Seen",))


def sync(config: Path, *extra: str) -> tuple[str, list[str]]:
    run = mirrord("-v", "-c", str(config), "run", "--once", *extra)
    assert run.status == 0, run.stderr[-3000:]
    return run.stderr, commands(run.stderr)


def change_while_down(account: ImapAccount) -> None:
    """3 new messages, 2 flag changes and 1 expunge in INBOX; Archive untouched."""
    client = account.client
    uids = client.uids("INBOX")
    client.add_flags("INBOX", uids[0], ["\\Flagged"])
    client.remove_flags("INBOX", uids[1], ["\\Seen"])
    client.expunge("INBOX", uids[2])
    for i in range(100, 103):
        client.append("INBOX", make_message(i, size=1500))


def mailbox_row(root: Path, mailbox: str) -> tuple[int | None, int | None, int | None]:
    """(highestmodseq, new/ mtime, cur/ mtime) as the state DB has them."""
    with sqlite3.connect(root / "state" / "state.sqlite3") as conn:
        return conn.execute(
            "SELECT highestmodseq, new_mtime, cur_mtime FROM mailbox WHERE mailbox = ?", (mailbox,)
        ).fetchone()


def mirrored(account: ImapAccount, root: Path) -> None:
    for mailbox in ("INBOX", "Archive"):
        assert_mirrors(account, root / "Mail", mailbox)
        # Nothing left behind in tmp/: no unfinished body, no file made ahead and not used.
        tmp = root / "Mail" / mailbox / "tmp"
        assert not tmp.exists() or os.listdir(tmp) == [], f"{mailbox}/tmp: {os.listdir(tmp)}"


def above_highest(account: ImapAccount, mailbox: str) -> str:
    """The listing of new mail a QRESYNC catch-up pipelines behind its EXAMINE."""
    return f"UID FETCH {max(account.client.uids(mailbox)) + 1}:* (UID FLAGS RFC822.SIZE)"


def test_qresync_restart_with_nothing_changed_sends_one_examine_per_mailbox(
    imap_account: ImapAccount, tmp_path: Path
) -> None:
    fill(imap_account)
    config = write_config(tmp_path, imap_account)
    _, first = sync(config)
    assert "ENABLE QRESYNC" in first
    assert any(c.startswith(FULL_LISTING) for c in first)  # nothing on record yet

    stderr, sent = sync(config)
    per_mailbox = [c for c in sent if c.startswith(("EXAMINE", "UID", "SELECT", "FETCH", "NOOP"))]
    # Per mailbox: the EXAMINE that brings the changes, and the listing of
    # anything above our highest UID pipelined behind it (the same round trip).
    assert len(per_mailbox) == 4, sent
    for mailbox in ("INBOX", "Archive"):
        examine = next(i for i, c in enumerate(per_mailbox) if c.startswith(f'EXAMINE "{mailbox}" (QRESYNC ('))
        assert per_mailbox[examine + 1] == above_highest(imap_account, mailbox), sent
    assert "BODY.PEEK[]" not in stderr and "UID SEARCH" not in stderr
    assert "up to date" in stderr
    mirrored(imap_account, tmp_path)
    # The Maildir stamp that lets the next sync skip listing new/ and cur/ is on record.
    modseq, new_mtime, cur_mtime = mailbox_row(tmp_path, "INBOX")
    inbox = tmp_path / "Mail" / "INBOX"
    assert modseq and (new_mtime, cur_mtime) == ((inbox / "new").stat().st_mtime_ns, (inbox / "cur").stat().st_mtime_ns)


def test_qresync_catchup_fetches_exactly_what_changed(imap_account: ImapAccount, tmp_path: Path) -> None:
    fill(imap_account)
    config = write_config(tmp_path, imap_account)
    sync(config)
    highest = max(imap_account.client.uids("INBOX"))
    change_while_down(imap_account)

    stderr, sent = sync(config)
    inbox = [c for c in sent if "INBOX" in c or c.startswith(("UID", "NOOP"))]
    assert not any(c.startswith(FULL_LISTING) for c in sent), sent
    assert f"UID FETCH {highest + 1}:* (UID FLAGS RFC822.SIZE)" in inbox
    bodies = [c for c in sent if "BODY.PEEK[]" in c]
    assert bodies == [f"UID FETCH {highest + 1}:{highest + 3} (UID FLAGS RFC822.SIZE BODY.PEEK[])"], sent
    assert "INBOX: 3 fetched" in stderr and "1 removed" in stderr and "2 flag changes" in stderr
    mirrored(imap_account, tmp_path)

    # And the next restart is back to one EXAMINE and one empty listing per mailbox.
    _, sent = sync(config)
    assert sorted(c for c in sent if c.startswith("UID")) == sorted(
        above_highest(imap_account, mailbox) for mailbox in ("INBOX", "Archive")
    ), sent


def test_qresync_catchup_refetches_a_file_deleted_by_hand_and_restores_flags(
    imap_account: ImapAccount, tmp_path: Path
) -> None:
    fill(imap_account)
    # A read-only backup: what a reader does locally is the server's to undo.
    config = write_config(tmp_path, imap_account, extra="    sync: pull\n")
    sync(config)
    files = local_messages(tmp_path / "Mail" / "INBOX")
    files[0].path.unlink()
    renamed = files[1].path
    base, _, _ = renamed.name.partition(":2,")
    os.rename(renamed, renamed.parent.parent / "cur" / f"{base}:2,T")  # "trashed" by a reader

    stderr, sent = sync(config)
    assert not any(c.startswith(FULL_LISTING) for c in sent), sent
    assert "INBOX: 1 fetched" in stderr and "1 flag change" in stderr
    mirrored(imap_account, tmp_path)


def test_catchup_removing_most_of_a_mailbox_stops_until_allowed(imap_account: ImapAccount, tmp_path: Path) -> None:
    fill(imap_account)
    config = write_config(tmp_path, imap_account)
    sync(config)
    uids = imap_account.client.uids("INBOX")
    imap_account.client.expunge("INBOX", uids[:11])  # above the floor of 10 (engine.REMOVAL_FLOOR)

    before = mailbox_row(tmp_path, "INBOX")[0]
    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 1
    assert "would remove 11 of 12 local copies" in run.stderr
    assert len(local_messages(tmp_path / "Mail" / "INBOX")) == 12
    # A sync that did not complete leaves the HIGHESTMODSEQ of the last one that did.
    assert mailbox_row(tmp_path, "INBOX")[0] == before

    sync(config, "--allow-delete", "INBOX")
    mirrored(imap_account, tmp_path)


def test_qresync_catchup_after_uidvalidity_change_rematches(imap_account: ImapAccount, tmp_path: Path) -> None:
    fill(imap_account)
    config = write_config(tmp_path, imap_account)
    sync(config)
    client = imap_account.client
    kept = client.messages("Archive")
    client.delete("Archive")
    client.create("Archive")
    for flags, body in kept.values():
        client.append("Archive", body, flags)

    stderr, _ = sync(config)
    assert "6 local copies re-matched to their new UIDs" in stderr
    assert "Archive: up to date" in stderr or "Archive: " in stderr
    mirrored(imap_account, tmp_path)
    _, sent = sync(config)
    assert not any(c.startswith(FULL_LISTING) for c in sent), sent


@pytest.mark.parametrize(
    "hidden, enable, listing",
    [
        (("CONDSTORE", "QRESYNC"), None, FULL_LISTING),
        (("QRESYNC",), "ENABLE CONDSTORE", "UID SEARCH RETURN (ALL) ALL"),
    ],
    ids=["no-extensions", "condstore-only"],
)
def test_catchup_without_qresync_converges(
    dovecot_factory: object, tmp_path: Path, hidden: tuple[str, ...], enable: str | None, listing: str
) -> None:
    server: PrivateDovecot = dovecot_factory(hide_capabilities=hidden)  # type: ignore[operator]
    account = server.new_account("fallback")
    try:
        fill(account)
        config = write_config(tmp_path, account)
        _, first = sync(config)
        assert not any("QRESYNC" in c for c in first), first
        assert (enable in first) if enable else not any(c.startswith("ENABLE") for c in first)

        _, sent = sync(config)
        assert "BODY.PEEK[]" not in " ".join(sent)
        assert any(c.startswith(listing) for c in sent), sent
        if enable:
            assert not any(c.startswith(FULL_LISTING) for c in sent), sent

        change_while_down(account)
        stderr, sent = sync(config)
        summary = [line for line in stderr.splitlines() if "INFO" in line and "INBOX:" in line]
        # Without modseqs, \Recent going (another session selected INBOX) counts as a change too.
        assert "INBOX: 3 fetched" in stderr and "1 removed" in stderr and "flag changes" in stderr, summary
        if enable:
            assert any("(CHANGEDSINCE " in c for c in sent), sent
        mirrored(account, tmp_path)
    finally:
        account.close()


def test_qresync_catchup_that_does_not_add_up_lists_in_full(imap_account: ImapAccount, tmp_path: Path) -> None:
    """A message below our highest UID that we never got (a batch that failed, say) is found."""
    fill(imap_account)
    config = write_config(tmp_path, imap_account)
    sync(config)
    uid = imap_account.client.uids("INBOX")[3]
    with sqlite3.connect(tmp_path / "state" / "state.sqlite3") as conn:
        (key,) = conn.execute("SELECT key FROM message WHERE mailbox = 'INBOX' AND uid = ?", (uid,)).fetchone()
        conn.execute("DELETE FROM message WHERE mailbox = 'INBOX' AND uid = ?", (uid,))
    for path in (tmp_path / "Mail" / "INBOX").glob(f"*/{key}*"):
        path.unlink()

    stderr, sent = sync(config)
    assert "do not add up" in stderr
    assert any(c.startswith(FULL_LISTING) for c in sent), sent
    assert f"UID FETCH {uid} (UID FLAGS RFC822.SIZE BODY.PEEK[])" in sent
    mirrored(imap_account, tmp_path)


def test_each_fetch_batch_selects_in_the_same_round_trip(imap_account: ImapAccount, tmp_path: Path) -> None:
    """A first sync's body fetches: on the worker that listed, at once; on any
    other, right behind its own EXAMINE; never behind a NOOP (a round trip
    of its own, since Dovecot answers a FETCH pipelined behind a NOOP from
    the older view)."""
    client = imap_account.client
    for i in range(60):
        client.append("INBOX", make_message(i, size=1500))
    config = write_config(tmp_path, imap_account)  # 3 workers
    stderr, sent = sync(config)
    assert "NOOP" not in sent
    per_worker: dict[str, list[str]] = {}
    for m in re.finditer(r"(worker \d+) C: M\d+ (.*)$", stderr, re.MULTILINE):
        per_worker.setdefault(m.group(1), []).append(m.group(2))
    bodies = 0
    for worker, sent_here in per_worker.items():
        for i, command in enumerate(sent_here):
            if "BODY.PEEK[]" in command:
                bodies += 1
                before = sent_here[i - 1]
                assert before.startswith(('EXAMINE "INBOX"', FULL_LISTING, "UID FETCH")), (worker, sent_here)
    assert bodies >= 2  # split across workers
    assert_mirrors(imap_account, tmp_path / "Mail", "INBOX")
