"""Another mail client on the test server: it delivers, flags and expunges while mirrord watches."""

from __future__ import annotations

import datetime as _dt
import imaplib
import re
import select
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

from mirrord.testing._errors import ImapCommandError

T = TypeVar("T")


def encode_mailbox(name: str) -> str:
    """Spell a UTF-8 mailbox name in IMAP's modified UTF-7 (RFC 3501 5.1.3)."""
    import twisted.mail.imap4  # noqa: F401  (registers the "imap4-utf-7" codec)

    return name.encode("imap4-utf-7").decode("ascii")


def decode_mailbox(name: bytes) -> str:
    import twisted.mail.imap4  # noqa: F401

    return name.decode("imap4-utf-7")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _uid_set(uids: int | Iterable[int]) -> str:
    """Compress UIDs into ranges, so that thousands of them fit on one command line."""
    from mirrord.protocol.client import uid_set

    return uid_set((uids,) if isinstance(uids, int) else uids).decode("ascii")


def _flag_list(flags: Iterable[str]) -> str:
    if isinstance(flags, str):
        flags = (flags,)
    return "(" + " ".join(flags) + ")"


_FETCH_START = re.compile(rb"\d+ \(")
_FETCH_UID = re.compile(rb"\bUID (\d+)")
_FETCH_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")


def _fetch_records(data: list[bytes | tuple[bytes, bytes] | None]) -> list[tuple[bytes, bytes | None]]:
    """Regroup imaplib's FETCH data into (response text, literal) per message.

    imaplib hands back a flat list: a tuple for each part that ended in a
    literal, bytes for the text after it; and whatever else the server
    volunteered (a flag change by another session) as more bytes.
    """
    records: list[tuple[bytes, bytes | None]] = []
    for item in data:
        if item is None:
            continue
        if isinstance(item, tuple):
            head, literal = item
            if records and not _FETCH_START.match(head):
                text, previous = records[-1]
                records[-1] = (text + head, previous if previous is not None else literal)
            else:
                records.append((head, literal))
        elif _FETCH_START.match(item) or not records:
            records.append((item, None))
        else:
            text, body = records[-1]
            records[-1] = (text + item, body)
    return records


def _parse_flags(text: bytes) -> frozenset[str]:
    match = _FETCH_FLAGS.search(text)
    if not match:
        return frozenset()
    # \Recent belongs to a session, not to the message; a mirror cannot hold it.
    return frozenset(f for f in match.group(1).decode("ascii").split() if f != "\\Recent")


class ImapClient:
    """Another mail client on the server: delivers, flags and expunges while mirrord watches.

    Built on stdlib :mod:`imaplib` so that it shares no code with the
    Twisted protocol code under test. It holds one connection, opened at
    first use and closed by :meth:`close`; tests that count connections
    against ``mail_max_userip_connections`` should close it first. Every
    call selects its mailbox afresh, so it always sees the current state.
    Mailbox names are ordinary (UTF-8) strings with ``/`` as the hierarchy
    separator. Not thread-safe.
    """

    def __init__(self, host: str, port: int, user: str, password: str, *, timeout: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.timeout = timeout
        self._conn: imaplib.IMAP4 | None = None
        self._last_used = 0.0

    def __repr__(self) -> str:
        return f"<ImapClient {self.user}@{self.host}:{self.port}>"

    def __enter__(self) -> ImapClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.logout()
        except (imaplib.IMAP4.error, OSError):
            try:
                conn.shutdown()
            except OSError:
                pass

    # -- connection --------------------------------------------------------

    def _connection(self) -> imaplib.IMAP4:
        conn = self._conn
        if conn is not None and self._hung_up(conn):
            self._drop()
            conn = None
        if conn is not None and time.monotonic() - self._last_used > 20:
            # The server may have logged an idle session out, or been restarted.
            try:
                conn.noop()
            except (imaplib.IMAP4.error, OSError):
                self._drop()
                conn = None
        if conn is None:
            conn = imaplib.IMAP4(self.host, self.port, timeout=self.timeout)
            try:
                # AUTHENTICATE PLAIN carries any password, UTF-8 included,
                # with no quoting rules to get wrong.
                credentials = f"\0{self.user}\0{self.password}".encode()
                conn.authenticate("PLAIN", lambda _challenge: credentials)
            except BaseException:
                conn.shutdown()
                raise
            self._conn = conn
        self._last_used = time.monotonic()
        return conn

    @staticmethod
    def _hung_up(conn: imaplib.IMAP4) -> bool:
        """True if the server spoke while we were silent: that is a BYE, or EOF.

        Between commands, with no IDLE, Dovecot sends nothing else; a test
        that kicked the user or restarted the server should get a new
        connection, not an error from the old one.
        """
        try:
            readable, _, _ = select.select([conn.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _read(self, call: Callable[[], T]) -> T:
        """Run a read-only operation, once more on a new connection if the old one broke.

        Only for commands that change nothing: a write that broke may or may
        not have happened, and only the caller can tell.
        """
        try:
            return call()
        except (imaplib.IMAP4.abort, OSError):
            self._drop()
            return call()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.shutdown()
            except OSError:
                pass

    def _run(self, what: str, call: Callable[..., tuple[str, list[Any]]], *args: object) -> list[Any]:
        """Call an imaplib method; raise on NO/BAD; drop a connection that broke."""
        try:
            typ, data = call(*args)
        except imaplib.IMAP4.abort:
            self._drop()
            raise
        except imaplib.IMAP4.error as e:
            raise ImapCommandError(f"{what}: {e}") from e
        except OSError:
            self._drop()
            raise
        if typ != "OK":
            text = b" ".join(d for d in data if isinstance(d, bytes)).decode("utf-8", "replace")
            raise ImapCommandError(f"{what}: {typ} {text}")
        return list(data)

    def _select(self, mailbox: str, readonly: bool) -> tuple[imaplib.IMAP4, int]:
        conn = self._connection()
        data = self._run(
            f"{'EXAMINE' if readonly else 'SELECT'} {mailbox!r}",
            conn.select,
            _quote(encode_mailbox(mailbox)),
            readonly,
        )
        return conn, int(data[0] or 0)

    def _unselect(self, conn: imaplib.IMAP4) -> None:
        if conn.state == "SELECTED":
            self._run("UNSELECT", conn.unselect)

    # -- mailboxes ---------------------------------------------------------

    def create(self, mailbox: str, *, exist_ok: bool = True) -> None:
        """Create ``mailbox`` (and any missing parents: ``Archive/2024`` makes ``Archive``)."""
        conn = self._connection()
        try:
            self._run(f"CREATE {mailbox!r}", conn.create, _quote(encode_mailbox(mailbox)))
        except ImapCommandError as e:
            if not (exist_ok and "ALREADYEXISTS" in str(e)):
                raise

    def delete(self, mailbox: str) -> None:
        conn = self._connection()
        self._unselect(conn)
        self._run(f"DELETE {mailbox!r}", conn.delete, _quote(encode_mailbox(mailbox)))

    def rename(self, old: str, new: str) -> None:
        conn = self._connection()
        self._unselect(conn)
        self._run(f"RENAME {old!r} {new!r}", conn.rename, _quote(encode_mailbox(old)), _quote(encode_mailbox(new)))

    def mailboxes(self) -> list[str]:
        """Every mailbox name the server lists, decoded to UTF-8, in server order."""
        data = self._read(lambda: self._run("LIST", self._connection().list, '""', '"*"'))
        names = []
        for item in data:
            if item is None:
                continue
            if isinstance(item, tuple):
                names.append(decode_mailbox(item[1]))
                continue
            match = re.fullmatch(rb'\((?:[^)]*)\) (?:"(?:[^"\\]|\\.)*"|NIL) (.*)', item)
            if not match:
                raise ImapCommandError(f"LIST: cannot parse {item!r}")
            raw = match.group(1)
            if raw.startswith(b'"'):
                raw = re.sub(rb"\\(.)", rb"\1", raw[1:-1])
            names.append(decode_mailbox(raw))
        return names

    def status(self, mailbox: str) -> dict[str, int]:
        """STATUS MESSAGES UIDNEXT UIDVALIDITY UNSEEN HIGHESTMODSEQ, as a dict."""
        items = "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN HIGHESTMODSEQ)"
        data = self._read(
            lambda: self._run(
                f"STATUS {mailbox!r}", self._connection().status, _quote(encode_mailbox(mailbox)), items
            )
        )
        # The item list is the last parenthesised group; the mailbox name
        # before it may itself look like "NAME 12".
        last = data[-1]
        text = last if isinstance(last, bytes) else b""
        items_text = text[text.rfind(b"(") :]
        return {k.decode(): int(v) for k, v in re.findall(rb"([A-Z]+) (\d+)", items_text)}

    def uidvalidity(self, mailbox: str) -> int:
        return self.status(mailbox)["UIDVALIDITY"]

    # -- messages ----------------------------------------------------------

    def append(
        self,
        mailbox: str,
        message: bytes,
        flags: Iterable[str] = (),
        *,
        internal_date: _dt.datetime | None = None,
    ) -> int:
        """APPEND ``message`` byte for byte and return its UID (from UIDPLUS's APPENDUID).

        imaplib's own append() rewrites bare CR and LF to CRLF; a test of
        byte-exact mirroring needs the bytes it gave to be the bytes stored,
        so the literal is handed to imaplib directly.
        """
        conn = self._connection()
        self._unselect(conn)
        date = imaplib.Time2Internaldate(internal_date) if internal_date is not None else None
        conn.literal = message  # type: ignore[assignment]  # typeshed says str; imaplib sends bytes as is
        data = self._run(
            f"APPEND {mailbox!r}",
            conn._simple_command,
            "APPEND",
            _quote(encode_mailbox(mailbox)),
            _flag_list(flags),
            date,
        )
        for item in data:
            if isinstance(item, bytes) and (match := _APPENDUID.search(item)):
                return int(match.group(2))
        raise ImapCommandError(f"APPEND {mailbox!r}: no APPENDUID in {data!r}")

    def _store(self, mailbox: str, uids: int | Iterable[int], how: str, flags: Iterable[str]) -> None:
        conn, _ = self._select(mailbox, readonly=False)
        self._run(
            f"UID STORE {how} {mailbox!r}",
            conn.uid,
            "STORE",
            _uid_set(uids),
            how,
            _flag_list(flags),
        )

    def set_flags(self, mailbox: str, uid: int | Iterable[int], flags: Iterable[str]) -> None:
        """Replace the flags of the message(s) with ``flags``."""
        self._store(mailbox, uid, "FLAGS.SILENT", flags)

    def add_flags(self, mailbox: str, uid: int | Iterable[int], flags: Iterable[str]) -> None:
        self._store(mailbox, uid, "+FLAGS.SILENT", flags)

    def remove_flags(self, mailbox: str, uid: int | Iterable[int], flags: Iterable[str]) -> None:
        self._store(mailbox, uid, "-FLAGS.SILENT", flags)

    def expunge(self, mailbox: str, uids: int | Iterable[int]) -> None:
        """Expunge exactly these UIDs (UID EXPUNGE), leaving other \\Deleted messages alone."""
        uid_set = _uid_set(uids)
        conn, _ = self._select(mailbox, readonly=False)
        self._run(f"UID STORE {mailbox!r}", conn.uid, "STORE", uid_set, "+FLAGS.SILENT", "(\\Deleted)")
        self._run(f"UID EXPUNGE {mailbox!r}", conn.uid, "EXPUNGE", uid_set)

    def uids(self, mailbox: str) -> list[int]:
        return self._read(lambda: self._uids(mailbox))

    def _uids(self, mailbox: str) -> list[int]:
        conn, exists = self._select(mailbox, readonly=True)
        if not exists:
            return []
        data = self._run(f"UID SEARCH {mailbox!r}", conn.uid, "SEARCH", "ALL")
        return sorted(int(u) for item in data if item for u in item.split())

    def flags(self, mailbox: str) -> dict[int, frozenset[str]]:
        """UID -> flags of every message (without the session-bound \\Recent)."""
        return self._read(lambda: self._flags(mailbox))

    def _flags(self, mailbox: str) -> dict[int, frozenset[str]]:
        conn, exists = self._select(mailbox, readonly=True)
        if not exists:
            return {}
        data = self._run(f"UID FETCH FLAGS {mailbox!r}", conn.uid, "FETCH", "1:*", "(UID FLAGS)")
        result = {}
        for text, _ in _fetch_records(data):
            uid = _FETCH_UID.search(text)
            if uid and _FETCH_FLAGS.search(text):
                result[int(uid.group(1))] = _parse_flags(text)
        return result

    def messages(self, mailbox: str) -> dict[int, tuple[frozenset[str], bytes]]:
        """UID -> (flags, BODY[] exactly as the server sends it), without setting \\Seen."""
        return self._read(lambda: self._messages(mailbox))

    def _messages(self, mailbox: str) -> dict[int, tuple[frozenset[str], bytes]]:
        conn, exists = self._select(mailbox, readonly=True)
        if not exists:
            return {}
        data = self._run(
            f"UID FETCH BODY.PEEK[] {mailbox!r}", conn.uid, "FETCH", "1:*", "(UID FLAGS BODY.PEEK[])"
        )
        result = {}
        for text, literal in _fetch_records(data):
            uid = _FETCH_UID.search(text)
            if uid is None or literal is None:
                continue
            result[int(uid.group(1))] = (_parse_flags(text), literal)
        return result


