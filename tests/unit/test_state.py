"""The state DB on a real SQLite file: round trips, replace semantics, atomicity, modes."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord.store.state import (
    SCHEMA_VERSION,
    MailboxRecord,
    MessageRecord,
    SecondFile,
    StateDB,
    StateError,
)

A, INBOX = "work", "INBOX"


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[StateDB]:
    s = StateDB(tmp_path / "state" / "state.sqlite3")
    yield s
    s.close()


def rec(uid: int, flags: set[str] | None = None, size: int | None = 100) -> MessageRecord:
    return MessageRecord(uid, f"key{uid}", frozenset(flags or ()), size)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_file_and_dir_modes(tmp_path: Path, umask0: None) -> None:
    path = tmp_path / "a" / "b" / "state.sqlite3"
    s = StateDB(path)
    s.set_mailbox(A, INBOX, 1)  # makes SQLite create the -wal file
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700 and mode(path.parent.parent) == 0o700
    wal = path.with_name(path.name + "-wal")
    assert wal.exists() and mode(wal) == 0o600
    s.close()


def test_pragmas(db: StateDB) -> None:
    conn = sqlite3.connect(db.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()
    assert db._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_mailbox_round_trip(db: StateDB) -> None:
    assert db.mailbox(A, INBOX) is None
    assert db.mailboxes(A) == []
    db.set_mailbox(A, INBOX, 1234, 99, 1700000000.5)
    db.set_mailbox(A, "Archive/2024", 7)
    db.set_mailbox("other", INBOX, 5)
    assert db.mailbox(A, INBOX) == MailboxRecord(A, INBOX, 1234, 99, 1700000000.5)
    assert db.mailboxes(A) == [
        MailboxRecord(A, "Archive/2024", 7, None, None),
        MailboxRecord(A, INBOX, 1234, 99, 1700000000.5),
    ]


def test_set_mailbox_overwrites_every_column(db: StateDB) -> None:
    db.set_mailbox(A, INBOX, 1, 500, 10.0)
    db.set_mailbox(A, INBOX, 2)  # a UIDVALIDITY change must not keep the old modseq
    assert db.mailbox(A, INBOX) == MailboxRecord(A, INBOX, 2, None, None)


def test_set_mailbox_large_modseq(db: StateDB) -> None:
    db.set_mailbox(A, INBOX, 2**32 - 1, 2**63 - 1)
    assert db.mailbox(A, INBOX) == MailboxRecord(A, INBOX, 2**32 - 1, 2**63 - 1, None)


@pytest.mark.parametrize("bad", [0, -1, 2**32])
def test_set_mailbox_rejects_bad_uidvalidity(db: StateDB, bad: int) -> None:
    with pytest.raises(ValueError):
        db.set_mailbox(A, INBOX, bad)


def test_messages_round_trip(db: StateDB) -> None:
    records = [
        rec(1),
        rec(2, {"\\Seen", "\\Flagged", "$Forwarded", "Junk"}, 12345),
        MessageRecord(3, "k3", frozenset({"\\Seen"}), None),
        rec(2**32 - 1, {"\\Answered"}),
    ]
    db.add_messages(A, INBOX, records)
    got = db.messages(A, INBOX)
    assert got == {r.uid: r for r in records}
    assert all(isinstance(r.flags, frozenset) for r in got.values())
    assert db.count(A, INBOX) == 4
    assert db.messages(A, "Other") == {} and db.count("x", INBOX) == 0


def test_flags_stored_canonically(db: StateDB) -> None:
    db.add_messages(A, INBOX, [rec(1, {"\\Seen", "$Junk", "\\Answered"}), rec(2)])
    raw = dict(db._db.execute("SELECT uid, flags FROM message").fetchall())
    assert raw == {1: "$Junk \\Answered \\Seen", 2: ""}


@pytest.mark.parametrize("bad", ["", "two words", "tab\tbed", "new\nline"])
def test_flags_that_cannot_round_trip_are_refused(db: StateDB, bad: str) -> None:
    with pytest.raises(ValueError):
        db.add_messages(A, INBOX, [rec(1, {bad})])
    assert db.count(A, INBOX) == 0


def test_add_same_uid_and_file_updates_the_row(db: StateDB) -> None:
    db.add_messages(A, INBOX, [rec(1, {"\\Seen"}), rec(2)])
    db.add_messages(A, INBOX, [MessageRecord(1, "key1", frozenset(), 7)])
    assert db.messages(A, INBOX) == {1: MessageRecord(1, "key1", frozenset(), 7), 2: rec(2)}
    assert db.count(A, INBOX) == 2


def test_a_second_file_for_a_recorded_uid_is_refused(db: StateDB) -> None:
    """Invariant 7: the state, not its callers, refuses a second file for one UID."""
    db.add_messages(A, INBOX, [rec(1, {"\\Seen"}), rec(2)])
    with pytest.raises(SecondFile):
        db.add_messages(A, INBOX, [rec(3), MessageRecord(1, "newkey", frozenset(), 7)])
    assert db.messages(A, INBOX) == {1: rec(1, {"\\Seen"}), 2: rec(2)}  # nothing of the call kept
    # Whatever the SQL: a replace, an upsert, an update of the key.
    for sql in (
        "INSERT OR REPLACE INTO message (account, mailbox, uid, key, flags, size) VALUES ('work', 'INBOX', 1, 'other', '', 1)",
        "INSERT OR REPLACE INTO pending (account, mailbox, uid, key, flags, size) VALUES ('work', 'INBOX', 1, 'other', '', 1)",
        "UPDATE message SET key = 'other' WHERE uid = 1",
    ):
        with pytest.raises(sqlite3.IntegrityError):
            db._db.execute(sql)
    assert db.messages(A, INBOX)[1].key == "key1"
    assert db.pending(A, INBOX) == {}


def test_add_pending_refuses_uids_recorded_or_pending(db: StateDB) -> None:
    """A retried fetch's second copy is refused (returned), the rest recorded; nothing replaced."""
    db.add_messages(A, INBOX, [rec(1)])
    assert db.add_pending(A, INBOX, [rec(2)]) == set()
    again = [MessageRecord(u, f"again{u}", frozenset(), 1) for u in (1, 2, 3)]
    assert db.add_pending(A, INBOX, again) == {1, 2}
    assert {u: r.key for u, r in db.pending(A, INBOX).items()} == {2: "key2", 3: "again3"}
    db.promote_pending(A, INBOX, [2, 3])
    assert {u: r.key for u, r in db.messages(A, INBOX).items()} == {1: "key1", 2: "key2", 3: "again3"}
    # A pending row for a recorded UID (left by an older version) cannot be promoted over it.
    db._db.execute("DROP TRIGGER IF EXISTS pending_one_file")
    db._db.execute("INSERT INTO pending (account, mailbox, uid, key, flags, size) VALUES ('work', 'INBOX', 1, 'stale', '', 1)")
    with pytest.raises(SecondFile):
        db.promote_pending(A, INBOX, [1])
    assert db.messages(A, INBOX)[1].key == "key1"


def test_delete_mailbox_clears_pending_rows(db: StateDB) -> None:
    """A new UIDVALIDITY's UIDs must not meet the old one's pending rows."""
    db.add_pending(A, INBOX, [rec(1)])
    db.delete_mailbox(A, INBOX)
    assert db.pending(A, INBOX) == {}
    assert db.add_pending(A, INBOX, [MessageRecord(1, "new", frozenset(), 1)]) == set()


def test_version_3_db_gains_the_one_file_rule(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    from mirrord.store.state import _v1, _v2, _v3

    _v1(conn)
    _v2(conn)
    _v3(conn)
    conn.execute("PRAGMA user_version = 3")
    conn.execute("INSERT INTO message VALUES ('work', 'INBOX', 1, 'k1', '', 10)")
    conn.close()
    with StateDB(path) as db:
        assert db.add_pending(A, INBOX, [rec(1)]) == {1}
        with pytest.raises(SecondFile):
            db.add_messages(A, INBOX, [rec(1)])


def test_mailboxes_and_accounts_are_separate(db: StateDB) -> None:
    db.add_messages(A, INBOX, [rec(1)])
    db.add_messages(A, "Sent", [rec(1, {"\\Seen"})])
    db.add_messages("home", INBOX, [rec(1, {"\\Flagged"})])
    db.remove_messages(A, INBOX, [1])
    assert db.count(A, INBOX) == 0
    assert db.messages(A, "Sent")[1].flags == {"\\Seen"}
    assert db.messages("home", INBOX)[1].flags == {"\\Flagged"}


def test_set_flags(db: StateDB) -> None:
    db.add_messages(A, INBOX, [rec(1), rec(2), rec(3)])
    db.set_flags(A, INBOX, {1: frozenset({"\\Seen"}), 3: frozenset({"$Label1"}), 99: frozenset()})
    got = db.messages(A, INBOX)
    assert got[1] == MessageRecord(1, "key1", frozenset({"\\Seen"}), 100)
    assert got[2] == rec(2)
    assert got[3].flags == {"$Label1"}
    assert 99 not in got


def test_remove_messages(db: StateDB) -> None:
    db.add_messages(A, INBOX, [rec(u) for u in range(1, 11)])
    db.remove_messages(A, INBOX, iter([2, 4, 6, 1000]))
    assert sorted(db.messages(A, INBOX)) == [1, 3, 5, 7, 8, 9, 10]


def test_add_messages_is_one_transaction(db: StateDB) -> None:
    db.add_messages(A, INBOX, [rec(1, {"\\Seen"})])

    def records() -> Iterator[MessageRecord]:
        yield rec(1)  # would replace the existing row
        yield rec(2)
        raise RuntimeError("fetch failed half way")

    with pytest.raises(RuntimeError):
        db.add_messages(A, INBOX, records())
    assert db.messages(A, INBOX) == {1: rec(1, {"\\Seen"})}


def test_set_flags_and_remove_are_atomic_on_bad_input(db: StateDB) -> None:
    db.add_messages(A, INBOX, [rec(1), rec(2)])
    with pytest.raises(ValueError):
        db.set_flags(A, INBOX, {1: frozenset({"\\Seen"}), 2: frozenset({"bad flag"})})
    with pytest.raises(ValueError):
        db.remove_messages(A, INBOX, [1, 0])
    assert db.messages(A, INBOX) == {1: rec(1), 2: rec(2)}


def test_transaction_groups_calls(db: StateDB) -> None:
    with pytest.raises(RuntimeError):
        with db.transaction():
            db.add_messages(A, INBOX, [rec(1)])
            db.set_mailbox(A, INBOX, 9, 42)
            raise RuntimeError
    assert db.count(A, INBOX) == 0 and db.mailbox(A, INBOX) is None
    with db.transaction():
        db.add_messages(A, INBOX, [rec(1)])
        db.set_mailbox(A, INBOX, 9, 42)
    assert db.count(A, INBOX) == 1 and db.mailbox(A, INBOX) is not None


def test_nested_failure_undoes_only_the_inner_block(db: StateDB) -> None:
    with db.transaction():
        db.add_messages(A, INBOX, [rec(1)])
        with pytest.raises(ValueError):
            db.add_messages(A, INBOX, [rec(2), rec(3, {"bad flag"})])
        db.add_messages(A, INBOX, [rec(4)])
    assert sorted(db.messages(A, INBOX)) == [1, 4]


def test_uncommitted_rows_are_invisible_to_other_readers(db: StateDB) -> None:
    other = sqlite3.connect(db.path)
    try:
        with db.transaction():
            db.add_messages(A, INBOX, [rec(1)])
            assert other.execute("SELECT COUNT(*) FROM message").fetchone()[0] == 0
        assert other.execute("SELECT COUNT(*) FROM message").fetchone()[0] == 1
    finally:
        other.close()


def test_delete_mailbox(db: StateDB) -> None:
    db.set_mailbox(A, INBOX, 1)
    db.set_mailbox(A, "Sent", 1)
    db.add_messages(A, INBOX, [rec(1), rec(2)])
    db.add_messages(A, "Sent", [rec(1)])
    db.delete_mailbox(A, INBOX)
    assert db.mailbox(A, INBOX) is None and db.count(A, INBOX) == 0
    assert db.count(A, "Sent") == 1


def test_reopen_persists(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    with StateDB(path) as s:
        s.set_mailbox(A, INBOX, 77, 5, 1.5)
        s.add_messages(A, INBOX, [rec(1, {"\\Seen", "$X"}), rec(2)])
        s.set_flags(A, INBOX, {2: frozenset({"\\Flagged"})})
        s.remove_messages(A, INBOX, [1])
    with StateDB(path) as s:
        assert s.mailbox(A, INBOX) == MailboxRecord(A, INBOX, 77, 5, 1.5)
        assert s.messages(A, INBOX) == {2: rec(2, {"\\Flagged"})}


def test_closed_db_refuses_use(tmp_path: Path) -> None:
    s = StateDB(tmp_path / "s.db")
    s.close()
    s.close()
    with pytest.raises(StateError):
        s.count(A, INBOX)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    StateDB(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="newer"):
        StateDB(path)


def test_many_messages(db: StateDB) -> None:
    db.add_messages(A, INBOX, (rec(u, {"\\Seen"}) for u in range(1, 20001)))
    assert db.count(A, INBOX) == 20000
    db.set_flags(A, INBOX, {u: frozenset() for u in range(1, 20001, 2)})
    got = db.messages(A, INBOX)
    assert got[1].flags == frozenset() and got[2].flags == {"\\Seen"}


def test_version_2_db_is_migrated_keeping_rows(tmp_path: Path) -> None:
    """A DB written before the Maildir stamp existed gains it, empty: the next sync lists the Maildir."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    from mirrord.store.state import _v1, _v2

    _v1(conn)
    _v2(conn)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("INSERT INTO mailbox VALUES ('work', 'INBOX', 5, 42, 1.5)")
    conn.execute("INSERT INTO message VALUES ('work', 'INBOX', 1, 'k1', '\\Seen', 10)")
    conn.close()
    with StateDB(path) as db:
        assert db.mailbox(A, INBOX) == MailboxRecord(A, INBOX, 5, 42, 1.5, None)
        assert db.messages(A, INBOX)[1].key == "k1"


def test_maildir_stamp_round_trip_and_summary(db: StateDB) -> None:
    db.set_mailbox(A, INBOX, 5, 42, 1.5, maildir_stamp=(10**18, 10**18 + 1))
    assert db.mailbox(A, INBOX) == MailboxRecord(A, INBOX, 5, 42, 1.5, (10**18, 10**18 + 1))
    assert db.summary(A, INBOX) == (0, 0)
    db.add_messages(A, INBOX, [MessageRecord(3, "k3", frozenset({"\\Seen", "$Junk"}), 1), MessageRecord(9, "k9", frozenset(), None)])
    assert db.summary(A, INBOX) == (2, 9)
    assert db.uids(A, INBOX) == {3, 9}
    assert sorted(db.keys(A, INBOX)) == [("k3", "$Junk \\Seen"), ("k9", "")]
    db.set_mailbox(A, INBOX, 5)
    assert db.mailbox(A, INBOX) == MailboxRecord(A, INBOX, 5, None, None, None)


def test_an_exact_maildir_stamp_round_trips_and_goes_with_its_stamp(db: StateDB) -> None:
    db.set_mailbox(A, INBOX, 5, 42, 1.5, maildir_stamp=(7, 8), maildir_exact=True)
    assert db.mailbox(A, INBOX) == MailboxRecord(A, INBOX, 5, 42, 1.5, (7, 8), True)
    assert db.mailboxes(A)[0].maildir_exact
    db.set_mailbox(A, INBOX, 5, 42, 1.5, maildir_stamp=(7, 8))
    assert not db.mailbox(A, INBOX).maildir_exact  # type: ignore[union-attr]
    db.set_mailbox(A, INBOX, 5, 42, 1.5, maildir_exact=True)
    assert db.mailbox(A, INBOX) == MailboxRecord(A, INBOX, 5, 42, 1.5, None, False)


def test_non_durable_mailbox_write_is_committed_and_leaves_full_sync(db: StateDB) -> None:
    db.set_mailbox(A, INBOX, 5, 42, 1.5, durable=False)
    assert db.mailbox(A, INBOX) == MailboxRecord(A, INBOX, 5, 42, 1.5)
    assert db._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again


def test_pending_rows_are_fsynced_before_the_renames_and_their_promotion_is_not(db: StateDB) -> None:
    """A lost promotion leaves pending rows, which recovery adopts; a lost
    pending row would leave a file no row names."""
    statements: list[str] = []
    db._db.set_trace_callback(statements.append)
    db.add_pending(A, INBOX, [MessageRecord(1, "k1", frozenset(), 10)])
    assert "COMMIT" in statements and not any("synchronous" in s for s in statements)
    statements.clear()
    db.promote_pending(A, INBOX, [1])
    assert statements.index("PRAGMA synchronous=NORMAL") < statements.index("COMMIT")
    assert statements[-1] == "PRAGMA synchronous=FULL"
    assert db.messages(A, INBOX) == {1: MessageRecord(1, "k1", frozenset(), 10)} and db.pending(A, INBOX) == {}
    statements.clear()
    db.set_flags(A, INBOX, {1: frozenset({"\\Seen"})}, durable=False)
    assert statements.index("PRAGMA synchronous=NORMAL") < statements.index("COMMIT")
    assert db.messages(A, INBOX)[1].flags == {"\\Seen"}
