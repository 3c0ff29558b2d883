"""What the running daemon is doing, published for ``mirrord status``.

The daemon writes a small JSON snapshot (:class:`DaemonStatus`) to a file
under the user's runtime dir whenever something changes; ``mirrord status``
reads it next to the state DB. A file rather than a socket: it costs the
daemon no listener, and a reader never has to wait on a busy reactor.

Everything here is written so that ``mirrord status`` can run at any time,
with or without a daemon, and never creates or modifies a file: the state DB
is opened read-only, and a status file left behind by a daemon that died is
recognised as stale rather than believed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import platformdirs

from mirrord._dirs import make_private_dirs
from mirrord.sync.names import visible
from mirrord.units import plural
from mirrord.config import Config, default_state_dir

log = logging.getLogger("mirrord.status")

APP = "mirrord"
STATUS_VERSION = 1
STATE_DB_NAME = "state.sqlite3"
"""The state DB's file name in state_dir; the one definition of it."""
DIR_MODE = 0o700
FILE_MODE = 0o600

EXIT_OK = 0
EXIT_FAILURE = 1

ERROR_WIDTH = 60
"""Characters of an error shown in the table; --json has the whole text."""

# Mailbox states the daemon publishes; a newer daemon may add others, which
# are shown as they are rather than refused.
MAILBOX_STATES = ("starting", "syncing", "idling", "polling", "reconnecting", "error")
ACCOUNT_STATES = ("starting", "running", "error")


# -- the snapshot ---------------------------------------------------------------
#
# Readers and writers may be different versions of mirrord (an upgrade while
# the daemon runs), so parsing ignores unknown keys, fills missing ones with
# defaults and drops values of the wrong type instead of refusing the file.


def _opt_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _require_name(data: Any, what: str) -> str:
    if not isinstance(data, Mapping):
        raise ValueError(f"{what}: expected an object, got {type(data).__name__}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: missing name")
    return name


@dataclass
class MailboxStatus:
    """One mailbox as the daemon sees it.

    ``name`` is the local name, the one the state DB uses (``Archive/2024``),
    so the two sources can be joined.
    """

    name: str
    state: str = "starting"
    since: float | None = None
    """When the mailbox entered ``state`` (epoch seconds)."""
    last_change: float | None = None
    """When the daemon last saw the server change this mailbox."""
    last_error: str | None = None
    watched_by: str | None = None
    """How the daemon learns of changes: ``IDLE`` (a watcher of its own) or how it is polled
    (``LIST-STATUS every 60 s``); None from a daemon that did not say."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "since": self.since,
            "last_change": self.last_change,
            "last_error": self.last_error,
            "watched_by": self.watched_by,
        }

    @classmethod
    def from_json(cls, data: Any) -> MailboxStatus:
        name = _require_name(data, "mailbox")
        return cls(
            name=name,
            state=_opt_str(data.get("state")) or "starting",
            since=_opt_float(data.get("since")),
            last_change=_opt_float(data.get("last_change")),
            last_error=_opt_str(data.get("last_error")),
            watched_by=_opt_str(data.get("watched_by")),
        )


@dataclass
class AccountStatus:
    """One account: whether it is logged in at all, and its mailboxes."""

    name: str
    state: str = "starting"
    error: str | None = None
    mailboxes: list[MailboxStatus] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "error": self.error,
            "mailboxes": [m.to_json() for m in self.mailboxes],
        }

    @classmethod
    def from_json(cls, data: Any) -> AccountStatus:
        name = _require_name(data, "account")
        raw = data.get("mailboxes")
        mailboxes = [MailboxStatus.from_json(m) for m in raw] if isinstance(raw, list) else []
        return cls(
            name=name,
            state=_opt_str(data.get("state")) or "starting",
            error=_opt_str(data.get("error")),
            mailboxes=mailboxes,
        )


@dataclass
class DaemonStatus:
    """The whole snapshot one daemon publishes.

    ``process`` identifies the writing process beyond its pid (boot id and
    the kernel's start time of the process, on Linux), so that a stale file
    whose pid has since been reused by another process, or survived a
    reboot in the state-dir fallback, is not taken for a running daemon.
    """

    pid: int
    started: float
    updated: float
    config: str
    accounts: list[AccountStatus] = field(default_factory=list)
    version: int = STATUS_VERSION
    process: str | None = None

    @classmethod
    def for_this_process(cls, config_path: Path, *, started: float | None = None) -> DaemonStatus:
        """A fresh snapshot for the calling daemon, its identity filled in."""
        now = time.time()
        return cls(
            pid=os.getpid(),
            started=now if started is None else started,
            updated=now,
            config=str(_absolute(config_path)),
            process=process_identity(os.getpid()),
        )

    def account(self, name: str) -> AccountStatus | None:
        for account in self.accounts:
            if account.name == name:
                return account
        return None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": self.version,
            "pid": self.pid,
            "started": self.started,
            "updated": self.updated,
            "config": self.config,
            "accounts": [a.to_json() for a in self.accounts],
        }
        if self.process is not None:
            data["process"] = self.process
        return data

    @classmethod
    def from_json(cls, data: Any) -> DaemonStatus:
        """Parse a snapshot; ValueError only if it names no usable pid."""
        if not isinstance(data, Mapping):
            raise ValueError(f"expected an object, got {type(data).__name__}")
        pid = data.get("pid")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            # pid 0 or -1 would make os.kill() signal a whole process group.
            raise ValueError(f"not a process id: {pid!r}")
        raw = data.get("accounts")
        version = data.get("version")
        return cls(
            pid=pid,
            started=_opt_float(data.get("started")) or 0.0,
            updated=_opt_float(data.get("updated")) or 0.0,
            config=_opt_str(data.get("config")) or "",
            accounts=[AccountStatus.from_json(a) for a in raw] if isinstance(raw, list) else [],
            version=version if isinstance(version, int) and not isinstance(version, bool) else 0,
            process=_opt_str(data.get("process")),
        )


# -- is the writer alive --------------------------------------------------------


def process_identity(pid: int) -> str | None:
    """``<boot id>/<start time in clock ticks>`` of a process, or None off Linux.

    Both come from the kernel and do not depend on the wall clock, so an NTP
    step after the daemon started cannot make it look stale.
    """
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or
    # parentheses itself; the fields after the last ')' are plain numbers.
    rest = raw[raw.rfind(")") + 2 :].split()
    # rest[0] is field 3 (state); starttime is field 22.
    if len(rest) < 20 or not boot_id:
        return None
    return f"{boot_id}/{rest[19]}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (it may be another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def writer_alive(status: DaemonStatus) -> bool:
    """Whether the process that wrote ``status`` still runs.

    The identity check runs only when both sides have one: a snapshot
    written without it (another version, another OS) falls back to the pid.
    """
    if not pid_alive(status.pid):
        return False
    if status.process is None:
        return True
    current = process_identity(status.pid)
    return current is None or current == status.process


# -- where the file lives -------------------------------------------------------


def _absolute(path: Path) -> Path:
    """One spelling per config file, however it was named on the command line.

    The daemon gets ``-c %E/mirrord/work.yaml`` from systemd, the user may
    type a relative or symlinked path: both must find the same status file.
    """
    return Path(os.path.realpath(os.path.expanduser(path)))


def _safe_component(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return cleaned[:40] or "config"


def status_file_name(config_path: Path) -> str:
    """``status-<config stem>-<12 hex of sha256(absolute config path)>.json``.

    The stem makes the file recognisable to a person; the hash keeps two
    configs with the same name in different directories apart.
    """
    absolute = _absolute(config_path)
    digest = hashlib.sha256(os.fsencode(absolute)).hexdigest()[:12]
    return f"status-{_safe_component(absolute.stem)}-{digest}.json"


def runtime_dir() -> Path | None:
    """``$XDG_RUNTIME_DIR/mirrord`` (or ``/run/user/<uid>/mirrord``) if usable, else None.

    Usable means the base directory exists, is ours and is writable by no
    one else; platformdirs' last resort, ``runtime-<uid>`` in the temp dir,
    is not used: with PrivateTmp= the daemon and the shell would see two
    different /tmp, and the state dir is as private and always the same.
    Nothing is created here.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about its fallbacks
            path = Path(platformdirs.user_runtime_dir(APP, appauthor=False))
    except Exception:  # noqa: BLE001 - it raises PermissionError on an unsafe fallback
        return None
    uid = os.geteuid()
    base = path.parent
    if base == Path(tempfile.gettempdir()) / f"runtime-{uid}":
        return None
    try:
        st = os.stat(base)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
        return None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
        return None
    return path


def status_path(config_path: Path, state_dir: Path | None = None) -> Path:
    """Where the daemon running ``config_path`` publishes its status.

    In the runtime dir when there is a usable one, else in ``state_dir``
    (the config's; platformdirs' default when not given).
    """
    return _candidates(config_path, state_dir)[0]


def _candidates(config_path: Path, state_dir: Path | None) -> list[Path]:
    """Every place a daemon for this config may have written, preferred first.

    A reader tries them all: the daemon under systemd has a runtime dir
    where a shell without ``XDG_RUNTIME_DIR`` may not, and the reverse.
    """
    name = status_file_name(config_path)
    fallback = (state_dir if state_dir is not None else default_state_dir()) / name
    runtime = runtime_dir()
    return [fallback] if runtime is None else [runtime / name, fallback]


def find_status(config_path: Path, state_dir: Path | None = None) -> DaemonStatus | None:
    """The live status of the daemon running ``config_path``, or None if none runs."""
    for path in _candidates(config_path, state_dir):
        status = StatusFile.read(path)
        if status is not None:
            return status
    return None


# -- when to publish ------------------------------------------------------------


class ChangePublisher:
    """Publishes when something changed: soon after, at most once per ``min_gap``, never on a timer of its own.

    The daemon used to rewrite the status every few seconds whether or not
    anything had changed, which woke an idle daemon for nothing. Now every
    change (a watcher's state, an error, new mail) calls :meth:`changed`;
    the first change in a quiet spell is published on the next reactor turn
    (no extra sleep and wakeup), and a burst of changes (a first sync, a
    reconnect storm) costs one write per ``min_gap`` seconds.

    ``differs`` (optional) says whether there is anything new to publish.
    Within the gap it is asked on the next reactor turn before a later
    publication is scheduled: an IDLE renewal changes a watcher's state and
    changes it back within a few milliseconds, and must not cost a wakeup a
    second later to publish what was already published.
    """

    def __init__(self, clock: Any, publish: Callable[[], None], *, min_gap: float = 1.0,
                 differs: Callable[[], bool] | None = None) -> None:
        self._clock = clock
        self._publish = publish
        self._differs = differs
        self.min_gap = min_gap
        self._pending: Any = None
        self._last: float | None = None
        self._stopped = False

    def changed(self) -> None:
        if self._stopped or (self._pending is not None and self._pending.active()):
            return
        if self._wait() == 0.0 or self._differs is None:
            self._pending = self._clock.callLater(self._wait(), self._run)
        else:
            self._pending = self._clock.callLater(0, self._later)

    def _wait(self) -> float:
        if self._last is None:
            return 0.0
        return max(0.0, self._last + self.min_gap - self._clock.seconds())

    def _later(self) -> None:
        """Within the gap: schedule a publication only if there is something new by then."""
        self._pending = None
        assert self._differs is not None
        if not self._differs():
            return  # a later change calls changed() again
        self._pending = self._clock.callLater(self._wait(), self._run)

    def _run(self) -> None:
        self._pending = None
        self._last = self._clock.seconds()
        try:
            self._publish()
        except Exception:  # noqa: BLE001 - the status is a convenience; mirroring goes on
            log.exception("publishing the status failed")

    def flush(self) -> None:
        """Publish now (a change may be pending): at READY, `mirrord status` must already agree."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._run()

    def stop(self) -> None:
        self._stopped = True
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None


# -- the file -------------------------------------------------------------------


class StatusFile:
    """The daemon's side: publish snapshots atomically, remove on clean exit.

    A reader sees either the previous whole snapshot or the next one, never
    a half-written file: each write goes to a temp file in the same
    directory and is renamed over the old one. No fsync: after a crash the
    file is stale anyway, and a torn one only reads as "not running".
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._failing = False

    @classmethod
    def for_config(cls, config: Config) -> StatusFile:
        return cls(status_path(config.path, config.state_dir))

    def write(self, status: DaemonStatus) -> bool:
        """Publish ``status``; False (logged once per failure spell) if it could not be.

        Never raises OSError: the daemon calls this on every change, and a
        full disk or a runtime dir removed at logout must not stop mirroring.
        """
        try:
            # allow_nan=False: NaN is not JSON, and other readers (jq) refuse it.
            self._write(json.dumps(status.to_json(), separators=(",", ":"), allow_nan=False).encode())
        except (OSError, ValueError) as e:
            if not self._failing:
                log.warning("cannot publish the status to %s: %s", self.path, e)
            self._failing = True
            return False
        if self._failing:
            log.info("publishing the status to %s again", self.path)
            self._failing = False
        return True

    def _write(self, data: bytes) -> None:
        directory = self.path.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=".status-", suffix=".tmp", dir=directory)
        except FileNotFoundError:
            # First write, or systemd removed the runtime dir since the last one.
            make_private_dirs(directory)
            fd, tmp = tempfile.mkstemp(prefix=".status-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:  # mkstemp made it 0600
                f.write(data)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def remove(self) -> None:
        """On clean shutdown: no file means no daemon, without a pid check."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove the status file %s: %s", self.path, e)

    @staticmethod
    def read(path: Path) -> DaemonStatus | None:
        """The snapshot at ``path`` if its writer still runs; None otherwise.

        Missing, unreadable, unparsable and stale files all read as None:
        a file left by a crashed daemon must not claim that it runs.
        """
        try:
            with open(path, "rb") as f:
                raw = f.read(1 << 20)  # a snapshot is a few KB; refuse to slurp a wrong file
            status = DaemonStatus.from_json(json.loads(raw))
        except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return None
        return status if writer_alive(status) else None


# -- the last run's outcome ------------------------------------------------------
#
# The state DB records what is mirrored, not what failed: after a `run --once`
# that stopped a mailbox (the removal guard, a full disk), `status` without a
# daemon showed it as fresh with no error. `run --once` therefore leaves its
# outcome per mailbox in a small JSON file next to the state DB, merged with
# the previous one so that a run of one mailbox does not forget the others.

LAST_RUN_NAME = "last-run.json"


@dataclass(frozen=True)
class RunOutcome:
    """How the last ``run --once`` ended for one mailbox (``mailbox`` None: the whole account)."""

    account: str
    mailbox: str | None
    finished: float
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {"account": self.account, "mailbox": self.mailbox, "finished": self.finished, "error": self.error}

    @classmethod
    def from_json(cls, data: Any) -> RunOutcome | None:
        if not isinstance(data, Mapping) or not isinstance(data.get("account"), str):
            return None
        finished = _opt_float(data.get("finished"))
        mailbox = data.get("mailbox")
        if finished is None or not (mailbox is None or isinstance(mailbox, str)):
            return None
        return cls(data["account"], mailbox, finished, _opt_str(data.get("error")))


def read_last_run(state_dir: Path) -> dict[tuple[str, str | None], RunOutcome]:
    """The outcomes the last runs left, by (account, mailbox); {} if none or unreadable."""
    try:
        with open(Path(state_dir) / LAST_RUN_NAME, "rb") as f:
            data = json.loads(f.read(1 << 22))
    except (OSError, ValueError):
        return {}
    outcomes = [RunOutcome.from_json(item) for item in data.get("outcomes", [])] if isinstance(data, dict) else []
    return {(o.account, o.mailbox): o for o in outcomes if o is not None}


def write_last_run(state_dir: Path, outcomes: Iterable[RunOutcome]) -> None:
    """Merge ``outcomes`` into the record; an account's own error is replaced by this run's word.

    Atomic (temp file and rename) and 0600; raises OSError, which the
    caller logs: mirroring has happened, only this note is missing.
    """
    merged = read_last_run(state_dir)
    fresh = list(outcomes)
    for account in {o.account for o in fresh}:
        merged.pop((account, None), None)
    for outcome in fresh:
        merged[(outcome.account, outcome.mailbox)] = outcome
    data = json.dumps({"outcomes": [o.to_json() for o in merged.values()]}, indent=1).encode()
    StatusFile(Path(state_dir) / LAST_RUN_NAME)._write(data)


# -- the state DB, read-only ----------------------------------------------------


@dataclass(frozen=True)
class _Local:
    messages: int
    last_sync: float | None


def _connect_ro(path: Path, *, immutable: bool) -> sqlite3.Connection:
    uri = path.absolute().as_uri() + "?mode=ro" + ("&immutable=1" if immutable else "")
    return sqlite3.connect(uri, uri=True, timeout=5.0)


def read_state(path: Path) -> dict[tuple[str, str], _Local]:
    """Per (account, mailbox): local message count and last sync; {} if no DB.

    Does not use StateDB, which creates the file and switches it to WAL.
    Even ``mode=ro`` leaves -wal and -shm files behind on a WAL database, so
    when no -wal exists (no writer has the DB open, and the last one
    checkpointed it) the DB is opened ``immutable``, which touches nothing.
    If a daemon starts and checkpoints during that read, SQLite may report
    an error: then read again the ordinary way, now that the -wal exists.
    (With a -wal left by a crashed daemon but no -shm, that ordinary read
    makes SQLite create the -shm: the only case where status adds a file.)
    Raises sqlite3.Error if the DB exists but cannot be read.
    """
    if not path.exists():
        return {}
    wal = path.with_name(path.name + "-wal")
    try:
        return _query_state(path, immutable=not wal.exists())
    except sqlite3.DatabaseError:
        if not wal.exists():
            raise
        return _query_state(path, immutable=False)


def _query_state(path: Path, *, immutable: bool) -> dict[tuple[str, str], _Local]:
    conn = _connect_ro(path, immutable=immutable)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"mailbox", "message"} <= tables:
            return {}  # created but never migrated: nothing recorded yet
        # One snapshot for both queries, so counts and marks agree.
        conn.execute("BEGIN")
        counts = {
            (a, m): n
            for a, m, n in conn.execute(
                "SELECT account, mailbox, COUNT(*) FROM message GROUP BY account, mailbox"
            )
        }
        result: dict[tuple[str, str], _Local] = {}
        for a, m, last_sync in conn.execute("SELECT account, mailbox, last_sync FROM mailbox"):
            result[(a, m)] = _Local(counts.pop((a, m), 0), _opt_float(last_sync))
        for key, n in counts.items():  # rows without a mailbox row: show them anyway
            result[key] = _Local(n, None)
        conn.execute("COMMIT")
        return result
    finally:
        conn.close()


# -- rendering ------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """Two units at most: ``45s``, ``12m``, ``3h 12m``, ``2d 5h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h {m}m" if m else f"{h}h"
    d, h = divmod(h, 24)
    return f"{d}d {h}h" if h else f"{d}d"


def format_ago(when: float | None, now: float) -> str:
    if when is None:
        return "never"
    if when > now - 1:  # includes a little clock skew between writer and reader
        return "just now"
    return f"{format_duration(now - when)} ago"


def format_clock(when: float, now: float) -> str:
    """``14:02`` when recent, with the date when older than 20 hours (so never ambiguous)."""
    if now - when < 20 * 3600:
        return time.strftime("%H:%M", time.localtime(when))
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(when))


def _one_line(text: str, width: int = ERROR_WIDTH) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _mailbox_order(name: str) -> tuple[bool, str]:
    return (name != "INBOX", name)


@dataclass
class _Row:
    account: str
    mailbox: str
    messages: int
    last_sync: float | None
    last_change: float | None
    state: str | None
    since: float | None
    last_error: str | None
    watched_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "mailbox": self.mailbox,
            "messages": self.messages,
            "last_sync": self.last_sync,
            "last_change": self.last_change,
            "state": self.state,
            "since": self.since,
            "last_error": self.last_error,
            "watched_by": self.watched_by,
        }


def _rows(
    account_names: Iterable[str],
    local: Mapping[tuple[str, str], _Local],
    daemon: DaemonStatus | None,
    last_run: Mapping[tuple[str, str | None], RunOutcome] | None = None,
) -> dict[str, list[_Row]]:
    """One row per mailbox, failures first, then INBOX, then by name.

    Without a daemon, a mailbox's error is its last run's, unless a sync
    completed after that run ended (the daemon's, since).
    """
    rows: dict[str, list[_Row]] = {}
    last_run = last_run or {}
    for account in account_names:
        live = daemon.account(account) if daemon else None
        live_boxes = {m.name: m for m in live.mailboxes} if live else {}
        ran = {m for a, m in last_run if a == account and m is not None} if daemon is None else set()
        names = {m for a, m in local if a == account} | set(live_boxes) | ran
        rows[account] = []
        for name in sorted(names, key=_mailbox_order):
            here = local.get((account, name))
            box = live_boxes.get(name)
            error = box.last_error if box else None
            outcome = last_run.get((account, name))
            if daemon is None and outcome is not None and outcome.error:
                synced_since = here is not None and here.last_sync is not None and here.last_sync > outcome.finished
                if not synced_since:
                    error = outcome.error
            rows[account].append(
                _Row(
                    account=account,
                    mailbox=name,
                    messages=here.messages if here else 0,
                    last_sync=here.last_sync if here else None,
                    last_change=box.last_change if box else None,
                    state=box.state if box else None,
                    since=box.since if box else None,
                    last_error=error,
                    watched_by=box.watched_by if box else None,
                )
            )
        rows[account].sort(key=lambda r: r.last_error is None)  # stable: failures first, order kept
    return rows


def _state_text(row: _Row, now: float) -> str:
    if row.state is None:
        return "-"  # known to the state DB, not (or not yet) to the daemon
    if row.state == "reconnecting" and row.since is not None:
        return f"reconnecting since {format_clock(row.since, now)}"
    if row.state == "polling" and row.watched_by:
        return f"polling ({row.watched_by})"
    return row.state


def _table(header: list[str], lines: list[list[str]], right: set[int], out: TextIO) -> None:
    # Names come from a server: an ESC or LF in one must not reach the terminal.
    lines = [[visible(c) for c in cells] for cells in lines]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return ("  " + "  ".join(parts)).rstrip()

    print(fmt(header), file=out)
    for cells in lines:
        print(fmt(cells), file=out)


def render_status(config: Config, *, as_json: bool, out: TextIO, now: float | None = None) -> int:
    """``mirrord status``: the daemon's view joined with the state DB, per mailbox.

    Reads only. Rows cover every configured account (plus any the running
    daemon reports that the config no longer names: it still mirrors them)
    and every mailbox known to either source. Exit status 0, or 1 when the
    state DB exists but cannot be read.
    """
    now = time.time() if now is None else now
    daemon = find_status(config.path, config.state_dir)
    db_path = config.state_dir / STATE_DB_NAME
    state_error: str | None = None
    try:
        local = read_state(db_path)
    except sqlite3.Error as e:
        local = {}
        state_error = f"cannot read the state database {db_path}: {e}"

    accounts = [a.name for a in config.accounts]
    if daemon is not None:
        accounts += [a.name for a in daemon.accounts if a.name not in accounts]
    last_run = read_last_run(config.state_dir) if daemon is None else {}
    rows = _rows(accounts, local, daemon, last_run)
    failed_accounts = {
        a: o for (a, m), o in last_run.items() if m is None and o.error and a in accounts
    }
    status = EXIT_FAILURE if state_error else EXIT_OK

    if as_json:
        doc: dict[str, Any] = {
            "daemon": daemon.to_json() if daemon else None,
            "mailboxes": [r.to_json() for account in accounts for r in rows[account]],
        }
        if failed_accounts:
            doc["account_errors"] = {a: o.error for a, o in failed_accounts.items()}
        if state_error:
            doc["error"] = state_error
        json.dump(doc, out, indent=2)
        print(file=out)
        return status

    if state_error:
        print(f"mirrord: {state_error}", file=out)
    if daemon is None:
        if not any(rows.values()) and not failed_accounts:
            if not state_error:
                print("mirrord is not running; nothing mirrored yet: run `mirrord run --once`", file=out)
            return status
        failures = sum(1 for account in accounts for r in rows[account] if r.last_error) + len(failed_accounts)
        if failures:
            print(f"mirrord is not running; the last run left {plural(failures, 'failure')} (listed first)",
                  file=out)
        else:
            print("mirrord is not running; showing what the last sync left", file=out)
    else:
        print(f"mirrord is running (pid {daemon.pid}, up {format_duration(now - daemon.started)})", file=out)

    for account in accounts:
        live = daemon.account(account) if daemon else None
        title = account
        if daemon is not None and live is None:
            title += " (not mirrored by the running daemon)"
        elif live is not None and live.state != "running":
            title += f" ({live.state}" + (f": {_one_line(live.error)}" if live.error else "") + ")"
        print(f"\n{visible(title)}", file=out)
        if account in failed_accounts:
            outcome = failed_accounts[account]
            print(f"  last run FAILED ({format_ago(outcome.finished, now)}): {outcome.error}", file=out)
        if not rows[account]:
            print("  nothing mirrored yet", file=out)
            continue
        if daemon is None:
            if any(a == account for a, _ in last_run):
                _table(
                    ["mailbox", "messages", "last sync", "last run"],
                    [
                        [r.mailbox, str(r.messages), format_ago(r.last_sync, now),
                         f"FAILED: {_one_line(r.last_error)}" if r.last_error
                         else ("ok" if (account, r.mailbox) in last_run else "-")]
                        for r in rows[account]
                    ],
                    {1},
                    out,
                )
            else:
                _table(
                    ["mailbox", "messages", "last sync"],
                    [[r.mailbox, str(r.messages), format_ago(r.last_sync, now)] for r in rows[account]],
                    {1},
                    out,
                )
            for r in rows[account]:
                if r.last_error and len(" ".join(r.last_error.split())) > ERROR_WIDTH:
                    print(f"  {visible(r.mailbox)}: {visible(r.last_error)}", file=out)
            continue
        # Until the daemon has seen a change, the last sync is the latest
        # moment the mirror is known to have matched the server.
        _table(
            ["mailbox", "messages", "last change", "state", "last error"],
            [
                [
                    r.mailbox,
                    str(r.messages),
                    format_ago(r.last_change if r.last_change is not None else r.last_sync, now),
                    _state_text(r, now),
                    _one_line(r.last_error) if r.last_error else "",
                ]
                for r in rows[account]
            ],
            {1},
            out,
        )
    return status
