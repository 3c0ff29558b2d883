"""Push latency of ``mirrord run``: APPEND on the server to file in the Maildir, beside the design's floors.

Usage (from the repository root, Dovecot installed as for the integration tests):

    python3 tests/bench/bench_latency.py [--scenario NAME ...] [--messages 200]
        [--gap-min 0.6] [--gap-max 1.2] [--load-rate 50] [--load-prefill 200]
        [--prefill-in cur|new] [--workers 4] [--mirrord-log plain|watcher|full]
        [--phased K] [--per-message] [--keep]

A quick run: ``--scenario prefill-200 --messages 20``. All four scenarios
with ``--messages 30`` take about 5 minutes; with the default 200 about 25
(the 100,000-message one spaces its APPENDs 3-4 s apart).

Against a private Dovecot on 127.0.0.1 (its imap processes allowed 1 GB of
address space: at 100,000 messages the default 256 MB is outgrown),
scenarios (``--scenario``, repeatable; default all four), each with a fresh
user, Maildir and ``mirrord run``:

* ``prefill-200`` / ``prefill-10000`` / ``prefill-100000``: the mailbox
  already holds that many messages (written with ``fill()`` before mirrord
  starts; from 20,000 on as tiny messages straight into cur/, else 2 KB ones
  opened once read-write so that Dovecot moves them to cur/ (``--prefill-in
  new`` leaves them in new/)); mirrord's first sync is waited for;
* ``load``: ``--load-prefill`` messages already there, and a second client (a
  separate process) APPENDs ``--load-rate`` messages a second to the same
  mailbox during the whole measurement; those are not measured.

In each, one client APPENDs ``--messages`` measured messages to INBOX, one at
a time, with random gaps (uniform ``--gap-min``..``--gap-max`` s, at least
3-4 s at 100,000 messages, so that Dovecot's 500 ms notification window never
merges two of them and its per-session rescans do not pile up). Per message,
side by side:

* t0: the APPEND's tagged OK is read (the UID comes from APPENDUID);
* (a) the bare IDLE floor: a bare IDLE client (raw socket, EXAMINE INBOX,
  IDLE, nothing else) reads the first ``* N EXISTS`` covering the message.
  Dovecot delays IDLE notifications by a fixed 500 ms (NOTIFY_DELAY_MSECS),
  so this is as early as an IDLE client can know;
* (b) the two-session floor, the design's own (a watcher that never fetches,
  a worker that does): another process with a bare IDLE session and a bare,
  already-selected session that sends ``UID FETCH next:* (UID BODY.PEEK[])``
  the moment the IDLE session reads an EXISTS (again while its view grew
  during the command, as mirrord does); the time its body is read;
* (c) mirrord: inotify (IN_MOVED_TO | IN_CREATE on ``INBOX/new`` and
  ``INBOX/cur``, ctypes, read in a thread, time.monotonic()) sees the file.

Which EXISTS covers which message: nothing is expunged during a run, so
sequence numbers are stable; after the run one ``UID SEARCH ALL`` gives each
measured UID its sequence number s, and the floor is the first EXISTS whose
count is >= s. Which file is which message: every measured message carries
``X-Mirrord-Test-Index`` (measured from 1,000,000, load from 2,000,000);
after the run each file is read and its arrival looked up by name.

Prints the exact command line, then per scenario a table of median, p90, p99
and max (ms) of (a), (b) and (c) from t0, the row "(c) - (b)" (differences of
the percentiles: each Dovecot session runs its 500 ms timer and its rescans
at its own phase, so per-message differences swing by hundreds of ms under
load or at 100,000 messages, and only the distributions compare; the
per-message differences are printed too), PASS/FAIL against issue 15's
targets ((c) - (b) median <= 5 ms, p99 <= 25 ms), whether the Maildir ends up
byte-identical to the server's mailbox, and mirrord's peak RSS (VmHWM); then a
summary. Exit status 0 when every scenario met the targets and mirrored
correctly, 1 otherwise.

``--mirrord-log watcher`` also logs, on the same monotonic clock, when
mirrord's INBOX watcher reads each EXISTS, and adds the row "watcher EXISTS ->
file": mirrord's own share, free of the phase noise, and "watcher EXISTS -
floor's IDLE EXISTS" (per message: how much later mirrord's watcher heard of
it than the floor's IDLE session; each session's 500 ms timer and rescans run
at its own phase, so this swings both ways). The row "floor's IDLE EXISTS ->
body" (always printed) is the floor's own share, to set beside mirrord's.
``full`` keeps the whole
``-v`` trace (which slows mirrord by milliseconds per message under load).
Both keep the logs; ``--per-message`` prints every message's times.

``--phased K``: the sides take turns instead of timing every message
together. By default (concurrent) the floor client's three sessions and
mirrord's share Dovecot throughout; with 10,000 messages its maildir backend
rescans the folder for every IDLE session on each change, and on 2 cores it
serves the sessions in an order that stays fixed for a run, so "(c) - (b)"
moved by +-10 ms between runs with nothing changed in mirrord. Phased, the
measured messages go in floor-only and mirrord-only phases, alternating: F
M F ... M F, K mirrord-only ones, half the messages each side, the floor's
first and last phases half as long so that both sides' messages sit at the
same mean time (a drift linear in time cancels). In a floor-only phase
mirrord is stopped (SIGTERM) and the two-session floor client is connected;
in a mirrord-only phase the floor client has closed its sessions and ``mirrord run``
is restarted, and each phase's first APPEND waits until mirrord has caught up
with what the floor phase brought (first sync done and every server message
on disk). (a) is then the floor client's own IDLE session, not a third one:
each side faces Dovecot alone with one IDLE session and its fetching one(s)
(mirrord's ``--workers``). The floor's code is the same in both modes. What
differs in the figures: (a)/(b) and (c) time different messages, so they are
unpaired distributions compared only by their percentiles ("(c) - (b)" is
already that in both modes); the per-message rows need both sides on one
message and are not printed; ``--mirrord-log watcher`` adds "mirrord's
watcher: OK -> EXISTS", to set beside (a), and "watcher EXISTS -> file", to
set beside "floor's IDLE EXISTS -> body". The Maildir is checked
byte-identical after a last run of mirrord (the last phase is the floor's).
Linux only; nothing beyond mirrord's test dependencies.
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import hashlib
import multiprocessing
import os
import random
import re
import selectors
import shlex
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import _benchlib
from _benchlib import local_files as _local_files
from _benchlib import percentile, quote
from _benchlib import quietly as _quietly
from _benchlib import wait as _wait

from mirrord.testing import ImapAccount, PrivateDovecot, make_message

MEASURED_BASE = 1_000_000
LOAD_BASE = 2_000_000
MESSAGE_SIZE = 2000

TARGET_MEDIAN_MS = 5.0
TARGET_P99_MS = 25.0
"""Targets for mirrord pXX - two-session floor pXX (issue 15)."""
TINY_FROM = 20_000
"""Prefills this large are written as tiny messages (filling 100,000 stays quick)."""

_INDEX_HEADER = re.compile(rb"^X-Mirrord-Test-Index: (\d+)\r?$", re.MULTILINE)
_EXISTS = re.compile(rb"^\* (\d+) EXISTS\r?$")
_LITERAL = re.compile(rb"\{(\d+)\}$")
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")


# --------------------------------------------------------------------------
# inotify, through ctypes

IN_CREATE = 0x00000100
IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name


class Inotify:
    """A non-blocking inotify descriptor watching some directories for new names."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._init1 = libc.inotify_init1
        self._init1.argtypes = [ctypes.c_int]
        self._init1.restype = ctypes.c_int
        self._add_watch = libc.inotify_add_watch
        self._add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add_watch.restype = ctypes.c_int
        fd = self._init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd
        self.overflowed = False

    def watch(self, path: Path, mask: int = IN_MOVED_TO | IN_CREATE) -> int:
        wd = self._add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return wd

    def read(self) -> list[tuple[int, int, str]]:
        """Every queued event as (wd, mask, name); empty when none is queued."""
        events: list[tuple[int, int, str]] = []
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return events
            offset = 0
            while offset < len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, offset)
                offset += _EVENT.size
                name = buf[offset : offset + length].rstrip(b"\0").decode("utf-8", "surrogateescape")
                offset += length
                if mask & IN_Q_OVERFLOW:
                    self.overflowed = True
                events.append((wd, mask, name))

    def close(self) -> None:
        os.close(self.fd)


# --------------------------------------------------------------------------
# A minimal synchronous IMAP client on a raw socket (no literals in responses)


class RawImap(_benchlib.RawImap):
    """APPEND, UID SEARCH and IDLE, with exact timing."""

    def append(self, mailbox: str, message: bytes) -> tuple[int, float]:
        """APPEND; (UID from APPENDUID, monotonic time the tagged OK was read)."""
        _, tagged, done = self.command(b"APPEND " + quote(mailbox), message)
        match = _APPENDUID.search(tagged)
        if match is None:
            raise RuntimeError(f"no APPENDUID in {tagged!r}")
        return int(match.group(2)), done

    def uids(self, mailbox: str) -> list[int]:
        self.command(b"EXAMINE " + quote(mailbox))
        untagged, _, _ = self.command(b"UID SEARCH ALL")
        found: list[int] = []
        for line in untagged:
            if line.startswith(b"* SEARCH"):
                found.extend(int(u) for u in line[len(b"* SEARCH") :].split())
        return sorted(found)

    def start_idle(self, mailbox: str) -> None:
        """EXAMINE and IDLE; returns once the server said ``+`` (it is idling)."""
        self.command(b"EXAMINE " + quote(mailbox))
        self.sock.sendall(b"idle IDLE\r\n")
        while True:
            line = self.readline()
            if line.startswith(b"+"):
                return
            if line.startswith(b"idle "):
                raise RuntimeError(f"IDLE refused: {line!r}")


# --------------------------------------------------------------------------
# What the collector thread sees


class Collector(threading.Thread):
    """One thread timestamping inotify events and the floor client's EXISTS lines.

    One thread for both, blocked in select() most of the time, so that a
    timestamp is taken as soon as the kernel has something, with no other
    Python thread of ours competing for the interpreter. ``floor`` None
    (``--phased``' mirrord phases): inotify alone.
    """

    def __init__(self, inotify: Inotify, floor: RawImap | None) -> None:
        super().__init__(name="collector", daemon=True)
        self.inotify = inotify
        self.floor = floor
        self.arrivals: dict[str, float] = {}
        """Maildir key (file name up to ':') -> first time seen in new/ or cur/."""
        self.exists: list[tuple[float, int]] = []
        """(time, N) of every ``* N EXISTS`` the floor client read while idling."""
        self.floor_lost: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.inotify.fd, selectors.EVENT_READ, "inotify")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        pending = b""
        if self.floor is not None:
            self.floor.sock.setblocking(False)
            sel.register(self.floor.sock, selectors.EVENT_READ, "floor")
            pending, self.floor.buf = self.floor.buf, b""
            cut = pending.rfind(b"\r\n")
            if cut >= 0:  # read along with the "+ idling" line
                self._floor_lines(pending[: cut + 2], time.monotonic())
                pending = pending[cut + 2 :]
        while not self._stopping:
            for key, _ in sel.select():
                now = time.monotonic()
                if key.data == "inotify":
                    for _, _, name in self.inotify.read():
                        if name:
                            self.arrivals.setdefault(name.split(":", 1)[0], now)
                elif key.data == "floor" and self.floor is not None:
                    try:
                        data = self.floor.sock.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        data, self.floor_lost = b"", str(e)
                    if not data:
                        self.floor_lost = self.floor_lost or "server closed the connection"
                        sel.unregister(self.floor.sock)
                        continue
                    pending += data
                    cut = pending.rfind(b"\r\n")
                    if cut >= 0:
                        self._floor_lines(pending[: cut + 2], now)
                        pending = pending[cut + 2 :]
                else:
                    os.read(self._wake_r, 64)
        sel.close()

    def _floor_lines(self, data: bytes, now: float) -> None:
        for line in data.split(b"\r\n"):
            match = _EXISTS.match(line)
            if match:
                self.exists.append((now, int(match.group(1))))

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        self.join(10)
        os.close(self._wake_r)
        os.close(self._wake_w)


# --------------------------------------------------------------------------
# Background load: another process, so it never holds our interpreter lock


def _load_main(host: str, port: int, user: str, password: str, rate: float,
               stop: EventType, started: EventType, count: Any) -> None:
    client = RawImap(host, port)
    client.login(user, password)
    started.set()
    begin = time.monotonic()
    k = 0
    while not stop.is_set():
        due = begin + k / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        client.append("INBOX", make_message(LOAD_BASE + k, size=MESSAGE_SIZE))
        k += 1
        count.value = k
    client.close()


def _start_load(ctx: Any, account: ImapAccount,
                scenario: Scenario) -> tuple[multiprocessing.process.BaseProcess, EventType, Any]:
    """Fork the background load client (no thread of ours may run); (process, stop event, count sent)."""
    stop_load, started = ctx.Event(), ctx.Event()
    load_count = ctx.Value("l", 0)
    load_proc = ctx.Process(
        target=_load_main,
        args=(account.host, account.port, account.user, account.password,
              scenario.load_rate, stop_load, started, load_count),
        daemon=True,
    )
    load_proc.start()
    if not started.wait(30):
        raise RuntimeError("the background load client did not log in")
    return load_proc, stop_load, load_count


# --------------------------------------------------------------------------
# The two-session floor: another process, so it never holds our interpreter lock


_FETCH_BODY = re.compile(rb"^\* \d+ FETCH \(.*UID (\d+).*BODY\[\] \{\d+\}\r\n", re.DOTALL)


def _two_session_main(host: str, port: int, user: str, password: str, stop: EventType,
                      started: EventType, results: Any) -> None:
    """The design's own floor: a bare IDLE session and a bare, already-selected fetching one.

    The moment the IDLE session reads an EXISTS that grew, the other session
    sends ``UID FETCH next:* (UID BODY.PEEK[])`` (nothing before it: no NOOP,
    no EXAMINE); each body's time is when the command's tagged OK, right after it, is read.
    Should the session's view grow during the command (an EXISTS: Dovecot
    answers from a view a message or more old, then brings it up to date), it
    is sent again at once, up to 3 times: mirrord's rule. Every new message is fetched, the load's too, as mirrord's
    workers do. Sends (uid, time) pairs through ``results`` when stopped.
    """
    watch = RawImap(host, port)
    watch.login(user, password)
    fetcher = RawImap(host, port)
    fetcher.login(user, password)
    status = fetcher.lines(b'STATUS "INBOX" (UIDNEXT)')
    next_uid = int(re.search(rb"UIDNEXT (\d+)", b" ".join(status)).group(1))  # type: ignore[union-attr]
    fetcher.command(b'EXAMINE "INBOX"')
    watch.start_idle("INBOX")
    bodies: list[tuple[int, float]] = []
    heard: list[tuple[float, int]] = []
    sel = selectors.DefaultSelector()
    watch.sock.setblocking(False)
    sel.register(watch.sock, selectors.EVENT_READ)
    pending = watch.buf
    watch.buf = b""
    started.set()
    try:
        _two_session_loop(watch, fetcher, sel, pending, next_uid, stop, bodies, heard)
    except (OSError, RuntimeError) as e:  # reported with what was measured until then
        print(f"  two-session floor client stopped: {e}", file=sys.stderr, flush=True)
    sel.close()
    watch.close()
    fetcher.close()
    results.send((bodies, heard))
    results.close()


def _two_session_loop(watch: RawImap, fetcher: RawImap, sel: selectors.BaseSelector, pending: bytes,
                      next_uid: int, stop: EventType, bodies: list[tuple[int, float]],
                      heard: list[tuple[float, int]]) -> None:
    """Fetch on each EXISTS that grew; ``heard`` gets (time, N) of those EXISTS, the IDLE session's own times."""
    count = 0
    while not stop.is_set():
        if not sel.select(0.2):
            continue
        try:
            data = watch.sock.recv(1 << 16)
        except BlockingIOError:
            continue
        now = time.monotonic()
        if not data:
            break
        pending += data
        grew = False
        while (cut := pending.find(b"\r\n")) >= 0:
            line, pending = pending[:cut], pending[cut + 2 :]
            match = _EXISTS.match(line)
            if match and int(match.group(1)) > count:
                count, grew = int(match.group(1)), True
        if not grew:
            continue
        heard.append((now, count))
        for _attempt in range(3):
            # The tagged OK follows the last body at once: its time is the bodies'.
            untagged, _, done = fetcher.command(b"UID FETCH %d:* (UID BODY.PEEK[])" % next_uid)
            got = 0
            for response in untagged:
                found = _FETCH_BODY.match(response)
                if found and int(found.group(1)) >= next_uid:
                    got = max(got, int(found.group(1)))
                    bodies.append((int(found.group(1)), done))
            if got:
                next_uid = got + 1
            if not any(_EXISTS.match(line) for line in untagged):
                break  # the view did not grow during the command: nothing more to see


def _start_two_session(ctx: Any, account: ImapAccount) -> tuple[multiprocessing.process.BaseProcess, EventType, Any]:
    """Fork the two-session floor client (no thread of ours may run); (process, stop event, results pipe)
    once its IDLE session is idling."""
    stop_two, two_started = ctx.Event(), ctx.Event()
    two_results, two_send = ctx.Pipe(duplex=False)
    two_proc = ctx.Process(
        target=_two_session_main,
        args=(account.host, account.port, account.user, account.password, stop_two, two_started, two_send),
        daemon=True,
    )
    two_proc.start()
    two_send.close()
    if not two_started.wait(60):
        raise RuntimeError("the two-session floor client did not start")
    return two_proc, stop_two, two_results


def _stop_two_session(two_proc: multiprocessing.process.BaseProcess, stop_two: EventType,
                      two_results: Any) -> tuple[dict[int, float], list[tuple[float, int]]]:
    """Stop the two-session floor client (its sessions close); (uid -> body time, its IDLE session's EXISTS)."""
    stop_two.set()
    two_got = two_results.recv() if two_results.poll(30) else ([], [])
    two_proc.join(10)
    return dict(two_got[0]), list(two_got[1])


# --------------------------------------------------------------------------
# mirrord as a child process


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies, so no mirrord outlives it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class Mirrord(_benchlib.MirrordProcess):
    """``mirrord run`` with its log in a file (no pipe, no reader thread in this process)."""

    # With --mirrord-log watcher/full, mirrord runs through this wrapper (with
    # -v) so that its log lines carry CLOCK_MONOTONIC, the clock of every other
    # timestamp here. "watcher" then drops every trace line but the INBOX
    # watcher's "S: * N EXISTS" (and mirrord's own DEBUG lines), so the log
    # costs mirrord next to nothing; "full" keeps the whole protocol trace,
    # which costs it milliseconds per fetched message under load.
    _WRAPPER = (
        "import logging, sys, time\n"
        "logging.Formatter.formatTime = lambda self, record, datefmt=None: '%.6f' % time.monotonic()\n"
        "import mirrord.logs\n"
        "_setup = mirrord.logs.setup_logging\n"
        "def _watcher_only(record):\n"
        "    if record.name != 'mirrord.trace':\n"
        "        return record.levelno >= logging.INFO\n"
        "    a = record.args\n"
        "    return (isinstance(a, tuple) and len(a) == 2 and str(a[0]).endswith('/INBOX')\n"
        "            and str(a[1]).startswith('* ') and str(a[1]).endswith(' EXISTS')\n"
        "            and str(record.msg).startswith('%s S:'))\n"
        "def setup_logging(verbose=False, stream=None, **options):\n"
        "    _setup(verbose, stream, **options)\n"
        "    if MODE == 'watcher':\n"
        "        for handler in logging.getLogger().handlers:\n"
        "            handler.addFilter(_watcher_only)\n"
        "mirrord.logs.setup_logging = setup_logging\n"
        "from mirrord.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )

    def __init__(self, config: Path, log_path: Path, *, log_mode: str = "plain") -> None:
        super().__init__(config, log_path)
        self.log_mode = log_mode

    def command(self) -> list[str]:
        args = ["-c", str(self.config), "run"]
        if self.log_mode in ("watcher", "full"):
            wrapper = f"MODE = {self.log_mode!r}\n" + self._WRAPPER
            return [sys.executable, "-c", wrapper, "-v", *args]
        return [sys.executable, "-m", "mirrord", *args]

    def popen_options(self) -> dict[str, Any]:
        return {"preexec_fn": _die_with_parent}

    def peak_rss_mb(self) -> float | None:
        return self.rss_mb("VmHWM")

    def stop(self, timeout: float = 30) -> int | None:
        return super().stop(timeout)


# --------------------------------------------------------------------------
# One scenario


@dataclass
class Scenario:
    name: str
    prefill: int
    load_rate: float = 0.0
    min_gap: float = 0.0
    """Gaps between measured APPENDs are at least this (s): at 100,000 messages every
    Dovecot session takes most of a second (one core) to rescan the folder after each
    change, and shorter gaps measure a growing backlog, not latency."""

    def gaps(self, args: argparse.Namespace) -> tuple[float, float]:
        return max(args.gap_min, self.min_gap), max(args.gap_max, self.min_gap + 1.0)


@dataclass
class Outcome:
    scenario: Scenario
    measured: int = 0
    floor_ms: list[float] = field(default_factory=list)
    mirrord_ms: list[float] = field(default_factory=list)
    two_ms: list[float] = field(default_factory=list)
    """The two-session floor: APPEND OK -> body read by the bare fetching session."""
    over_two_ms: list[float] = field(default_factory=list)
    """Per message: mirrord's file - the two-session floor's body."""
    overhead_ms: list[float] = field(default_factory=list)
    missing: int = 0
    no_floor: int = 0
    load_sent: int = 0
    load_seconds: float = 0.0
    first_sync_s: float = 0.0
    server_count: int = 0
    local_count: int = 0
    identical: bool = False
    peak_rss_mb: float | None = None
    notes: list[str] = field(default_factory=list)
    internal_ms: list[float] = field(default_factory=list)
    """--mirrord-log watcher/full only: mirrord's watcher reading the EXISTS -> file visible."""
    two_internal_ms: list[float] = field(default_factory=list)
    """The two-session floor's own share: its IDLE session reading the EXISTS -> body."""
    watcher_late_ms: list[float] = field(default_factory=list)
    """--mirrord-log watcher/full only: mirrord's watcher EXISTS - the floor's IDLE session's EXISTS."""
    watcher_ms: list[float] = field(default_factory=list)
    """--mirrord-log watcher/full only: APPEND OK -> mirrord's watcher reading the EXISTS."""
    phases: str = ""
    """--phased only: the phases run, e.g. "F5 M10 F10 M10 F5" (F floor-only, M mirrord-only; messages)."""
    trace: list[tuple[int, int, float, float | None, float | None, float | None]] = field(default_factory=list)

    def over_two(self, p: float) -> float:
        """mirrord's pXX minus the two-session floor's pXX (ms)."""
        return percentile(self.mirrord_ms, p) - percentile(self.two_ms, p)

    @property
    def passed(self) -> bool:
        if not self.mirrord_ms or not self.two_ms or not self.identical or self.missing or self.no_floor:
            return False
        return self.over_two(50) <= TARGET_MEDIAN_MS and self.over_two(99) <= TARGET_P99_MS




def _write_config(directory: Path, account: ImapAccount, workers: int) -> Path:
    return _benchlib.write_config(
        directory, account.user, account.password, account.port, f"    workers: {workers}\n    mailboxes: [INBOX]\n"
    )






def _prefill(account: ImapAccount, scenario: Scenario, args: argparse.Namespace) -> None:
    """The messages already in INBOX before mirrord starts (see the module docstring)."""
    if not scenario.prefill:
        return
    filling = time.monotonic()
    if scenario.prefill >= TINY_FROM:
        messages = (b"X-Mirrord-Test-Index: %d\r\nSubject: prefill %d\r\n\r\nx\r\n" % (i, i)
                    for i in range(1, scenario.prefill + 1))
    else:
        messages = (make_message(i, size=MESSAGE_SIZE) for i in range(1, scenario.prefill + 1))
    if args.prefill_in == "cur" and scenario.prefill >= TINY_FROM:
        # Straight into cur/ (as \Seen): no SELECT has to move them there.
        account.fill("INBOX", messages, flags=("\\Seen",))
    else:
        account.fill("INBOX", messages)
    print(f"  {scenario.name}: filled {scenario.prefill} messages in {time.monotonic() - filling:.1f} s", flush=True)
    if args.prefill_in == "cur" and scenario.prefill < TINY_FROM:
        # One read-write SELECT: Dovecot moves the files from new/ to cur/
        # (flags unchanged), as happens once any mail client opens the mailbox.
        opener = RawImap(account.host, account.port)
        opener.login(account.user, account.password)
        opener.command(b'SELECT "INBOX"')
        opener.close()


def _set_up(server: PrivateDovecot, scenario: Scenario, args: argparse.Namespace,
            root: Path) -> tuple[Outcome, Path, ImapAccount, Path, Path, random.Random]:
    """A scenario's account, prefilled, and mirrord's config: (outcome, work dir, account, config, INBOX, rng)."""
    work = root / scenario.name
    work.mkdir()
    account = server.new_account(f"latency-{scenario.name}")
    _prefill(account, scenario, args)
    config = _write_config(work, account, args.workers)
    return Outcome(scenario), work, account, config, work / "Mail" / "INBOX", random.Random(args.seed)


def run_scenario(server: PrivateDovecot, scenario: Scenario, args: argparse.Namespace, root: Path) -> Outcome:
    out, work, account, config, inbox, rng = _set_up(server, scenario, args, root)
    daemon = Mirrord(config, work / "mirrord.log", log_mode=args.mirrord_log)
    load_proc: multiprocessing.process.BaseProcess | None = None
    stop_load: EventType | None = None
    inotify: Inotify | None = None
    floor: RawImap | None = None
    collector: Collector | None = None
    appender: RawImap | None = None
    sent: list[tuple[int, int, float]] = []  # (k, uid, t_ok)
    load_count: Any = None
    load_began = 0.0
    two_proc: multiprocessing.process.BaseProcess | None = None
    stop_two: EventType | None = None
    two_results: Any = None
    try:
        out.first_sync_s = daemon.start(timeout=args.first_sync_timeout)
        if not _wait(lambda: len(_local_files(inbox)) >= scenario.prefill, 60):
            out.notes.append(f"after the first sync only {len(_local_files(inbox))} of {scenario.prefill} files")

        inotify = Inotify()
        for sub in ("new", "cur"):
            inotify.watch(inbox / sub)
        floor = RawImap(account.host, account.port)
        floor.login(account.user, account.password)
        floor.start_idle("INBOX")
        appender = RawImap(account.host, account.port)
        appender.login(account.user, account.password)

        # Forked before any thread of ours exists.
        ctx = multiprocessing.get_context("fork")
        two_proc, stop_two, two_results = _start_two_session(ctx, account)

        if scenario.load_rate > 0:
            load_proc, stop_load, load_count = _start_load(ctx, account, scenario)
            load_began = time.monotonic()
            time.sleep(2.0)  # let mirrord settle into the load before measuring

        collector = Collector(inotify, floor)
        collector.start()
        time.sleep(0.2)

        print(f"  {scenario.name}: measuring {args.messages} messages ...", flush=True)
        for k in range(args.messages):
            if not daemon.alive():
                raise RuntimeError(f"mirrord died:\n{daemon.log_tail()}")
            uid, t_ok = appender.append("INBOX", make_message(MEASURED_BASE + k, size=MESSAGE_SIZE))
            sent.append((k, uid, t_ok))
            if args.progress and (k + 1) % args.progress == 0:
                print(f"    {k + 1}/{args.messages}", flush=True)
            time.sleep(rng.uniform(*scenario.gaps(args)))

        if load_proc is not None and stop_load is not None:
            stop_load.set()
            load_proc.join(30)
            out.load_sent = int(load_count.value)
            out.load_seconds = time.monotonic() - load_began

        # Converge: everything the server has is on disk, then stop.
        status = appender.command(b'STATUS "INBOX" (MESSAGES)')[0]
        out.server_count = int(re.search(rb"MESSAGES (\d+)", b" ".join(status)).group(1))  # type: ignore[union-attr]
        if not _wait(lambda: len(_local_files(inbox)) >= out.server_count, 120, 0.2):
            out.notes.append("mirrord did not catch up within 120 s of the last APPEND")
        time.sleep(0.5)
        collector.stop()
        two_bodies, two_heard = _stop_two_session(two_proc, stop_two, two_results)
        if not two_bodies:
            out.notes.append("the two-session floor client reported nothing")
        out.peak_rss_mb = daemon.peak_rss_mb()
        if not daemon.alive():
            out.notes.append(f"mirrord exited early:\n{daemon.log_tail()}")
        status_code = daemon.stop()
        if status_code not in (0, None):
            out.notes.append(f"mirrord exited with status {status_code}")
        if inotify.overflowed:
            out.notes.append("inotify queue overflowed: some arrival times are missing")
        if collector.floor_lost:
            out.notes.append(f"the floor client lost its connection: {collector.floor_lost}")

        _evaluate(out, account, collector, sent, inbox, daemon if args.mirrord_log != "plain" else None, two_bodies,
                  two_heard)
    finally:
        _tear_down(daemon, (stop_load, load_proc), (stop_two, two_proc), collector, (floor, appender), inotify, account)
    return out


def _tear_down(daemon: Mirrord, load: tuple[Any, Any], two: tuple[Any, Any], collector: Collector | None,
               clients: tuple[RawImap | None, ...], inotify: Inotify | None, account: ImapAccount) -> None:
    """Stop what a scenario started, each step on its own: one failing must not
    leave mirrord, the floor client or the load running. ``load`` and ``two``:
    (stop event, process) of the load and the two-session floor client."""
    (stop_load, load_proc), (stop_two, two_proc) = load, two
    if stop_load is not None:
        stop_load.set()
    if stop_two is not None:
        stop_two.set()
    if two_proc is not None:
        two_proc.join(10)
        if two_proc.is_alive():
            two_proc.kill()
    _quietly(daemon.stop)
    if load_proc is not None:
        load_proc.join(10)
        if load_proc.is_alive():
            load_proc.kill()
    if collector is not None and collector.is_alive():
        _quietly(collector.stop)
    for client in clients:
        if client is not None:
            client.close()
    if inotify is not None:
        _quietly(inotify.close)
    _quietly(account.close)




# --------------------------------------------------------------------------
# --phased: each side alone with Dovecot, in alternating phases

PHASE_SETTLE = 1.0
"""Seconds between a phase's sessions being up (mirrord idling and caught up, or the floor
client idling) and its first APPEND, and after its last APPEND's gap before they go."""


def _phase_plan(messages: int, per_side: int) -> list[tuple[str, int]]:
    """F M F ... M F: ``per_side`` mirrord-only phases between ``per_side + 1`` floor-only ones.

    The floor's first and last phases are half as long as the others, so each
    side gets half the messages and both sides' messages sit at the same mean
    time: a drift linear in time (the machine's other load, Dovecot's caches)
    cancels between them. Returns (side, number of messages) per phase.
    """
    def split(total: int, parts: int) -> list[int]:
        return [total * (i + 1) // parts - total * i // parts for i in range(parts)]

    ours = split(messages // 2, per_side)
    halves = split(messages - messages // 2, 2 * per_side)  # the floor's, in half-phases
    floors = [halves[0]] + [halves[2 * i - 1] + halves[2 * i] for i in range(1, per_side)] + [halves[-1]]
    plan = [("floor", floors[0])]
    for i in range(per_side):
        plan += [("mirrord", ours[i]), ("floor", floors[i + 1])]
    return plan


def _caught_up(appender: RawImap, inbox: Path, timeout: float) -> bool:
    """Whether every message the server has now is in the Maildir within ``timeout`` s."""
    status = appender.command(b'STATUS "INBOX" (MESSAGES)')[0]
    count = int(re.search(rb"MESSAGES (\d+)", b" ".join(status)).group(1))  # type: ignore[union-attr]
    return _wait(lambda: len(_local_files(inbox)) >= count, timeout, 0.1)


def _stop_mirrord(daemon: Mirrord, out: Outcome, what: str) -> None:
    """Stop ``mirrord run`` (SIGTERM: it logs out); its peak RSS and any failure go to ``out``."""
    rss = daemon.peak_rss_mb()
    if rss is not None:
        out.peak_rss_mb = max(out.peak_rss_mb or 0.0, rss)
    if not daemon.alive():
        out.notes.append(f"mirrord exited early ({what}):\n{daemon.log_tail()}")
    status_code = daemon.stop()
    if status_code not in (0, None):
        out.notes.append(f"mirrord exited with status {status_code} ({what})")


def run_phased(server: PrivateDovecot, scenario: Scenario, args: argparse.Namespace, root: Path) -> Outcome:
    """One scenario in ``--phased`` mode: floor-only and mirrord-only phases, alternating.

    In a floor-only phase mirrord does not run and the two-session floor
    client is connected; in a mirrord-only phase the floor client has no
    session and ``mirrord run``, restarted, has caught up with what the floor
    phase brought before the phase's first APPEND. Each side thus faces
    Dovecot alone with one IDLE session; (a) is the floor client's own IDLE
    session (a third session would cost Dovecot a rescan per change that
    mirrord's phases do not pay).
    """
    out, work, account, config, inbox, rng = _set_up(server, scenario, args, root)
    gaps = scenario.gaps(args)
    plan = _phase_plan(args.messages, args.phased)
    out.phases = " ".join(f"{side[0].upper()}{n}" for side, n in plan)
    ctx = multiprocessing.get_context("fork")
    daemon = Mirrord(config, work / "mirrord.log", log_mode=args.mirrord_log)
    inotify: Inotify | None = None
    appender: RawImap | None = None
    collector: Collector | None = None
    load_proc: multiprocessing.process.BaseProcess | None = None
    stop_load: EventType | None = None
    two_proc: multiprocessing.process.BaseProcess | None = None
    stop_two: EventType | None = None
    sent: list[tuple[int, int, float]] = []  # (k, uid, t_ok)
    sides: dict[int, str] = {}
    seen = Sightings()
    two_bodies: dict[int, float] = {}
    two_heard: list[tuple[float, int]] = []
    watcher_events: list[tuple[float, int]] = []
    load_count: Any = None
    load_began = 0.0
    try:
        out.first_sync_s = daemon.start(timeout=args.first_sync_timeout)
        if not _wait(lambda: len(_local_files(inbox)) >= scenario.prefill, 60):
            out.notes.append(f"after the first sync only {len(_local_files(inbox))} of {scenario.prefill} files")
        _stop_mirrord(daemon, out, "first sync")

        inotify = Inotify()
        for sub in ("new", "cur"):
            inotify.watch(inbox / sub)
        appender = RawImap(account.host, account.port)
        appender.login(account.user, account.password)
        if scenario.load_rate > 0:
            load_proc, stop_load, load_count = _start_load(ctx, account, scenario)
            load_began = time.monotonic()

        print(f"  {scenario.name}: measuring {args.messages} messages in phases {out.phases} ...", flush=True)
        k = 0
        for number, (side, count) in enumerate(plan, 1):
            if side == "mirrord":
                daemon = Mirrord(config, work / f"mirrord-phase{number}.log", log_mode=args.mirrord_log)
                daemon.start(timeout=args.first_sync_timeout)
                if not _caught_up(appender, inbox, 120):
                    out.notes.append(f"phase {number}: mirrord had not caught up within 120 s of its start")
                collector = Collector(inotify, None)
                collector.start()
            else:
                # Forked with no thread of ours running: the collector is stopped between phases.
                two_proc, stop_two, two_results = _start_two_session(ctx, account)
            time.sleep(PHASE_SETTLE)
            for _ in range(count):
                if side == "mirrord" and not daemon.alive():
                    raise RuntimeError(f"mirrord died:\n{daemon.log_tail()}")
                uid, t_ok = appender.append("INBOX", make_message(MEASURED_BASE + k, size=MESSAGE_SIZE))
                sent.append((k, uid, t_ok))
                sides[k] = side
                k += 1
                if args.progress and k % args.progress == 0:
                    print(f"    {k}/{args.messages}", flush=True)
                time.sleep(rng.uniform(*gaps))
            time.sleep(PHASE_SETTLE)
            if side == "mirrord" and collector is not None:
                if not _caught_up(appender, inbox, 120):
                    out.notes.append(f"phase {number}: mirrord did not catch up within 120 s of its last APPEND")
                collector.stop()
                for name, t in collector.arrivals.items():
                    seen.arrivals.setdefault(name, t)
                collector = None
                if args.mirrord_log != "plain":
                    watcher_events += _watcher_exists(daemon.log())
                _stop_mirrord(daemon, out, f"phase {number}")
            elif two_proc is not None and stop_two is not None:
                bodies, heard = _stop_two_session(two_proc, stop_two, two_results)
                two_proc = stop_two = None
                if not bodies:
                    out.notes.append(f"phase {number}: the two-session floor client reported nothing")
                two_bodies.update(bodies)
                two_heard += heard

        if load_proc is not None and stop_load is not None:
            stop_load.set()
            load_proc.join(30)
            out.load_sent = int(load_count.value)
            out.load_seconds = time.monotonic() - load_began

        # The last phase was the floor's: one more run of mirrord brings the Maildir up to the server.
        daemon = Mirrord(config, work / "mirrord-final.log", log_mode=args.mirrord_log)
        daemon.start(timeout=args.first_sync_timeout)
        if not _caught_up(appender, inbox, 120):
            out.notes.append("mirrord's final run did not catch up within 120 s")
        _stop_mirrord(daemon, out, "final catch-up")
        if inotify.overflowed:
            out.notes.append("inotify queue overflowed: some arrival times are missing")

        # (a) is the floor client's own IDLE session: the first EXISTS it read covering each message.
        seen.exists = two_heard
        _evaluate(out, account, seen, sent, inbox, None, two_bodies, two_heard, sides=sides,
                  watcher_events=watcher_events if args.mirrord_log != "plain" else None)
    finally:
        _tear_down(daemon, (stop_load, load_proc), (stop_two, two_proc), collector, (appender,), inotify, account)
    return out


def _watcher_exists(log: str) -> list[tuple[float, int]]:
    """(CLOCK_MONOTONIC, N) of every ``* N EXISTS`` mirrord's INBOX watcher read (--mirrord-log watcher/full)."""
    found = []
    for match in re.finditer(r"^(\d+\.\d+) DEBUG +\S+/INBOX S: \* (\d+) EXISTS$", log, re.MULTILINE):
        found.append((float(match.group(1)), int(match.group(2))))
    return found


def _first_covering(events: list[tuple[float, int]], seq: int) -> float | None:
    """Time of the first (time, count) event whose count (or an earlier one's) reaches ``seq``."""
    best = 0
    for t, n in events:
        best = max(best, n)
        if best >= seq:
            return t
    return None


@dataclass
class Sightings:
    """What the collector(s) saw, gathered over ``--phased``' phases: file arrivals and the floor's EXISTS."""

    arrivals: dict[str, float] = field(default_factory=dict)
    exists: list[tuple[float, int]] = field(default_factory=list)


def _evaluate(out: Outcome, account: ImapAccount, collector: Collector | Sightings,
              sent: list[tuple[int, int, float]], inbox: Path, traced: Mirrord | None,
              two_bodies: dict[int, float] | None = None,
              two_heard: list[tuple[float, int]] | None = None,
              sides: dict[int, str] | None = None,
              watcher_events: list[tuple[float, int]] | None = None) -> None:
    """Fill ``out`` from what was seen. ``sides`` (``--phased``): message k -> "floor" or "mirrord",
    the only side timed for it; ``watcher_events`` then replaces ``traced``'s log (one log per phase)."""
    out.measured = len(sent)
    if watcher_events is None:
        watcher_events = _watcher_exists(traced.log()) if traced is not None else []

    # The floor: the first EXISTS whose count covers the measured UID's sequence number.
    reader = RawImap(account.host, account.port)
    reader.login(account.user, account.password)
    seq_of = {uid: i + 1 for i, uid in enumerate(reader.uids("INBOX"))}
    reader.close()
    exists_times = [t for t, _ in collector.exists]
    running_max: list[int] = []
    for _, n in collector.exists:
        running_max.append(max(n, running_max[-1]) if running_max else n)

    # mirrord: which file is which message, by the index header inside it.
    file_time: dict[int, float] = {}
    for path in _local_files(inbox):
        head = path.read_bytes()[:4096]
        match = _INDEX_HEADER.search(head)
        if match is None:
            continue
        index = int(match.group(1))
        if MEASURED_BASE <= index < LOAD_BASE:
            arrived = collector.arrivals.get(path.name.split(":", 1)[0])
            if arrived is not None:
                file_time[index - MEASURED_BASE] = arrived

    for k, uid, t_ok in sent:
        side = sides.get(k) if sides is not None else None
        timed_floor, timed_mirrord = side != "mirrord", side != "floor"
        seq = seq_of.get(uid)
        floor_t: float | None = None
        if seq is not None and timed_floor:
            i = bisect.bisect_left(running_max, seq)
            if i < len(running_max):
                floor_t = exists_times[i]
        file_t = file_time.get(k) if timed_mirrord else None
        watcher_t = (_first_covering(watcher_events, seq)
                     if watcher_events and seq is not None and timed_mirrord else None)
        out.trace.append((k, uid, t_ok, floor_t, watcher_t, file_t))
        if watcher_t is not None:
            out.watcher_ms.append((watcher_t - t_ok) * 1000)
        if watcher_t is not None and file_t is not None:
            out.internal_ms.append((file_t - watcher_t) * 1000)
        if file_t is None and timed_mirrord:
            out.missing += 1
        if floor_t is None and timed_floor:
            out.no_floor += 1
        if file_t is not None:
            out.mirrord_ms.append((file_t - t_ok) * 1000)
        if floor_t is not None:
            out.floor_ms.append((floor_t - t_ok) * 1000)
        if file_t is not None and floor_t is not None:
            out.overhead_ms.append((file_t - floor_t) * 1000)
        two_t = two_bodies.get(uid) if two_bodies and timed_floor else None
        two_heard_t = _first_covering(two_heard, seq) if two_heard and seq is not None and timed_floor else None
        if two_t is not None and two_heard_t is not None:
            out.two_internal_ms.append((two_t - two_heard_t) * 1000)
        if watcher_t is not None and two_heard_t is not None:
            out.watcher_late_ms.append((watcher_t - two_heard_t) * 1000)
        if two_t is not None:
            out.two_ms.append((two_t - t_ok) * 1000)
            if file_t is not None:
                out.over_two_ms.append((file_t - two_t) * 1000)

    # The mirror must equal the server, byte for byte.
    expected = sorted(
        hashlib.sha256(body.replace(b"\r\n", b"\n")).hexdigest()
        for _, body in account.client.messages("INBOX").values()
    )
    local = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in _local_files(inbox))
    out.server_count = len(expected)
    out.local_count = len(local)
    out.identical = local == expected


# --------------------------------------------------------------------------
# Reporting


def _row(label: str, values: Sequence[float]) -> str:
    if not values:
        return f"  {label:<40}{'(no data)':>10}"
    cells = [percentile(values, 50), percentile(values, 90), percentile(values, 99), max(values)]
    return f"  {label:<40}" + "".join(f"{c:>10.1f}" for c in cells)


def report(out: Outcome, args: argparse.Namespace) -> None:
    s = out.scenario
    load = ""
    if s.load_rate:
        achieved = out.load_sent / out.load_seconds if out.load_seconds else 0.0
        load = f", background load {out.load_sent} messages at {achieved:.1f}/s (asked {s.load_rate:g}/s)"
    print()
    print(f"== {s.name}: {s.prefill} messages already in INBOX{load}")
    gap_min, gap_max = s.gaps(args)
    print(f"   measured APPENDs: {out.measured}, gaps uniform {gap_min:g}-{gap_max:g} s, "
          f"{MESSAGE_SIZE}-byte messages; mirrord workers {args.workers}; first sync {out.first_sync_s:.1f} s")
    if out.phases:
        print(f"   PHASED: {out.phases} (F: floor client alone, M: mirrord alone; messages per phase). (a)/(b) and")
        print("   (c) time different messages: unpaired distributions, compared by their percentiles only; the")
        print("   alternation (floor's first and last phases half as long) cancels a linear drift between them.")
        print("   (a) is the floor client's own IDLE session (each side: 1 IDLE session + its fetching ones).")
    print(f"  {'latency (ms)':<44}{'median':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    print(_row(f"(a) bare IDLE floor: OK -> EXISTS (n={len(out.floor_ms)})", out.floor_ms))
    print(_row(f"(b) two-session floor: OK -> body (n={len(out.two_ms)})", out.two_ms))
    print(_row(f"(c) mirrord: OK -> file (n={len(out.mirrord_ms)})", out.mirrord_ms))
    if out.two_ms and out.mirrord_ms:
        diff = [out.over_two(p) for p in (50, 90, 99)]
        diff.append(max(out.mirrord_ms) - max(out.two_ms))
        print(f"  {'(c) - (b): mirrord pXX - two-session pXX':<44}" + "".join(f"{c:>10.1f}" for c in diff))
    if not out.phases:  # phased: no message is timed by both sides
        print(_row(f"per message: file - two-session body (n={len(out.over_two_ms)})", out.over_two_ms))
        print(_row(f"per message: file - bare EXISTS (n={len(out.overhead_ms)})", out.overhead_ms))
    if out.watcher_ms:
        print(_row(f"mirrord's watcher: OK -> EXISTS (n={len(out.watcher_ms)})", out.watcher_ms))
    if out.internal_ms:
        print(_row(f"watcher EXISTS -> file (n={len(out.internal_ms)})", out.internal_ms))
    if out.two_internal_ms:
        print(_row(f"floor's IDLE EXISTS -> body (n={len(out.two_internal_ms)})", out.two_internal_ms))
    if out.watcher_late_ms:
        print(_row(f"watcher EXISTS - floor's IDLE EXISTS (n={len(out.watcher_late_ms)})", out.watcher_late_ms))
    if out.two_ms and out.mirrord_ms:
        med, p99 = out.over_two(50), out.over_two(99)
        print(f"  target (c)-(b): median <= {TARGET_MEDIAN_MS:g} ms: {'PASS' if med <= TARGET_MEDIAN_MS else 'FAIL'} "
              f"({med:.1f}); p99 <= {TARGET_P99_MS:g} ms: {'PASS' if p99 <= TARGET_P99_MS else 'FAIL'} ({p99:.1f})")
    if out.missing or out.no_floor:
        print(f"  NOT TIMED: {out.missing} measured messages never seen arriving in the Maildir, "
              f"{out.no_floor} never announced to the floor client")
    print(f"  mirror: {out.local_count} files, server {out.server_count} messages, "
          f"byte-identical: {'yes' if out.identical else 'NO'}")
    rss = f"{out.peak_rss_mb:.1f} MB" if out.peak_rss_mb is not None else "unknown"
    print(f"  mirrord peak RSS (VmHWM): {rss}")
    for note in out.notes:
        print(f"  note: {note}")
    if args.per_message and out.trace:
        print("  per message, CLOCK_MONOTONIC s (mirrord's log uses the same clock):")
        print(f"    {'k':>4} {'uid':>6} {'APPEND OK':>12} {'floor EXISTS':>12} {'mirrord EX.':>12} {'file':>12}"
              f" {'floor':>8} {'mirrord':>8} {'overhead':>8} {'internal':>8}  (ms)")

        def ms(a: float | None, b: float | None) -> str:
            return f"{(a - b) * 1000:.1f}" if a is not None and b is not None else "-"

        def ts(t: float | None) -> str:
            return f"{t:.6f}" if t is not None else "-"

        for k, uid, t_ok, floor_t, watcher_t, file_t in out.trace:
            print(f"    {k:4d} {uid:6d} {ts(t_ok):>12} {ts(floor_t):>12} {ts(watcher_t):>12} {ts(file_t):>12}"
                  f" {ms(floor_t, t_ok):>8} {ms(file_t, t_ok):>8} {ms(file_t, floor_t):>8} {ms(file_t, watcher_t):>8}")


SCENARIOS = {
    "prefill-200": lambda a: Scenario("prefill-200", 200),
    "prefill-10000": lambda a: Scenario("prefill-10000", 10_000),
    "prefill-100000": lambda a: Scenario("prefill-100000", 100_000, min_gap=3.0),
    "load": lambda a: Scenario("load", a.load_prefill, a.load_rate),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="run this scenario (repeatable); default: all four")
    parser.add_argument("--messages", type=int, default=200, help="measured APPENDs per scenario (default 200)")
    parser.add_argument("--gap-min", type=float, default=0.6, help="shortest gap between measured APPENDs, s")
    parser.add_argument("--gap-max", type=float, default=1.2, help="longest gap between measured APPENDs, s")
    parser.add_argument("--load-rate", type=float, default=50.0, help="background APPENDs a second (load scenario)")
    parser.add_argument("--load-prefill", type=int, default=200, help="messages already there (load scenario)")
    parser.add_argument("--prefill-in", choices=("cur", "new"), default="cur",
                        help="where the prefilled messages sit in the server's Maildir: cur (default; a client "
                             "has opened the mailbox) or new (never opened read-write: every Dovecot sync "
                             "then rescans them all)")
    parser.add_argument("--workers", type=int, default=4, help="mirrord's worker connections (default 4)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random gaps")
    parser.add_argument("--first-sync-timeout", type=float, default=600.0)
    parser.add_argument("--progress", type=int, default=50, help="print progress every N messages (0: never)")
    parser.add_argument("--mirrord-log", choices=("plain", "watcher", "full"), default="plain",
                        help="plain: mirrord's normal log; watcher: also log (monotonic clock) when its INBOX "
                             "watcher reads each EXISTS, and report watcher EXISTS -> file; full: the whole "
                             "-v protocol trace on the monotonic clock (slows mirrord under load)")
    parser.add_argument("--phased", type=int, default=0, metavar="K",
                        help="instead of timing both sides on every message, alternate floor-only and "
                             "mirrord-only phases, K of mirrord's (K >= 2; needs --messages >= 4K): each side "
                             "alone with Dovecot; unpaired distributions (see the module docstring)")
    parser.add_argument("--per-message", action="store_true", help="print every measured message's times")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, Maildirs)")
    args = parser.parse_args()
    if args.messages < 1 or not 0 <= args.gap_min <= args.gap_max:
        parser.error("need --messages >= 1 and 0 <= --gap-min <= --gap-max")
    if not sys.platform.startswith("linux"):
        parser.error("inotify is Linux only")
    if args.phased and (args.phased < 2 or args.messages < 4 * args.phased):
        parser.error("--phased K needs K >= 2 and --messages >= 4K")

    print("command: " + shlex.join([sys.executable, *sys.argv]), flush=True)
    scenarios = [SCENARIOS[name](args) for name in (args.scenario or ["prefill-200", "prefill-10000", "prefill-100000", "load"])]

    root = Path(tempfile.mkdtemp(prefix="mirrord-latency-"))
    # At 100,000 messages an imap process re-reading the folder's uidlist
    # outgrows Dovecot's default 256 MB address-space limit and is killed.
    server = PrivateDovecot(root / "server", extra_config="service imap {\n  vsz_limit = 1G\n}\n")
    outcomes: list[Outcome] = []
    try:
        server.start()
        for scenario in scenarios:
            outcome = (run_phased if args.phased else run_scenario)(server, scenario, args, root)
            outcomes.append(outcome)
            report(outcome, args)
    finally:
        server.stop()
        if args.keep or args.mirrord_log != "plain":
            print(f"\nkept {root} (mirrord logs: {root}/<scenario>/mirrord*.log)")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print()
    mode = f"phased, {args.phased} mirrord-only phases: unpaired" if args.phased else "concurrent"
    print(f"summary ({mode}; ms; (a) bare IDLE floor, (b) two-session floor, (c) mirrord; median / p90 / p99):")
    print(f"  {'scenario':<16}{'(a)':>22}{'(b)':>22}{'(c)':>22}{'(c)-(b)':>22}")
    for o in outcomes:
        if o.mirrord_ms and o.two_ms and o.floor_ms:
            cells = ["/".join(f"{percentile(v, p):.1f}" for p in (50, 90, 99)) for v in (o.floor_ms, o.two_ms, o.mirrord_ms)]
            cells.append("/".join(f"{o.over_two(p):.1f}" for p in (50, 90, 99)))
            print(f"  {o.scenario.name:<16}" + "".join(f"{c:>22}" for c in cells) + f"  {'PASS' if o.passed else 'FAIL'}")
        else:
            print(f"  {o.scenario.name:<16} no data  FAIL")
    return 0 if outcomes and all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
