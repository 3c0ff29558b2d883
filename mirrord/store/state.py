"""The state DB: which local file holds which server message, and per-mailbox sync marks.

A row is committed only after the file it names is durable in the Maildir
(DESIGN invariant 1), and a committed row must survive a power cut, or the
next sync would believe in a file that may have vanished or refetch one that
is there. Hence WAL with ``synchronous=FULL``: every commit is fsynced.

The DB is used from the reactor thread only; SQLite's own connection check
enforces that.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from mirrord._dirs import make_private_dirs
from mirrord.flags import Flags

DIR_MODE = 0o700
FILE_MODE = 0o600

SCHEMA_VERSION = 6

_MAX_UID = 2**32 - 1
_MAX_MODSEQ = 2**63 - 1
_IN_CHUNK = 500
"""Most UIDs in one ``uid IN (...)``: with account and mailbox, under SQLite's 999 parameters of old."""


class StateError(Exception):
    """The state DB cannot be used as it is (e.g. written by a newer mirrord)."""


class SecondFile(StateError):
    """A second file for one (mailbox, UID): the state refuses it (DESIGN invariant 7)."""


@dataclass(frozen=True)
class MailboxRecord:
    account: str
    mailbox: str
    uidvalidity: int
    highestmodseq: int | None
    """The server's HIGHESTMODSEQ when the last complete sync looked (its EXAMINE);
    None when no complete sync is on record since the rows last changed."""
    last_sync: float | None
    maildir_stamp: tuple[int, int] | None = None
    """Modification times (ns) of the Maildir's new/ and cur/ when the last sync
    found every recorded file in place with its flags; None: unknown."""
    maildir_exact: bool = False
    """The stamp also says the Maildir held nothing but the recorded files (no
    file without a row): a two-way round, finding the same stamp, knows there is
    nothing local to send without listing the Maildir or reading the rows."""


@dataclass(frozen=True)
class Intent:
    """An APPEND or MOVE the server may have done: see ``_v5``."""

    id: int
    account: str
    mailbox: str
    """The target mailbox (local name): where the message lands."""
    key: str
    """The local file's key in the target's Maildir."""
    kind: str
    """``append`` or ``move``."""
    source: str | None
    source_uid: int | None
    uidvalidity: int | None
    """The target's UIDVALIDITY when ``uidnext`` was read."""
    uidnext: int | None
    """The target's UIDNEXT before the command: the message, if it landed, is at or above it."""
    message_id: str | None
    size: int | None
    """RFC822.SIZE as the server counts it (CRLF line ends)."""
    flags: Flags


class MessageRecord(NamedTuple):
    """One row. A named tuple, not a dataclass: a sync reads every row of a
    mailbox, and a frozen dataclass costs about three times as much to build."""

    uid: int
    key: str
    """The Maildir unique name of the local file (the part before ``:2,``)."""
    flags: Flags
    """All of the server's flags, keywords included; file names carry only some."""
    size: int | None
    """RFC822.SIZE: the server's size (CRLF line ends), not the file's."""
    message_id: str | None = None
    """From the header, when it was read at fetch (rows of older versions have none)."""


def _v1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE mailbox (
            account       TEXT NOT NULL,
            mailbox       TEXT NOT NULL,
            uidvalidity   INTEGER NOT NULL,
            highestmodseq INTEGER,
            last_sync     REAL,
            PRIMARY KEY (account, mailbox)
        ) WITHOUT ROWID
        """
    )
    conn.execute(
        """
        CREATE TABLE message (
            account TEXT NOT NULL,
            mailbox TEXT NOT NULL,
            uid     INTEGER NOT NULL,
            key     TEXT NOT NULL,
            flags   TEXT NOT NULL,
            size    INTEGER,
            PRIMARY KEY (account, mailbox, uid)
        ) WITHOUT ROWID
        """
    )


def _v2(conn: sqlite3.Connection) -> None:
    # Deliveries in flight: recorded before their files are renamed into
    # place, promoted to ``message`` after. A crash between leaves a pending
    # row whose file either made it into new/ or cur/ (adopt it) or did not
    # (forget it) - never an orphan file that would be fetched again.
    conn.execute(
        """
        CREATE TABLE pending (
            account TEXT NOT NULL,
            mailbox TEXT NOT NULL,
            uid     INTEGER NOT NULL,
            key     TEXT NOT NULL,
            flags   TEXT NOT NULL,
            size    INTEGER,
            PRIMARY KEY (account, mailbox, uid)
        ) WITHOUT ROWID
        """
    )


def _v3(conn: sqlite3.Connection) -> None:
    # The Maildir's new/ and cur/ mtimes when every recorded file was last seen
    # in place: while both are unchanged, a sync need not list the directories
    # to find files deleted or renamed by hand.
    conn.execute("ALTER TABLE mailbox ADD COLUMN new_mtime INTEGER")
    conn.execute("ALTER TABLE mailbox ADD COLUMN cur_mtime INTEGER")


_SECOND_FILE = "mirrord: a second file for one UID"


def _v4(conn: sqlite3.Connection) -> None:
    # One server message, one local file (invariant 7), as a rule of the
    # schema rather than a habit of its callers: while a (account, mailbox,
    # uid) names a file, recorded or pending, nothing may make it name
    # another. A UIDVALIDITY change goes through delete_mailbox, which clears
    # both tables first, so the UID alone stands for (UIDVALIDITY, UID).
    # Re-recording the same file (same key: new flags, a crash's adoption)
    # stays allowed. INSERT OR REPLACE and upserts go through the INSERT
    # trigger; an UPDATE of the key or uid through the UPDATE ones.
    for table, other in (("message", "pending"), ("pending", "message")):
        conn.execute(
            f"""
            CREATE TRIGGER {table}_one_file BEFORE INSERT ON {table}
            WHEN EXISTS (SELECT 1 FROM {table} WHERE account = NEW.account AND mailbox = NEW.mailbox
                         AND uid = NEW.uid AND key <> NEW.key)
              OR EXISTS (SELECT 1 FROM {other} WHERE account = NEW.account AND mailbox = NEW.mailbox
                         AND uid = NEW.uid AND key <> NEW.key)
            BEGIN SELECT RAISE(ABORT, '{_SECOND_FILE}'); END
            """
        )
        conn.execute(
            f"""
            CREATE TRIGGER {table}_key_fixed BEFORE UPDATE OF uid, key ON {table}
            WHEN NEW.key <> OLD.key OR NEW.uid <> OLD.uid
            BEGIN SELECT RAISE(ABORT, '{_SECOND_FILE}'); END
            """
        )


def _v5(conn: sqlite3.Connection) -> None:
    # The Message-ID of each message, read from its header as it is fetched:
    # with the size, the identity that tells a reader's move or rename of a
    # file from a deletion and a new message, even when the server no longer
    # has the original (another client moved it meanwhile).
    conn.execute("ALTER TABLE message ADD COLUMN message_id TEXT")
    conn.execute("ALTER TABLE pending ADD COLUMN message_id TEXT")
    # Two-way intents (issue #12): an APPEND or a MOVE is recorded here,
    # fsynced, before the server is told, and deleted once its row is. A
    # crash in between leaves the intent, and the next round looks for the
    # message in the target above ``uidnext`` (by Message-ID and size)
    # before doing anything again: never a second upload of one file.
    conn.execute(
        """
        CREATE TABLE outbox (
            id          INTEGER PRIMARY KEY,
            account     TEXT NOT NULL,
            mailbox     TEXT NOT NULL,
            key         TEXT NOT NULL,
            kind        TEXT NOT NULL,
            source      TEXT,
            source_uid  INTEGER,
            uidvalidity INTEGER,
            uidnext     INTEGER,
            message_id  TEXT,
            size        INTEGER,
            flags       TEXT NOT NULL
        )
        """
    )


def _v6(conn: sqlite3.Connection) -> None:
    # Whether the Maildir stamp was taken when new/ and cur/ held exactly the
    # recorded files: then an unchanged stamp means a two-way round has nothing
    # to send. Stamps recorded before this column are not known to be exact.
    conn.execute("ALTER TABLE mailbox ADD COLUMN maildir_exact INTEGER")


# _MIGRATIONS[n] takes a DB at version n-1 to version n. Later schema changes
# append a step here; never edit a released one.
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _v1, 2: _v2, 3: _v3, 4: _v4, 5: _v5, 6: _v6}


@contextmanager
def _refusing_second_files() -> Iterator[None]:
    """Turn the schema's refusal of a second file into :class:`SecondFile`."""
    try:
        yield
    except sqlite3.IntegrityError as e:
        if _SECOND_FILE in str(e):
            raise SecondFile(str(e)) from None
        raise


def _canonical_flags(flags: Flags) -> str:
    if isinstance(flags, frozenset):
        return _canonical_frozen(flags)
    return _canonical(flags)


@functools.lru_cache(maxsize=1024)
def _canonical_frozen(flags: frozenset[str]) -> str:
    # Cached: a first sync stores thousands of messages with a handful of flag sets.
    return _canonical(flags)


def _canonical(flags: Flags) -> str:
    for flag in flags:
        if not flag or any(c.isspace() for c in flag):
            # The stored form is space separated; such a flag could not be read back.
            raise ValueError(f"not an IMAP flag: {flag!r}")
    return " ".join(sorted(set(flags)))


def _mailbox_record(
    account: str,
    mailbox: str,
    uidvalidity: int,
    highestmodseq: int | None,
    last_sync: float | None,
    new_mtime: int | None,
    cur_mtime: int | None,
    exact: int | None,
) -> MailboxRecord:
    stamp = (new_mtime, cur_mtime) if new_mtime is not None and cur_mtime is not None else None
    return MailboxRecord(account, mailbox, uidvalidity, highestmodseq, last_sync, stamp,
                         stamp is not None and bool(exact))


@functools.lru_cache(maxsize=4096)
def _parse_flags(text: str) -> Flags:
    # Cached: a mailbox has few distinct flag sets, and every row is read.
    return frozenset(text.split())


def _check_uid(uid: int, what: str = "uid") -> int:
    if isinstance(uid, bool) or not isinstance(uid, int) or not 0 < uid <= _MAX_UID:
        raise ValueError(f"{what} out of range: {uid!r}")
    return uid


class StateDB:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        make_private_dirs(self.path.parent)
        # Create the file ourselves so it is private from its first byte;
        # SQLite gives the -wal and -shm files the database file's mode.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            if os.fstat(fd).st_size == 0:
                os.fchmod(fd, FILE_MODE)
        finally:
            os.close(fd)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so what is
        # one transaction is explicit rather than the sqlite3 module's guess.
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, isolation_level=None, timeout=5.0
        )
        self._depth = 0
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StateError(f"{self.path}: cannot use WAL journal (got {mode!r})")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    def _migrate(self) -> None:
        with self.transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"{self.path} has schema version {version}; this mirrord knows "
                    f"up to {SCHEMA_VERSION} (was it written by a newer version?)"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                _MIGRATIONS[step](self._db)
            if version != SCHEMA_VERSION:
                # PRAGMA takes no parameters; the value is our own integer.
                self._db.execute(f"PRAGMA user_version = {int(SCHEMA_VERSION)}")

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateError(f"{self.path} is closed")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def __enter__(self) -> StateDB:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several calls into one commit; nested blocks become savepoints.

        E.g. recording a batch of messages and the HIGHESTMODSEQ they bring
        the mailbox to, so neither is ever committed without the other.
        An exception leaving a block undoes that block only.
        """
        db = self._db
        if self._depth == 0:
            db.execute("BEGIN IMMEDIATE")
        else:
            db.execute(f"SAVEPOINT sp{self._depth}")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            else:
                db.execute(f"ROLLBACK TO sp{self._depth}")
                db.execute(f"RELEASE sp{self._depth}")
            raise
        self._depth -= 1
        if self._depth == 0:
            try:
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        else:
            db.execute(f"RELEASE sp{self._depth}")

    @contextmanager
    def _synchronous(self, mode: str | None) -> Iterator[None]:
        """Run a block under another ``PRAGMA synchronous`` (None: as is), then back to FULL."""
        if mode is None:
            yield
            return
        self._db.execute(f"PRAGMA synchronous={mode}")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    # -- mailboxes --------------------------------------------------------

    def mailbox(self, account: str, mailbox: str) -> MailboxRecord | None:
        row = self._db.execute(
            "SELECT uidvalidity, highestmodseq, last_sync, new_mtime, cur_mtime, maildir_exact"
            " FROM mailbox"
            " WHERE account = ? AND mailbox = ?",
            (account, mailbox),
        ).fetchone()
        return None if row is None else _mailbox_record(account, mailbox, *row)

    def mailboxes(self, account: str) -> list[MailboxRecord]:
        """The account's mailboxes, ordered by name."""
        rows = self._db.execute(
            "SELECT mailbox, uidvalidity, highestmodseq, last_sync, new_mtime, cur_mtime, maildir_exact"
            " FROM mailbox"
            " WHERE account = ? ORDER BY mailbox",
            (account,),
        ).fetchall()
        return [_mailbox_record(account, *row) for row in rows]

    def set_mailbox(
        self,
        account: str,
        mailbox: str,
        uidvalidity: int,
        highestmodseq: int | None = None,
        last_sync: float | None = None,
        maildir_stamp: tuple[int, int] | None = None,
        *,
        maildir_exact: bool = False,
        durable: bool = True,
    ) -> None:
        """Write the whole mailbox row; None stores NULL, it does not keep the old value.

        Keeping an old HIGHESTMODSEQ across a UIDVALIDITY change would make the
        next sync skip changes; forgetting one only costs a full listing. The
        same goes for the Maildir stamp: forgetting it costs one directory scan.
        ``maildir_exact``: see :attr:`MailboxRecord.maildir_exact`.

        ``durable=False`` commits without an fsync, for a write whose loss in a
        power cut is harmless because the row it replaces is still true (a
        sync's closing mark): WAL keeps commits in order, so it can be lost
        only together with everything after it, never on its own. Inside an
        enclosing transaction it is as durable as that one.
        """
        _check_uid(uidvalidity, "uidvalidity")
        if highestmodseq is not None and not 0 <= highestmodseq <= _MAX_MODSEQ:
            raise ValueError(f"highestmodseq out of range: {highestmodseq!r}")
        new_mtime, cur_mtime = maildir_stamp if maildir_stamp is not None else (None, None)
        with self._synchronous("NORMAL" if not durable and self._depth == 0 else None), self.transaction():
            self._db.execute(
                "INSERT INTO mailbox (account, mailbox, uidvalidity, highestmodseq, last_sync,"
                " new_mtime, cur_mtime, maildir_exact)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (account, mailbox) DO UPDATE SET"
                " uidvalidity = excluded.uidvalidity,"
                " highestmodseq = excluded.highestmodseq,"
                " last_sync = excluded.last_sync,"
                " new_mtime = excluded.new_mtime,"
                " cur_mtime = excluded.cur_mtime,"
                " maildir_exact = excluded.maildir_exact",
                (account, mailbox, uidvalidity, highestmodseq, last_sync, new_mtime, cur_mtime,
                 1 if maildir_exact and maildir_stamp is not None else None),
            )

    def delete_mailbox(self, account: str, mailbox: str) -> None:
        """Forget a mailbox and all its message rows, pending ones too (its files are the caller's business).

        Pending rows go as well: under a new UIDVALIDITY their UIDs name
        other mail, and they would stand in the way of its rows.
        """
        with self.transaction():
            self._db.execute(
                "DELETE FROM message WHERE account = ? AND mailbox = ?", (account, mailbox)
            )
            self._db.execute(
                "DELETE FROM pending WHERE account = ? AND mailbox = ?", (account, mailbox)
            )
            self._db.execute(
                "DELETE FROM outbox WHERE account = ? AND mailbox = ?", (account, mailbox)
            )
            self._db.execute(
                "DELETE FROM mailbox WHERE account = ? AND mailbox = ?", (account, mailbox)
            )

    # -- messages ---------------------------------------------------------

    def messages(
        self, account: str, mailbox: str, uids: Iterable[int] | None = None
    ) -> dict[int, MessageRecord]:
        """Rows of a mailbox; only those of ``uids`` when given (cheap for a few events)."""
        query = "SELECT uid, key, flags, size, message_id FROM message WHERE account = ? AND mailbox = ?"
        if uids is None:
            rows = list(self._db.execute(query, (account, mailbox)))
        else:
            wanted = sorted(set(uids))
            rows = []
            for i in range(0, len(wanted), 500):
                chunk = wanted[i : i + 500]
                marks = ",".join("?" * len(chunk))
                rows.extend(self._db.execute(f"{query} AND uid IN ({marks})", (account, mailbox, *chunk)))
        parse = _parse_flags
        return {uid: MessageRecord(uid, key, parse(flags), size, mid) for uid, key, flags, size, mid in rows}

    def uids(self, account: str, mailbox: str) -> set[int]:
        """The UIDs we have, without their rows: cheap next to :meth:`messages`."""
        return {
            uid
            for (uid,) in self._db.execute(
                "SELECT uid FROM message WHERE account = ? AND mailbox = ?", (account, mailbox)
            )
        }

    def keys(self, account: str, mailbox: str) -> list[tuple[str, str]]:
        """(key, flags as stored: space separated, sorted) of every row, unparsed: for quick checks."""
        return self._db.execute(
            "SELECT key, flags FROM message WHERE account = ? AND mailbox = ?", (account, mailbox)
        ).fetchall()

    def iter_keys(self, account: str, mailbox: str) -> Iterator[tuple[str, str]]:
        """:meth:`keys`, one row at a time from the cursor: a check over 100,000 rows need not hold them all.

        Consume it before the next write to the DB (the reactor thread's
        synchronous code does).
        """
        return iter(self._db.execute(
            "SELECT key, flags FROM message WHERE account = ? AND mailbox = ?", (account, mailbox)
        ))

    def summary(self, account: str, mailbox: str) -> tuple[int, int]:
        """How many rows the mailbox has and its highest UID (0 when none): one index scan."""
        count, highest = self._db.execute(
            "SELECT COUNT(*), MAX(uid) FROM message WHERE account = ? AND mailbox = ?", (account, mailbox)
        ).fetchone()
        return count, highest or 0

    def highest_uid(self, account: str, mailbox: str) -> int | None:
        """The highest UID we have: new mail is what lies above it. An index lookup."""
        row = self._db.execute(
            "SELECT MAX(uid) FROM message WHERE account = ? AND mailbox = ?", (account, mailbox)
        ).fetchone()
        return row[0] if row else None

    def add_messages(
        self, account: str, mailbox: str, records: Iterable[MessageRecord]
    ) -> None:
        """Record messages in one transaction.

        A row for the same uid and file is updated (flags, size); one that
        would give a recorded or pending uid another file raises
        :class:`SecondFile` and records nothing.
        """

        def rows() -> Iterator[tuple[str, str, int, str, str, int | None, str | None]]:
            for r in records:
                if not r.key:
                    raise ValueError(f"empty key for uid {r.uid}")
                flags = _canonical_flags(r.flags)
                yield (account, mailbox, _check_uid(r.uid), r.key, flags, r.size, r.message_id)

        with _refusing_second_files(), self.transaction():
            self._db.executemany(
                "INSERT INTO message (account, mailbox, uid, key, flags, size, message_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (account, mailbox, uid) DO UPDATE SET"
                " flags = excluded.flags, size = excluded.size,"
                " message_id = coalesce(excluded.message_id, message_id)",
                rows(),
            )

    def set_flags(
        self, account: str, mailbox: str, changes: Mapping[int, Flags], *, durable: bool = True
    ) -> None:
        """Update flags in one transaction; a uid without a row is skipped.

        ``durable=False`` skips the fsync, for updates a lost commit cannot
        hurt: the row keeps the old flags, the Maildir's stamp no longer
        matches the one on record, and the next sync compares files, rows
        and server again.
        """
        params = [
            (_canonical_flags(flags), account, mailbox, _check_uid(uid))
            for uid, flags in changes.items()
        ]
        with self._synchronous("NORMAL" if not durable and self._depth == 0 else None), self.transaction():
            self._db.executemany(
                "UPDATE message SET flags = ? WHERE account = ? AND mailbox = ? AND uid = ?",
                params,
            )

    def remove_messages(self, account: str, mailbox: str, uids: Iterable[int]) -> None:
        params = [(account, mailbox, _check_uid(uid)) for uid in uids]
        with self.transaction():
            self._db.executemany(
                "DELETE FROM message WHERE account = ? AND mailbox = ? AND uid = ?", params
            )

    # -- deliveries in flight ----------------------------------------------

    def add_pending(self, account: str, mailbox: str, records: Iterable[MessageRecord]) -> set[int]:
        """Record messages about to be renamed into place (see the ``pending`` table).

        Returns the uids refused: those already recorded or pending (a retry,
        or two fetches racing). Their new files must not be put in place:
        the caller discards them. The others are recorded in one transaction.
        """
        rows = [
            (account, mailbox, _check_uid(r.uid), r.key, _canonical_flags(r.flags), r.size, r.message_id)
            for r in records
        ]
        with _refusing_second_files(), self.transaction():
            taken = self._taken(account, mailbox, [row[2] for row in rows])
            self._db.executemany(
                "INSERT INTO pending (account, mailbox, uid, key, flags, size, message_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [row for row in rows if row[2] not in taken],
            )
        return taken

    def _taken(self, account: str, mailbox: str, uids: list[int]) -> set[int]:
        """Which of ``uids`` are recorded or pending already."""
        taken: set[int] = set()
        for i in range(0, len(uids), _IN_CHUNK):
            chunk = uids[i : i + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            for table in ("message", "pending"):
                taken.update(
                    uid
                    for (uid,) in self._db.execute(
                        f"SELECT uid FROM {table} WHERE account = ? AND mailbox = ? AND uid IN ({marks})",
                        (account, mailbox, *chunk),
                    )
                )
        return taken

    def pending(self, account: str, mailbox: str) -> dict[int, MessageRecord]:
        rows = self._db.execute(
            "SELECT uid, key, flags, size, message_id FROM pending WHERE account = ? AND mailbox = ?",
            (account, mailbox),
        )
        return {uid: MessageRecord(uid, key, _parse_flags(flags), size, mid) for uid, key, flags, size, mid in rows}

    def promote_pending(self, account: str, mailbox: str, uids: Iterable[int]) -> None:
        """The files are in place: make their rows real, in one transaction.

        Not fsynced: should a power cut lose this commit, the pending rows
        (committed, fsynced, before the renames) are still there, and the
        next start's recovery adopts each whose file is in place, which is
        what this commit does. Any later fsynced commit makes it durable
        too (WAL keeps commits in order). This halves the fsyncs of a catch-up
        that fetches a few messages in each of many mailboxes.
        """
        checked = [_check_uid(uid) for uid in uids]
        with _refusing_second_files(), self._synchronous("NORMAL" if self._depth == 0 else None), self.transaction():
            # A statement per chunk of UIDs rather than per UID: a first sync
            # promotes 250 at a time, and one row's statement cost 3 us more
            # than its share of a chunk's (10,000 messages: 60 -> 35 ms).
            for i in range(0, len(checked), _IN_CHUNK):
                chunk = checked[i : i + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                self._db.execute(
                    "INSERT INTO message (account, mailbox, uid, key, flags, size, message_id)"
                    " SELECT account, mailbox, uid, key, flags, size, message_id FROM pending"
                    f" WHERE account = ? AND mailbox = ? AND uid IN ({marks})"
                    " ON CONFLICT (account, mailbox, uid) DO UPDATE SET"
                    " flags = excluded.flags, size = excluded.size, message_id = excluded.message_id",
                    (account, mailbox, *chunk),
                )
                self._db.execute(
                    f"DELETE FROM pending WHERE account = ? AND mailbox = ? AND uid IN ({marks})",
                    (account, mailbox, *chunk),
                )

    def drop_pending(self, account: str, mailbox: str, uids: Iterable[int]) -> None:
        params = [(account, mailbox, _check_uid(uid)) for uid in uids]
        with self.transaction():
            self._db.executemany(
                "DELETE FROM pending WHERE account = ? AND mailbox = ? AND uid = ?", params
            )

    def count(self, account: str, mailbox: str) -> int:
        return self._db.execute(
            "SELECT COUNT(*) FROM message WHERE account = ? AND mailbox = ?",
            (account, mailbox),
        ).fetchone()[0]

    # -- two-way intents ----------------------------------------------------

    def add_intent(self, intent: Intent) -> int:
        """Record an intent durably (fsynced) before the server is told; returns its id."""
        with self.transaction():
            cursor = self._db.execute(
                "INSERT INTO outbox (account, mailbox, key, kind, source, source_uid, uidvalidity, uidnext,"
                " message_id, size, flags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (intent.account, intent.mailbox, intent.key, intent.kind, intent.source, intent.source_uid,
                 intent.uidvalidity, intent.uidnext, intent.message_id, intent.size, _canonical_flags(intent.flags)),
            )
        return int(cursor.lastrowid or 0)

    def intents(self, account: str) -> list[Intent]:
        rows = self._db.execute(
            "SELECT id, account, mailbox, key, kind, source, source_uid, uidvalidity, uidnext, message_id, size,"
            " flags FROM outbox WHERE account = ? ORDER BY id",
            (account,),
        ).fetchall()
        return [Intent(*row[:11], _parse_flags(row[11])) for row in rows]

    def drop_intent(self, intent_id: int) -> None:
        with self.transaction():
            self._db.execute("DELETE FROM outbox WHERE id = ?", (intent_id,))

    def rekey(self, account: str, mailbox: str, uid: int, key: str, flags: Flags) -> None:
        """A reader renamed a file (mu): the row names the new key, in one transaction."""
        with self.transaction():
            row = self._db.execute(
                "SELECT size, message_id FROM message WHERE account = ? AND mailbox = ? AND uid = ?",
                (account, mailbox, uid),
            ).fetchone()
            if row is None:
                return
            self._db.execute("DELETE FROM message WHERE account = ? AND mailbox = ? AND uid = ?",
                             (account, mailbox, uid))
            self._db.execute(
                "INSERT INTO message (account, mailbox, uid, key, flags, size, message_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (account, mailbox, _check_uid(uid), key, _canonical_flags(flags), row[0], row[1]),
            )

    def move_row(
        self, account: str, source: str, source_uid: int | None, target: str, record: MessageRecord,
        intent_id: int | None = None,
    ) -> None:
        """A message moved (or appended) on the server: one transaction drops the
        source row and the intent and records the target's."""
        with _refusing_second_files(), self.transaction():
            if source_uid is not None:
                self._db.execute("DELETE FROM message WHERE account = ? AND mailbox = ? AND uid = ?",
                                 (account, source, source_uid))
            self._db.execute(
                "INSERT INTO message (account, mailbox, uid, key, flags, size, message_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (account, mailbox, uid) DO UPDATE SET flags = excluded.flags, size = excluded.size,"
                " message_id = excluded.message_id",
                (account, target, _check_uid(record.uid), record.key, _canonical_flags(record.flags), record.size,
                 record.message_id),
            )
            if intent_id is not None:
                self._db.execute("DELETE FROM outbox WHERE id = ?", (intent_id,))
