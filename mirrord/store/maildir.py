"""The Maildir store: the only code that creates, renames or removes message files.

Mail readers (neomutt, aerc, mu, notmuch) watch ``new/`` and ``cur/`` and may
read a file the moment its name appears there, so a file may appear there
only complete and durable (DESIGN invariant 1): it is written in ``tmp/``,
fsynced, closed, renamed into place, and the target directory is fsynced
before the caller is told the key. Only then may the state DB row that points
at it be committed.

The mirror is one-way: a file name carries exactly the server's flags that a
Maildir name can express (see :mod:`mirrord.flags`). Readers may rename files
(new/ -> cur/, flag letters); such files are still found by their key, the
unique name before the ``:2,`` info.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import shutil
import socket
import stat
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from mirrord._dirs import make_private_dirs
from mirrord.flags import Flags, flags_from_info, is_seen, maildir_info
from mirrord.headers import message_id
from mirrord.store.newlines import crlf_to_lf
from mirrord.sync.names import NAME_MAX, flat_name, visible

log = logging.getLogger("mirrord.store")

DIR_MODE = 0o700
FILE_MODE = 0o600

_SUBDIRS = ("cur", "new", "tmp")

# Socket chunks can be tiny (a literal split over many TCP segments); batching
# them saves syscalls without holding much memory.
_WRITE_BUFFER = 64 * 1024
_IOV_MAX = 512

# Per-process part of unique names. A forked child that inherits the counter
# still produces different names: its pid and random bits are read anew (_after_fork).
_counter = itertools.count(1)

# Keys of tmp/ files this process is still writing, across all Maildir
# instances, so that clean_tmp() never pulls a file from under a live fetch.
_live_tmp: set[str] = set()

# Messages being written or waiting for their fsync or rename, and Maildirs
# holding reserved files: what abort_unfinished() cleans up at shutdown.
_unfinished: weakref.WeakSet[TmpMessage] = weakref.WeakSet()
_reserving: weakref.WeakSet[Maildir] = weakref.WeakSet()


def abort_unfinished() -> int:
    """Remove every tmp/ file of this process not delivered yet; returns how many.

    For the end of the process, once no thread works on them any more:
    work handed to threads whose results the stopped reactor will never
    see would otherwise leave its files in tmp/ until the next start.
    """
    count = 0
    for tmp in list(_unfinished):
        tmp.abort()
        count += 1
    for md in list(_reserving):
        count += md.reserved
        md.release_reserve()
    return count


MAX_RESERVED = 256
"""Most tmp/ files made ahead, open, across all Maildirs of the process."""
_reserved_lock = threading.Lock()
_reserved_count = 0


def _reserved_take(wanted: int) -> int:
    global _reserved_count
    with _reserved_lock:
        n = max(0, min(wanted, MAX_RESERVED - _reserved_count))
        _reserved_count += n
        return n


def _reserved_release(n: int) -> None:
    global _reserved_count
    with _reserved_lock:
        _reserved_count -= n


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A message file found in ``new/`` or ``cur/``."""

    subdir: str
    """``"new"`` or ``"cur"``."""
    filename: str
    flags: Flags
    """The IMAP flags the name's info letters stand for (unknown letters ignored)."""

    @property
    def key(self) -> str:
        return split_name(self.filename)[0]


def split_name(filename: str) -> tuple[str, str]:
    """Split a Maildir file name into its key and its ``2,`` info letters.

    Everything after the first ``:`` is info by the Maildir spec, so the key
    is what precedes it; an info that is not version 2 carries no flags.
    Names without ``:`` may use ``!2,`` (filesystems that forbid ``:``); our
    own keys never contain ``!``, so the last ``!2,`` is the separator.
    """
    colon = filename.find(":")
    if colon >= 0:
        info = filename[colon + 1 :]
        return filename[:colon], info[2:] if info.startswith("2,") else ""
    bang = filename.rfind("!2,")
    if bang >= 0:
        return filename[:bang], filename[bang + 3 :]
    return filename, ""


def _escaped_hostname() -> str:
    # "/" would make a path and ":" would start the info; "!" is escaped too
    # because "!2," is accepted as an info separator when scanning.
    host = socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072").replace("!", "\\041")


_process_random = os.urandom(8).hex()
"""64 random bits drawn once per process (and again in a forked child)."""
_pid = os.getpid()
_host = ""
_host_second = -1
"""The second in which the hostname was last read: it is read at most once a second."""


def _after_fork() -> None:
    global _process_random, _pid
    _process_random = os.urandom(8).hex()
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def unique_name() -> str:
    """A Maildir unique name that no other delivery, in any process, will produce.

    Time, pid and a per-process counter make it unique on this host (the
    counter survives clock steps backwards); 64 random bits, drawn once per
    process, cover pid reuse across a reboot and hosts sharing the
    directory; the hostname comes last as the Maildir convention has it.
    The random bits and the hostname are not fetched per name: a first sync
    makes thousands of names, in the fsync threads, and each system call
    there hands the interpreter lock back and forth with the reading thread.
    """
    global _host, _host_second
    sec, nsec = divmod(time.time_ns(), 1_000_000_000)
    if sec != _host_second:
        _host, _host_second = _escaped_hostname(), sec
    return f"{sec}.M{nsec // 1000}P{_pid}Q{next(_counter)}R{_process_random}.{_host}"


def _placement(key: str, flags: Flags, in_cur: bool) -> tuple[str, str]:
    """Where a message with ``flags`` belongs: (subdir, filename).

    \\Seen mail goes to cur/. Unseen mail stays in cur/ when it is already
    there: readers move mail they have listed from new/ to cur/, and moving it
    back would fight them and re-announce it as new. Names in cur/ always carry
    an info part; in new/ only when there are letters to carry.
    """
    letters = maildir_info(flags)
    if in_cur or is_seen(flags):
        return "cur", f"{key}:2,{letters}"
    return "new", f"{key}:2,{letters}" if letters else key


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dir(path: Path) -> None:
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
        return
    # mkdir's mode is filtered by the umask; the mail must be private anyway.
    os.chmod(path, DIR_MODE)
    _fsync_dir(path.parent)


HEAD_LIMIT = 65536
"""How much of a message's start is kept to find its Message-ID in."""


class TmpMessage:
    """A message being written into ``tmp/``; hand it to :meth:`Maildir.deliver` or abort it.

    IMAP sends messages with CRLF line ends, Maildir files use LF. The
    conversion is done while streaming, so a CR that ends a chunk is held
    back until the next chunk (or delivery) shows whether an LF follows.
    """

    __slots__ = (
        "key", "_path", "size", "_fd", "_pending", "_pending_len", "_held_cr", "_state", "_head",
        "_message_id", "_fd_lock", "__weakref__",
    )
    # Slots, not a dict: a first sync holds a few thousand of these at a time
    # (groups waiting for their fsyncs), and reads their fields per chunk.

    def __init__(self, key: str, path: str | Path, fd: int) -> None:
        self.key = key
        self._path = os.fspath(path)
        """A string: a Path per message costs more than the rest of its bookkeeping."""
        self.size = 0
        """Bytes of converted message accepted so far; the file's size once delivered."""
        self._fd: int | None = fd
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._held_cr = False
        self._state = "open"  # open -> written -> closed -> delivered; or -> failed/aborted
        self._head: bytearray | None = bytearray()
        """The header block, kept until its end is seen (or HEAD_LIMIT): see :attr:`message_id`."""
        self._message_id: str | None = None
        self._fd_lock = threading.Lock()
        _unfinished.add(self)

    @property
    def path(self) -> Path:
        return Path(self._path)

    def __enter__(self) -> TmpMessage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Leaving the block without delivering means the fetch did not finish.
        if self._state != "delivered":
            self.abort()

    def write(self, data: bytes | memoryview) -> None:
        """Append a chunk; on a disk error the file is aborted and the OSError raised.

        A memoryview (of the network read, by the protocol reader) is read
        in place: the converted copy is the only one made of a body's bytes.
        """
        if self._state != "open":
            raise ValueError(f"write to a {self._state} message {self.key}")
        if not data:
            return
        if self._held_cr:
            data = b"\r" + data
            self._held_cr = False
        if data[-1] == 13:  # a CR: the LF that may follow is in the next chunk
            self._held_cr = True
            data = data[:-1]
        # Every piece handed on ends in a byte other than CR (the held one
        # starts the next piece), so no CRLF can straddle two pieces.
        out = crlf_to_lf(data)
        if not out:
            return
        if self._head is not None:
            self._look_at_head(out)
        self._pending.append(out)
        self._pending_len += len(out)
        self.size += len(out)
        if self._pending_len >= _WRITE_BUFFER:
            try:
                self._drain()
            except BaseException:
                self.abort()
                raise

    @property
    def buffered(self) -> int:
        """Bytes accepted and not written to the file yet (under 64 KB while it is open)."""
        return self._pending_len + self._held_cr

    def _look_at_head(self, out: bytes) -> None:
        """Read the Message-ID once the header block is complete in what streamed by.

        Only the header block (up to its blank line) is parsed and copied:
        the first chunk usually holds the whole header and much of the body
        (up to 64 KB), and splitting all of it into lines cost more than the
        rest of a message's handling (a 10,000-message first sync: 0.3 s).
        message_id() stops at the first empty line, so the answer is the
        same as from the whole chunk.
        """
        head = self._head
        assert head is not None
        if not head:
            end = out.find(b"\n\n", 0, HEAD_LIMIT)
            if end >= 0 or len(out) >= HEAD_LIMIT:
                self._message_id = message_id(out[: end + 2] if end >= 0 else out[:HEAD_LIMIT])
                self._head = None
            else:
                head += out
            return
        start = len(head) - 1  # the blank line may straddle the two pieces
        head += out[: HEAD_LIMIT - len(head)]
        end = head.find(b"\n\n", start)
        if end >= 0 or len(head) >= HEAD_LIMIT:
            self._message_id = message_id(bytes(head[: end + 2] if end >= 0 else head))
            self._head = None

    @property
    def message_id(self) -> str | None:
        """The message's Message-ID, read from its header as it streamed by (None: it has none)."""
        if self._head is not None:  # a message that is all header, or not complete yet
            return message_id(bytes(self._head[:HEAD_LIMIT]))
        return self._message_id

    def abort(self) -> None:
        """Close and unlink; safe to call more than once, after a failed delivery, and
        while another thread is in :meth:`sync` (it waits for it)."""
        if self._state == "delivered":
            return
        with self._fd_lock:
            self._state = "aborted"
            self._pending.clear()
            _live_tmp.discard(self.key)
            _unfinished.discard(self)
            if self._fd is not None:
                fd, self._fd = self._fd, None
                try:
                    os.close(fd)
                except OSError:
                    pass
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass

    def _drain(self) -> None:
        assert self._fd is not None
        pieces = self._pending
        self._pending = []
        self._pending_len = 0
        if len(pieces) == 1:
            data = pieces[0]
        else:
            # One writev rather than a join: no copy of the pieces.
            total = sum(len(p) for p in pieces)
            done = 0
            while pieces and done < total:
                written = os.writev(self._fd, pieces[:_IOV_MAX])
                done += written
                # Drop the pieces written whole; a short write falls through.
                while pieces and written >= len(pieces[0]):
                    written -= len(pieces[0])
                    pieces.pop(0)
                if written:
                    pieces[0] = pieces[0][written:]
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def close_write(self, flush: bool = True) -> None:
        """The message is complete, no more writes; write out what is buffered.

        The descriptor stays open for :meth:`sync`, which may then run in
        another thread while this one goes on reading the network. With
        ``flush`` False the buffered tail (all of a message under
        :data:`_WRITE_BUFFER`) is written by :meth:`sync` instead, in that
        thread: a write waits for page-cache allocation, and the reading
        thread has better things to do. An error writing it is then raised
        by :meth:`sync`, like an fsync's.
        """
        if self._state == "written":
            return
        if self._state != "open":
            raise ValueError(f"close_write of a {self._state} message {self.key}")
        assert self._fd is not None
        if self._held_cr:
            # A CR at the very end has no LF after it: it is data.
            self._held_cr = False
            self._pending.append(b"\r")
            self._pending_len += 1
            self.size += 1
        if flush:
            try:
                self._drain()
            except BaseException:
                self.abort()
                raise
        self._state = "written"

    def sync(self) -> None:
        """Make the written content durable and release the file descriptor.

        Safe to call from a thread other than the one that wrote the file:
        it touches only the descriptor, under a lock that :meth:`abort`
        takes too, so an abort meanwhile never closes a descriptor number
        that is in use (or already reused by another file).
        """
        with self._fd_lock:
            if self._state == "closed":
                return
            if self._state != "written" or self._fd is None:
                raise ValueError(f"sync of a {self._state} message {self.key}")
            try:
                if self._pending:
                    self._drain()
                os.fsync(self._fd)
            except BaseException:
                # A second fsync after a failed one may report success for
                # data that never reached the disk: this file is done for.
                self._state = "failed"
                raise
            fd, self._fd = self._fd, None
            self._state = "closed"
            os.close(fd)

    def finish(self) -> None:
        """Write out, make durable and release the file descriptor (:meth:`close_write`, :meth:`sync`).

        Delivery does this too; calling it as soon as the last byte arrives
        keeps a large fetch batch from holding one open descriptor per message.
        """
        if self._state == "closed":
            return
        if self._state not in ("open", "written"):
            raise ValueError(f"deliver of a {self._state} message {self.key}")
        self.close_write()
        self.sync()

    @property
    def synced(self) -> bool:
        """Durable and closed: ready to be renamed into place."""
        return self._state == "closed"

    def _delivered(self) -> None:
        self._state = "delivered"
        _live_tmp.discard(self.key)
        _unfinished.discard(self)


class Trash:
    """Where removed copies wait ``days`` before they are really deleted.

    A mirror removes local mail on the server's word; when that word is wrong
    (a server bug, a mistaken rule, a user's slip in webmail) the copies are
    still here for a while. It lives under the state dir, out of sight of
    mail readers and indexers that would otherwise show the removed mail.

    Each mailbox has one flat directory (see :func:`trash_for`): a trash
    never holds another mailbox's trash. ``legacy`` names where older
    versions kept this mailbox's trash (nested by hierarchy); what is there
    still expires, and nothing new goes there.
    """

    def __init__(self, root: Path, days: float, legacy: Path | None = None) -> None:
        self.root = Path(root)
        self.days = days
        self.legacy = Path(legacy) if legacy is not None and Path(legacy) != Path(root) else None
        self._made = False

    def put(self, path: Path) -> None:
        """Move ``path`` into the trash (or unlink it, with a trash of 0 days)."""
        if self.days <= 0:
            os.unlink(path)
            return
        make_private_dirs(self.root)
        if not self._made:
            _tighten(self.root)
            self._made = True
        target = self.root / f"{int(time.time())}-{path.name}"
        try:
            os.rename(path, target)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.move(str(path), str(target))  # the trash is on another filesystem

    def expire(self, now: float | None = None) -> int:
        """Delete what has been in the trash longer than ``days``; returns how many.

        Only regular files named ``<epoch>-...`` are ours to delete. A
        directory (an old layout's child trash), a foreign file or an entry
        that cannot be removed is left alone and logged: cleaning the trash
        is housekeeping and must never fail a sync.
        """
        limit = (now if now is not None else time.time()) - self.days * 86400
        gone = 0
        for root in (self.root, self.legacy):
            if root is not None:
                gone += self._expire_in(root, limit)
        return gone

    def _expire_in(self, root: Path, limit: float) -> int:
        gone = 0
        try:
            with os.scandir(root) as entries:
                for entry in entries:
                    stamp, _, _ = entry.name.partition("-")
                    if not (stamp.isdigit() and int(stamp) < limit):
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            continue
                        os.unlink(entry.path)
                        gone += 1
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        log.warning("trash %s: cannot delete %s: %s", root, visible(entry.name), e)
        except FileNotFoundError:
            return gone
        except OSError as e:
            log.warning("trash %s: cannot read it: %s", root, e)
        return gone


def _tighten(root: Path) -> None:
    """Make a trash and its two parents (``<kind>/<account>``) 0700 if an older version left them open.

    Those directories are ours (the state dir's own mode is left to whoever
    made it); their names are mailbox names, which other users must not read.
    """
    for d in (root.parent.parent, root.parent, root):
        try:
            if stat.S_IMODE(os.stat(d).st_mode) & 0o077:
                os.chmod(d, DIR_MODE)
        except OSError as e:
            log.warning("trash %s: cannot make it private: %s", d, e)


def trash_dir(state_dir: Path, kind: str, account: str, local_name: str) -> Path:
    """The directory of one mailbox's ``kind`` ("trash" or "set-aside") under ``state_dir``.

    One flat component per mailbox (``Archive/2024`` -> ``Archive%2F2024``),
    so no mailbox's directory is inside another's, and each component fits
    the file system's name limit.
    """
    return Path(state_dir) / kind / flat_name(account) / flat_name(local_name)


def trash_for(state_dir: Path, kind: str, account: str, local_name: str, days: float) -> Trash:
    """The :class:`Trash` of one mailbox, which also expires its old nested layout."""
    # Older versions nested the name as is; a Trash ignores a legacy dir equal to its own.
    legacy: Path | None = Path(state_dir) / kind / account / local_name
    if any(len(part.encode("utf-8", "surrogatepass")) > NAME_MAX for part in (account, *local_name.split("/"))):
        legacy = None  # could never have existed
    return Trash(trash_dir(state_dir, kind, account, local_name), days, legacy)


class Maildir:
    """One mailbox's Maildir directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._reserve: collections.deque[tuple[str, int]] = collections.deque()
        """Empty tmp/ files made ahead, key and open descriptor (appended from other threads: a deque is safe)."""
        missing: list[Path] = []
        p = self.path
        while not p.exists() and p.parent != p:
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            _make_dir(d)
        for sub in _SUBDIRS:
            _make_dir(self.path / sub)
        self._dirs = {sub: os.path.join(self.path, sub) for sub in _SUBDIRS}
        """Subdirectory paths as strings, for the per-message hot path."""
        self._tmp_prefix = self._dirs["tmp"] + os.sep

    def __repr__(self) -> str:
        return f"Maildir({str(self.path)!r})"

    # -- delivery ---------------------------------------------------------

    def open_tmp(self) -> TmpMessage:
        """A new, empty, private file in tmp/ to write a message into.

        Takes one made ahead by :meth:`reserve_tmp` when there is one:
        creating a file can cost half a millisecond (measured on ext4),
        time the caller's thread would not be reading the network.
        """
        try:
            key, fd = self._reserve.popleft()
        except IndexError:
            key, _path, fd = self._create_tmp()
        else:
            _reserved_release(1)
        return TmpMessage(key, self._tmp_prefix + key, fd)

    def _create_tmp(self) -> tuple[str, str, int]:
        for _ in range(8):
            key = unique_name()
            path = self._tmp_prefix + key
            try:
                fd = os.open(
                    path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE
                )
            except FileExistsError:
                continue
            if self._umask_strips_mode():
                try:
                    os.fchmod(fd, FILE_MODE)
                except BaseException:
                    os.close(fd)
                    os.unlink(path)
                    raise
            _live_tmp.add(key)
            return key, path, fd
        raise FileExistsError(errno.EEXIST, "could not find a free unique name", str(path))

    _mode_kept: bool | None = None

    def _umask_strips_mode(self) -> bool:
        """Whether a file made with FILE_MODE needs an fchmod to have it (the umask takes bits of 0600).

        The usual umasks (022, 077) take none: then each message file costs
        one system call less (open, write, fsync, close, rename, as mbsync),
        and in the fsync threads a call less is a hand-over of the
        interpreter lock less. Read once per Maildir from /proc (reading
        the umask otherwise means changing it, under every thread);
        where that cannot be read, every file gets its fchmod.
        """
        if self._mode_kept is None:
            kept = False
            try:
                with open("/proc/self/status", "rb") as f:
                    for line in f:
                        if line.startswith(b"Umask:"):
                            kept = not int(line.split()[1], 8) & FILE_MODE
                            break
            except (OSError, ValueError, IndexError):
                pass
            self._mode_kept = kept
        return not self._mode_kept

    def reserve_tmp(self, count: int) -> None:
        """Create up to ``count`` empty tmp/ files for :meth:`open_tmp` to hand out.

        Safe to call from another thread. Their descriptors stay open (a
        later open by name would wait for the directory lock that creations
        hold); :data:`MAX_RESERVED` bounds them across all Maildirs. Those
        left over are removed by :meth:`release_reserve`, or after a crash
        by :meth:`clean_tmp` like any other debris.
        """
        _reserving.add(self)
        for _ in range(_reserved_take(count)):
            try:
                key, _path, fd = self._create_tmp()
            except BaseException:
                _reserved_release(1)
                raise
            self._reserve.append((key, fd))

    @property
    def reserved(self) -> int:
        return len(self._reserve)

    def release_reserve(self) -> None:
        """Remove the tmp/ files made ahead and not used."""
        while self._reserve:
            key, fd = self._reserve.popleft()
            _reserved_release(1)
            _live_tmp.discard(key)
            os.close(fd)
            try:
                os.unlink(self.path / "tmp" / key)
            except FileNotFoundError:
                pass

    def deliver(self, tmp: TmpMessage, flags: Flags) -> str:
        """Move a finished message into new/ or cur/; see :meth:`deliver_many`."""
        return self.deliver_many([(tmp, flags)])[0]

    def deliver_many(self, items: Sequence[tuple[TmpMessage, Flags]]) -> list[str]:
        """Deliver a batch with one fsync per target directory; returns the keys in order.

        All or nothing: on any error every message of the batch is removed
        again (renamed ones included) and the error raised, so the caller has
        nothing to record and simply fetches the batch again.
        """
        items = list(items)
        if not items:
            return []
        moved: list[str] = []
        try:
            if len({id(tmp) for tmp, _ in items}) != len(items):
                raise ValueError("the same TmpMessage twice in one batch")
            tmp_dir = self._dirs["tmp"]
            for tmp, _ in items:
                if os.path.dirname(tmp._path) != tmp_dir:
                    raise ValueError(f"{tmp.key} was not opened in {self.path}")
            for tmp, _ in items:
                tmp.finish()
            dirs: set[str] = set()
            for tmp, flags in items:
                subdir, name = _placement(tmp.key, flags, in_cur=False)
                target = os.path.join(self._dirs[subdir], name)
                os.rename(tmp._path, target)
                moved.append(target)
                dirs.add(subdir)
            self.sync_dirs(dirs)
        except BaseException:
            # Complete files may already be visible; without a state row they
            # would be orphans the next sync fetches again as duplicates.
            for target in moved:
                try:
                    os.unlink(target)
                except OSError:
                    pass
            for tmp, _ in items:
                tmp.abort()
            raise
        for tmp, _ in items:
            tmp._delivered()
        return [tmp.key for tmp, _ in items]

    # -- reading ----------------------------------------------------------

    def _list(self) -> list[LocalFile]:
        found = []
        for subdir in ("new", "cur"):
            with os.scandir(self.path / subdir) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    try:
                        if not entry.is_file(follow_symlinks=False):
                            continue
                    except OSError:
                        continue
                    key, letters = split_name(entry.name)
                    if key:
                        found.append(LocalFile(subdir, entry.name, flags_from_info(letters)))
        return found

    def scan(self) -> dict[str, LocalFile]:
        """Every message file by key.

        If a key appears twice (a crash between the two directory fsyncs of a
        new -> cur rename, or a reader's copy), the one in cur/ wins, being
        the later state; ties go to the greatest name so the answer is stable.
        """
        result: dict[str, LocalFile] = {}
        for lf in self._list():
            prev = result.get(lf.key)
            if prev is None or _rank(lf) > _rank(prev):
                result[lf.key] = lf
        return result

    def locate(self, key: str, flags: Flags) -> LocalFile | None:
        """The file for ``key``, looked for first under the names we would have given it.

        Two stat calls instead of a directory listing, so handling one event
        costs the same in a mailbox of ten messages or of a hundred thousand;
        a name a reader changed falls back to a listing.
        """
        for in_cur in (False, True):
            subdir, name = _placement(key, flags, in_cur=in_cur)
            if os.path.exists(self.path / subdir / name):
                return LocalFile(subdir, name, flags_from_info(split_name(name)[1]))
        return self._find(key)

    def _find_all(self, key: str) -> list[LocalFile]:
        return [lf for lf in self._list() if lf.key == key]

    def _find(self, key: str) -> LocalFile | None:
        candidates = self._find_all(key)
        return max(candidates, key=_rank) if candidates else None

    # -- changing ---------------------------------------------------------

    def set_flags(
        self, key: str, flags: Flags, current: LocalFile | None = None, *, sync: bool = True
    ) -> LocalFile:
        """Rename the message so its name carries ``flags``; returns where it now is.

        ``current`` (from a scan) saves a directory listing; if a reader has
        renamed the file since, the file is looked up by key instead. Raises
        FileNotFoundError when no file has this key. ``sync=False`` leaves
        the directory fsyncs to the caller, who renames many and then calls
        :meth:`sync_dirs` once.
        """
        letters = maildir_info(flags)
        for attempt in range(3):
            found = current if attempt == 0 and current is not None else self._find(key)
            if found is None:
                break
            subdir, name = _placement(key, flags, in_cur=found.subdir == "cur")
            if subdir == found.subdir and split_name(found.filename)[1] == letters:
                return found
            source = self.path / found.subdir / found.filename
            try:
                os.rename(source, self.path / subdir / name)
            except FileNotFoundError:
                continue  # renamed or removed under us; look again
            if sync:
                self.sync_dirs({subdir, found.subdir})
            return LocalFile(subdir, name, flags_from_info(letters))
        raise FileNotFoundError(errno.ENOENT, "no message file with this key", key)

    def sync_dirs(self, subdirs: Iterable[str] = ("new", "cur")) -> None:
        """fsync each of these directories once: the renames and removals in them are durable after this."""
        for subdir in sorted(set(subdirs)):
            _fsync_dir(self.path / subdir)

    def remove(self, key: str, current: LocalFile | None = None) -> None:
        """Unlink the message; a file already gone is not an error."""
        self.remove_many([key], {key: current} if current is not None else None)

    def remove_many(
        self,
        keys: Iterable[str],
        current: Mapping[str, LocalFile] | None = None,
        trash: Trash | None = None,
    ) -> None:
        """Remove several messages with one fsync per directory.

        Keys without an entry in ``current`` (or whose entry is stale) are
        looked up with a single listing; every file with such a key goes.
        With a ``trash``, files are moved there instead of unlinked.
        """
        current = current or {}
        dirs: set[str] = set()
        lookup: set[str] = set()

        def discard(path: Path) -> None:
            if trash is not None:
                trash.put(path)
            else:
                os.unlink(path)

        for key in keys:
            lf = current.get(key)
            if lf is None:
                lookup.add(key)
                continue
            try:
                discard(self.path / lf.subdir / lf.filename)
                dirs.add(lf.subdir)
            except FileNotFoundError:
                lookup.add(key)
        if lookup:
            for lf in self._list():
                if lf.key in lookup:
                    try:
                        discard(self.path / lf.subdir / lf.filename)
                        dirs.add(lf.subdir)
                    except FileNotFoundError:
                        pass
        # Without this a crash could bring the file back after the state row
        # is gone, leaving an orphan the engine cannot account for.
        self.sync_dirs(dirs)

    def clean_tmp(self, older_than: float = 0) -> int:
        """Remove files in tmp/ at least ``older_than`` seconds old; returns how many.

        Leftovers are debris of a crash mid-fetch (nothing else writes here).
        Files this process is still writing are spared whatever their age.
        """
        now = time.time()
        removed = 0
        with os.scandir(self.path / "tmp") as entries:
            for entry in entries:
                if entry.name in _live_tmp:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode) or now - st.st_mtime < older_than:
                    continue
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                removed += 1
        return removed


def _rank(lf: LocalFile) -> tuple[bool, str]:
    return (lf.subdir == "cur", lf.filename)
