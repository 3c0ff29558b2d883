"""Initial-sync and catch-up speed of ``mirrord run --once`` next to mbsync (isync).

Usage:
    python3 tests/bench/bench_sync.py [--single] [--small] [--multi] [--catchup] [--changes] [--catchup-single]
                                      [--scale 1.0] [--repeat 1] [--workers 4] [--hide-resync]
                                      [--tools mirrord,mbsync] [--catchup-mix text]
                                      [--mirrord-wrapper "py-spy record -o prof.svg --"] [--keep]

A quick run: ``--scale 0.1``. Without a scenario flag, scenarios 1, 1b and 2 run.

Scenarios (message counts are multiplied by ``--scale``; mailbox counts are not):

1. ``--single``: initial sync of one mailbox of 10,000 realistic messages
   (``--mix``, default ``realistic``: 2-30 KB text, about 3 % with a
   0.2-2 MB attachment; about 500 MB). Targets (issue 15): mirrord's wall
   time at most 0.50 of mbsync's, and its CPU time (user + sys) no more
   than mbsync's.
1b. ``--small``: initial sync of one mailbox of 2,000 such messages (start-up
   included, as in every run; at this size it is a good part of the time).
   Target (issue 15): mirrord's wall time at most 0.80 of mbsync's.
2. ``--multi``: initial sync of 4 mailboxes of 2,500 such messages each.
3. ``--catchup``: 50 mailboxes of 2,000 messages (``--catchup-mix``, default
   ``text``: the same 2-30 KB messages without attachments, since only the
   message count matters for a catch-up and 5 GB of attachments would only
   make the set-up slow). Each tool syncs once (reported as "setup"), then
   the second run, with nothing changed on the server, is timed (at least
   a second after the previous run: mbsync sleeps a second when its Maildir
   changed in the current second, which a real catch-up never sees). Target:
   mirrord under 1 s and no slower than mbsync.
4. ``--changes``: on the same set (built and synced as for 3), 100 new
   messages and 100 flag changes (half +\\Flagged, half -\\Seen) are made while
   neither tool runs; the next run is timed, and each tool must have fetched
   exactly the 100 new messages (new file names) and removed nothing.

5. ``--catchup-single``: one mailbox of 10,000 messages (``--catchup-mix``),
   synced once by each tool (not timed), then per ``--repeat``: a run with
   nothing changed, then one after ``--new-messages`` (100) new messages,
   each tool in turn, and beside them the start-up floor, measured the same
   way (``measure``: sync(2) first, GNU time, wait4): a Python process that
   imports exactly the modules ``run --once`` imported (found by untimed
   ``python -X importtime`` runs of the setup and of a no-change catch-up,
   all of them, in that order, each in a ``try``) and exits the way mirrord
   does (``mirrord.cli.exit_quickly``: atexit handlers, flush, no teardown). Target (issue
   #15): mirrord's wall minus the floor at most mbsync's wall, for both.

Every scenario builds its mailboxes once in a private Dovecot on 127.0.0.1
(written straight into the server's Maildir by ``fill()``, from forked
processes, so this process stays small), then runs both tools against the
same server data, each into a Maildir of its own (mirrord with a fresh
state_dir, mbsync with a fresh SyncState dir). mirrord: ``python -m mirrord -c
CONFIG run --once``, ``tls: none``, ``workers`` from ``--workers``. mbsync: a
generated mbsyncrc (``SSLType None`` or, from isync 1.5 on, ``TLSType None``;
``AuthMechs LOGIN``; a channel with ``Patterns *``, ``Sync Pull``, ``Create
Near``, ``Expunge None``; a MaildirStore with ``SubFolders Verbatim``;
PipelineDepth and FSync left at their defaults, i.e. unlimited and yes), run
as ``mbsync -c RC -a``. Both fsync what they write by default; neither
setting is changed.

Before each timed run the file system is synced (``sync(2)``), so that one
run's write-back is not billed to the next. Wall time is measured here; CPU
time (user + sys) is the child's from ``wait4``'s rusage. Peak RSS comes from
GNU time (``/usr/bin/time -f %M``) when it is installed: a child exec'd
straight from this process would report at least this process's own peak
(Linux keeps the pre-exec memory mark), which would swamp mbsync's few MB.
Without GNU time the wait4 figure is shown, marked with ``>=`` when it may be
that floor. Dovecot's own CPU is not counted.

Checks, after every run: the same number of files per mailbox as the server
has messages; for each message the sha256 of the local file and the flag
letters of its name, compared as a set against the server's ``BODY[]`` with
CRLF turned into LF and its FLAGS. mirrord must match byte for byte; for
mbsync the script reports whether it stores LF (CRLF converted) or CRLF and
whether it added a header line (isync 1.4 puts an ``X-TUID:`` line into the
header of every message it stores; that line is taken out before comparing).
In scenario 4 the file names before and after the timed run show how many
messages each tool fetched (new names) and removed (names gone).

Each run's line also shows user and sys CPU apart, CPU per message (user +
sys over the messages the run fetched, in microseconds; start-up included,
so it is what a first sync of that size costs a message) and the 1-minute load
average just before it: on a shared machine, other work skews the figures,
so use ``--repeat`` and read the spread.

Targets also include mirrord's peak RSS for scenarios 1 and 1b: the highest
of its runs, under 64 MB (issue 15).

Prints the exact command, versions, the table (tool, scenario, wall s, CPU s,
CPU us/msg, peak RSS MB, messages/s, MB/s, mirrord/mbsync wall ratio; medians over
``--repeat`` runs), the checks, and the targets. With scenario 3 or 4 it
also prints the start-up floor: the wall time of a Python that only imports
Twisted's reactor and IMAP4Client, which bounds any catch-up from below. Exit status 0 if every check
passed (targets missed do not fail the script), 1 otherwise.

``--mirrord-wrapper`` puts a command in front of mirrord's (for profiling,
e.g. ``"py-spy record -r 250 -f raw -o /tmp/mirrord.txt --"``); the figures
of such a run include the wrapper.

If mbsync is not installed, its rows are skipped with a note
(``apt-get install -y --no-install-recommends isync``).
"""

from __future__ import annotations

import argparse
import hashlib
import imaplib
import json
import multiprocessing
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mirrord.protocol.client import uid_set
from mirrord.testing import DOVECOT, ImapAccount, PrivateDovecot, make_message

MIXES = ("realistic", "text", "small")
FLAG_LETTERS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}
GNU_TIME = "/usr/bin/time"
MEMORY_TARGET_MB = 64
"""Issue 15: a first sync's peak memory stays under this (scenarios 1 and 1b)."""

_fork = multiprocessing.get_context("fork")


# ---------------------------------------------------------------------------
# Work done in forked children, so that no mail passes through this process


def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a forked process and return its (small, picklable) result."""
    receive, send = _fork.Pipe(duplex=False)

    def target() -> None:
        try:
            send.send((True, fn(*args)))
        except BaseException as e:  # noqa: BLE001 - reported in the parent
            import traceback

            send.send((False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))

    child = _fork.Process(target=target)
    child.start()
    send.close()
    try:
        ok, value = receive.recv()
    except EOFError:
        ok, value = False, "the child died without an answer"
    child.join()
    if not ok:
        raise RuntimeError(f"{fn.__name__} failed in a child process: {value}")
    return value


@dataclass(frozen=True)
class Spec:
    """One message to generate: ``make_message(index, size=..., attachment_bytes=...)``."""

    index: int
    size: int
    attachment: int
    seed: int


def message_specs(first_index: int, count: int, mix: str, seed: int) -> list[Spec]:
    """Deterministic sizes for ``count`` messages of a mix.

    realistic: text part 2-30 KB; 3.1 % also carry a 150 KB-1.5 MB attachment,
    which base64 makes 0.2-2 MB, for about 50 KB a message on average.
    text: the same without attachments (about 16 KB). small: 1-4 KB.
    """
    rng = random.Random(seed)
    specs = []
    for k in range(count):
        if mix == "small":
            size, attachment = rng.randint(1_000, 4_000), 0
        else:
            size = rng.randint(2_000, 30_000)
            attachment = rng.randint(150_000, 1_500_000) if mix == "realistic" and rng.random() < 0.031 else 0
        specs.append(Spec(first_index + k, size, attachment, rng.getrandbits(64)))
    return specs


def _generate(spec: Spec) -> bytes:
    return make_message(
        spec.index, size=spec.size, attachment_bytes=spec.attachment, rng=random.Random(spec.seed)
    )


def _fill_all(account: ImapAccount, plan: list[tuple[str, list[Spec], list[tuple[int, tuple[str, ...]]]]]) -> None:
    """Fill each mailbox; ``plan`` = (mailbox, specs, [(count, flags), ...] in UID order).

    Messages are generated by a pool of forked workers (one per CPU, at most
    four) and written in order, so UIDs follow the specs.
    """
    workers = max(1, min(os.cpu_count() or 1, 4))
    with _fork.Pool(workers) as pool:
        for mailbox, specs, runs in plan:
            at = 0
            for count, flags in runs:
                if count <= 0:
                    continue
                chunk = specs[at : at + count]
                at += count
                account.fill(mailbox, pool.imap(_generate, chunk, chunksize=16), flags=flags)


def fill(account: ImapAccount, plan: list[tuple[str, list[Spec], list[tuple[int, tuple[str, ...]]]]]) -> None:
    in_child(_fill_all, account, plan)


def flag_runs(count: int) -> list[tuple[int, tuple[str, ...]]]:
    """Most mail read, a little flagged, the newest fifth unread (UID order)."""
    seen = int(count * 0.78)
    flagged = int(count * 0.80) - seen
    return [(seen, ("\\Seen",)), (flagged, ("\\Seen", "\\Flagged")), (count - seen - flagged, ())]


# -- the server's truth ------------------------------------------------------


def _uid_set(uids: Sequence[int]) -> str:
    return uid_set(uids).decode("ascii")


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


_UID = re.compile(rb"\bUID (\d+)")
_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")


def _records(data: list[Any]) -> list[tuple[bytes, bytes | None]]:
    """imaplib's flat FETCH data regrouped as (text, literal) per message."""
    out: list[tuple[bytes, bytes | None]] = []
    for item in data:
        if item is None:
            continue
        if isinstance(item, tuple):
            head, literal = item
            if out and not re.match(rb"\d+ \(", head):
                text, previous = out[-1]
                out[-1] = (text + head, previous if previous is not None else literal)
            else:
                out.append((head, literal))
        elif re.match(rb"\d+ \(", item) or not out:
            out.append((item, None))
        else:
            text, literal = out[-1]
            out[-1] = (text + item, literal)
    return out


def _letters(flags: bytes) -> str:
    return "".join(sorted(FLAG_LETTERS[f] for f in flags.decode().split() if f in FLAG_LETTERS))


def _digest(account: ImapAccount, mailboxes: list[str], out: str) -> dict[str, tuple[int, int]]:
    """Fetch every message of ``mailboxes`` (BODY.PEEK[]) and record what a mirror must hold.

    Writes ``out`` (JSON, merged with what is there): mailbox -> uid ->
    [sha256 of the body with CRLF -> LF, sha256 of the body as sent, size,
    flag letters]. Returns mailbox -> (messages, bytes).
    """
    path = Path(out)
    table = json.loads(path.read_text()) if path.exists() else {}
    conn = imaplib.IMAP4(account.host, account.port, timeout=120)
    conn.login(account.user, account.password)
    summary = {}
    try:
        for mailbox in mailboxes:
            typ, data = conn.select(_quote(mailbox), readonly=True)
            if typ != "OK":
                raise RuntimeError(f"EXAMINE {mailbox}: {data}")
            entries: dict[str, list[Any]] = {}
            if int(data[0] or 0):
                typ, data = conn.uid("FETCH", "1:*", "(UID RFC822.SIZE)")
                sizes = {}
                for text, _ in _records(data):
                    uid, size = _UID.search(text), _SIZE.search(text)
                    if uid and size:
                        sizes[int(uid.group(1))] = int(size.group(1))
                batch: list[int] = []
                batch_bytes = 0
                uids = sorted(sizes)
                for i, uid in enumerate(uids):
                    batch.append(uid)
                    batch_bytes += sizes[uid]
                    if batch_bytes < 64_000_000 and len(batch) < 1000 and i + 1 < len(uids):
                        continue
                    typ, data = conn.uid("FETCH", _uid_set(batch), "(UID FLAGS BODY.PEEK[])")
                    if typ != "OK":
                        raise RuntimeError(f"UID FETCH in {mailbox}: {data}")
                    for text, body in _records(data):
                        uid_m, flags_m = _UID.search(text), _FLAGS.search(text)
                        if uid_m is None or body is None:
                            continue
                        entries[uid_m.group(1).decode()] = [
                            hashlib.sha256(body.replace(b"\r\n", b"\n")).hexdigest(),
                            hashlib.sha256(body).hexdigest(),
                            len(body),
                            _letters(flags_m.group(1) if flags_m else b""),
                        ]
                    batch, batch_bytes = [], 0
            table[mailbox] = entries
            summary[mailbox] = (len(entries), sum(e[2] for e in entries.values()))
    finally:
        try:
            conn.logout()
        except (imaplib.IMAP4.error, OSError):
            pass
    path.write_text(json.dumps(table))
    return summary


def digest(account: ImapAccount, mailboxes: list[str], out: Path) -> dict[str, tuple[int, int]]:
    return in_child(_digest, account, mailboxes, str(out))


def _choose_changes(truth: str, mailboxes: list[str], count: int, seed: int, taken: list[list[Any]]) -> list[list[Any]]:
    """Pick ``count`` messages (read, not flagged, not changed before) spread over ``mailboxes``.

    Even picks get +\\Flagged, odd ones -\\Seen. Returns [mailbox, uid, how].
    """
    table = json.loads(Path(truth).read_text())
    rng = random.Random(seed)
    used = {(m, u) for m, u, _ in taken}
    candidates = {
        m: sorted(int(u) for u, e in table[m].items() if e[3] == "S" and (m, int(u)) not in used) for m in mailboxes
    }
    picks = []
    for i in range(count):
        mailbox = mailboxes[i % len(mailboxes)]
        pool = candidates[mailbox]
        uid = pool.pop(rng.randrange(len(pool)))
        picks.append([mailbox, uid, "+FLAGS.SILENT (\\Flagged)" if i % 2 == 0 else "-FLAGS.SILENT (\\Seen)"])
    return picks


def _apply_flag_changes(account: ImapAccount, picks: list[list[Any]]) -> None:
    conn = imaplib.IMAP4(account.host, account.port, timeout=60)
    conn.login(account.user, account.password)
    try:
        by_mailbox: dict[str, list[tuple[int, str]]] = {}
        for mailbox, uid, how in picks:
            by_mailbox.setdefault(mailbox, []).append((uid, how))
        for mailbox, changes in by_mailbox.items():
            typ, data = conn.select(_quote(mailbox))
            if typ != "OK":
                raise RuntimeError(f"SELECT {mailbox}: {data}")
            for uid, how in changes:
                item, flags = how.split(" ", 1)
                typ, data = conn.uid("STORE", str(uid), item, flags)
                if typ != "OK":
                    raise RuntimeError(f"UID STORE {uid} in {mailbox}: {data}")
            conn.close()
    finally:
        conn.logout()


# -- the local copies ---------------------------------------------------------


def _local_files(mailbox_dir: Path) -> list[Path]:
    files = []
    for sub in ("new", "cur"):
        d = mailbox_dir / sub
        if d.is_dir():
            files += [p for p in d.iterdir() if p.is_file()]
    return files


def _info(name: str) -> tuple[str, str]:
    """(base name, flag letters) of a Maildir file name."""
    for sep in (":2,", "!2,", ";2,"):
        if sep in name:
            base, letters = name.split(sep, 1)
            return base, "".join(sorted(c for c in letters if c in "DFRST"))
    return name, ""


_TUID = re.compile(rb"^X-TUID: [^\r\n]*\r?\n", re.MULTILINE)


def _without_tuid(data: bytes) -> bytes | None:
    """``data`` without the ``X-TUID:`` header field that mbsync adds to what it stores, or None."""
    end = data.find(b"\n\n")
    head = data[: end + 1] if end >= 0 else data
    match = _TUID.search(head)
    if match is None:
        return None
    return data[: match.start()] + data[match.end() :]


def _check(root: str, mailboxes: list[str], truth: str, strip_tuid: bool) -> dict[str, Any]:
    """Compare a mirror under ``root`` with the server digest; a summary per mailbox and overall.

    Each local file's sha256 and flag letters are compared, as a sorted list
    of pairs, with the server's (body with CRLF -> LF, FLAGS). Counts say how
    many files matched the LF form, the CRLF form (body as sent), and, with
    ``strip_tuid``, either form only once an ``X-TUID:`` header line is taken
    out (mbsync's marker; never acceptable for mirrord).
    """
    table = json.loads(Path(truth).read_text())
    keys = ("files", "expected", "lf", "crlf", "tuid_lf", "tuid_crlf")
    out: dict[str, Any] = {"mailboxes": {}, "ok": True, **{k: 0 for k in keys}}
    for mailbox in mailboxes:
        expected = table[mailbox]
        want = sorted((e[0], e[3]) for e in expected.values())
        lf_set = {e[0] for e in expected.values()}
        crlf_to_lf = {e[1]: e[0] for e in expected.values()}
        counts = dict.fromkeys(keys, 0)
        got = []
        for path in _local_files(Path(root) / mailbox):
            data = path.read_bytes()
            d = hashlib.sha256(data).hexdigest()
            if d in lf_set:
                counts["lf"] += 1
            elif d in crlf_to_lf:
                counts["crlf"] += 1
                d = crlf_to_lf[d]
            elif strip_tuid and (stripped := _without_tuid(data)) is not None:
                s = hashlib.sha256(stripped).hexdigest()
                if s in lf_set:
                    counts["tuid_lf"] += 1
                    d = s
                elif s in crlf_to_lf:
                    counts["tuid_crlf"] += 1
                    d = crlf_to_lf[s]
            got.append((d, _info(path.name)[1]))
        got.sort()
        counts["files"], counts["expected"] = len(got), len(want)
        content_ok = sorted(g[0] for g in got) == sorted(w[0] for w in want)
        flags_ok = got == want
        out["mailboxes"][mailbox] = {
            **counts,
            "content_ok": content_ok,
            "flags_ok": flags_ok,
            "flag_mismatches": len(set(want) - set(got)) if content_ok else None,
        }
        for k in keys:
            out[k] += counts[k]
        out["ok"] = out["ok"] and content_ok and flags_ok
    out["content_ok"] = all(m["content_ok"] for m in out["mailboxes"].values())
    out["flags_ok"] = all(m["flags_ok"] for m in out["mailboxes"].values())
    return out


def check(root: Path, mailboxes: list[str], truth: Path, strip_tuid: bool = False) -> dict[str, Any]:
    return in_child(_check, str(root), mailboxes, str(truth), strip_tuid)


def _names(root: str, mailboxes: list[str], out: str) -> int:
    names = {f"{m}/{_info(p.name)[0]}" for m in mailboxes for p in _local_files(Path(root) / m)}
    Path(out).write_text("\n".join(sorted(names)))
    return len(names)


def _names_diff(root: str, mailboxes: list[str], before: str) -> tuple[int, int]:
    old = set(Path(before).read_text().split("\n")) - {""}
    new = {f"{m}/{_info(p.name)[0]}" for m in mailboxes for p in _local_files(Path(root) / m)}
    return len(new - old), len(old - new)


# ---------------------------------------------------------------------------
# Running the tools


@dataclass
class Run:
    wall: float
    cpu: float
    user: float
    sys: float
    load: float
    """1-minute load average just before the run: other work on the machine skews figures."""
    rss_mb: float
    rss_floor: bool
    """True if the RSS figure may only be this process's own peak (no GNU time)."""
    log: Path


class ToolFailed(RuntimeError):
    pass


def have_gnu_time() -> bool:
    if not os.access(GNU_TIME, os.X_OK):
        return False
    try:
        proc = subprocess.run(
            [GNU_TIME, "-f", "%M", "-o", "/dev/null", "true"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def measure(argv: list[str], log: Path, timeout: float, gnu_time: bool) -> Run:
    """Run ``argv`` once: wall (here), CPU (wait4), peak RSS (GNU time, else wait4)."""
    os.sync()
    load = os.getloadavg()[0]
    rss_file = log.with_suffix(".rss")
    full = [GNU_TIME, "-o", str(rss_file), "-f", "%M", *argv] if gnu_time else argv
    with open(log, "wb") as out:
        started = time.perf_counter()
        child = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)

        def kill() -> None:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = log.read_text("utf-8", "replace").strip().splitlines()[-15:]
        raise ToolFailed(f"{shlex.join(argv)} exited with status {child.returncode}:\n  " + "\n  ".join(tail))
    cpu = usage.ru_utime + usage.ru_stime
    if gnu_time:
        lines = rss_file.read_text().strip().splitlines()
        rss_kb = int(lines[-1])
        floor = False
    else:
        rss_kb = usage.ru_maxrss
        floor = rss_kb <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + 1024
    return Run(wall, cpu, usage.ru_utime, usage.ru_stime, load, rss_kb / 1024, floor, log)


def quiesce(limit: float = 60.0) -> None:
    """Flush dirty pages and wait for the disk to go quiet (I/O pressure, where the kernel reports it)."""
    os.sync()
    started = time.monotonic()
    try:
        while time.monotonic() - started < limit:
            text = Path("/proc/pressure/io").read_text()
            some = float(re.search(r"some avg10=([0-9.]+)", text).group(1))  # type: ignore[union-attr]
            if some < 1.0:
                return
            time.sleep(1)
            os.sync()
    except (OSError, AttributeError, ValueError):
        time.sleep(2)


def describe(run: Run) -> str:
    return (
        f"{run.wall:.3f} s wall, {run.cpu:.3f} s CPU ({run.user:.2f} user + {run.sys:.2f} sys), "
        f"{run.rss_mb:.1f} MB peak RSS; load average before: {run.load:.2f}"
    )


@dataclass
class Tool:
    name: str
    base: Path
    account: ImapAccount
    args: argparse.Namespace
    runs: int = 0
    resets: int = 0
    workdir: Path = Path()

    @property
    def maildir(self) -> Path:
        return self.workdir / "Mail"

    def reset(self) -> None:
        """Fresh Maildir and fresh state, in a new directory.

        The old one is not deleted here: on a file system mounted with
        ``discard`` (as here), deleting 500 MB slows the writes that follow
        for seconds after sync(), and the tool running next would pay for
        it. Everything goes at the end of the scenario, followed by
        :func:`quiesce`.
        """
        self.resets += 1
        self.workdir = self.base / f"r{self.resets}"
        self.workdir.mkdir(parents=True)
        self.maildir.mkdir()

    def command(self) -> list[str]:
        raise NotImplementedError

    last_end: float = 0.0

    def run(self, label: str, settle: bool = False) -> Run:
        """One timed run; with ``settle``, first let the clock leave the second of the last one.

        mbsync sleeps a whole second when a Maildir's new/ or cur/ was
        modified in the current second (it could not tell later changes in
        that second apart); a catch-up run seconds after the previous one is
        the normal case, so catch-up runs wait for the next second first.
        """
        self.runs += 1
        log = self.workdir / f"run-{self.runs}-{label}.log"
        if settle:
            time.sleep(max(0.0, int(self.last_end) + 1.05 - time.time()))
        try:
            return measure(self.command(), log, self.args.timeout, self.args.gnu_time)
        finally:
            self.last_end = time.time()


class Mirrord(Tool):
    def reset(self) -> None:
        super().reset()
        config = self.workdir / "mirrord.yaml"
        config.write_text(
            f"state_dir: {self.workdir / 'state'}\n"
            "accounts:\n"
            "  bench:\n"
            f"    host: {self.account.host}\n"
            f"    port: {self.account.port}\n"
            "    tls: none\n"
            f"    username: {self.account.user}\n"
            f"    password: {self.account.password!r}\n"
            f"    maildir: {self.maildir}\n"
            f"    workers: {self.args.workers}\n"
        )
        os.chmod(config, 0o600)

    def command(self) -> list[str]:
        wrapper = shlex.split(self.args.mirrord_wrapper) if self.args.mirrord_wrapper else []
        return [*wrapper, sys.executable, "-m", "mirrord", "-c", str(self.workdir / "mirrord.yaml"), "run", "--once"]

    @staticmethod
    def fetched(run: Run) -> int:
        """Messages fetched, from the per-mailbox summary lines of the log."""
        text = run.log.read_text("utf-8", "replace")
        return sum(int(n) for n in re.findall(r": (\d+) fetched", text))


FLOOR_RUNS = 7
FLOOR_IMPORTS = "from twisted.internet import reactor; import twisted.mail.imap4"


def import_floor() -> float:
    """Wall time of a Python process that imports only what any Twisted IMAP client needs.

    A catch-up with little to do is mostly process start-up: this is the
    part of it no change to mirrord can remove.
    """
    walls = []
    for _ in range(FLOOR_RUNS):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", FLOOR_IMPORTS], check=True)
        walls.append(time.perf_counter() - started)
    return statistics.median(walls)


def mbsync_version() -> tuple[int, ...] | None:
    exe = shutil.which("mbsync")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in m.groups() if x is not None) if m else (0,)


def mbsyncrc(host: str, port: object, user: str, password: str, maildir: Path, state: Path,
             version: tuple[int, ...]) -> str:
    tls = "TLSType None" if version >= (1, 5) else "SSLType None"
    return f"""\
IMAPAccount bench
Host {host}
Port {port}
User {user}
Pass "{password}"
{tls}
AuthMechs LOGIN

IMAPStore far
Account bench

MaildirStore near
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel bench
Far :far:
Near :near:
Patterns *
Sync Pull
Create Near
Expunge None
SyncState {state}/
"""


class Mbsync(Tool):
    def reset(self) -> None:
        super().reset()
        (self.workdir / "state").mkdir()
        rc = self.workdir / "mbsyncrc"
        a = self.account
        rc.write_text(mbsyncrc(a.host, a.port, a.user, a.password, self.maildir, self.workdir / "state",
                               self.args.mbsync_version))
        os.chmod(rc, 0o600)

    def command(self) -> list[str]:
        return ["mbsync", "-c", str(self.workdir / "mbsyncrc"), "-a"]


# ---------------------------------------------------------------------------
# Results


@dataclass
class Row:
    tool: str
    scenario: str
    key: str
    runs: list[Run] = field(default_factory=list)
    messages: int = 0
    nbytes: int = 0
    skipped: str | None = None

    def med(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    floor_lines: list[str] = field(default_factory=list)

    def row(self, tool: str, scenario: str, key: str, messages: int, nbytes: int) -> Row:
        r = Row(tool, scenario, key, messages=messages, nbytes=nbytes)
        self.rows.append(r)
        return r

    def find(self, tool: str, key: str) -> Row | None:
        for r in self.rows:
            if r.tool == tool and r.key == key and r.runs:
                return r
        return None

    def ratio(self, key: str, what: str = "wall") -> float | None:
        """mirrord's median ``what`` (wall, cpu) over mbsync's, in scenario ``key``."""
        a, b = self.find("mirrord", key), self.find("mbsync", key)
        if a is None or b is None:
            return None
        return a.med(what) / b.med(what)

    def check(self, what: str, ok: bool, detail: str) -> None:
        self.checks.append((what, ok, detail))
        print(f"  check: {'ok  ' if ok else 'FAIL'} {what}: {detail}", flush=True)

    def print_table(self, repeat: int) -> None:
        head = (f"{'tool':<8} {'scenario':<44} {'wall s':>8} {'CPU s':>8} {'CPU us/msg':>11} {'peak RSS MB':>12} "
                f"{'msgs/s':>9} {'MB/s':>7} {'mirrord/mbsync':>15}")
        print(head)
        print("-" * len(head))
        for r in self.rows:
            if r.skipped:
                print(f"{r.tool:<8} {r.scenario:<44} ({r.skipped})")
                continue
            if not r.runs:
                continue
            wall, cpu, rss = r.med("wall"), r.med("cpu"), r.med("rss_mb")
            floor = ">=" if any(x.rss_floor for x in r.runs) else ""
            rate = f"{r.messages / wall:9.0f}" if r.messages else f"{'-':>9}"
            per = f"{cpu / r.messages * 1e6:11.0f}" if r.messages else f"{'-':>11}"
            mbs = f"{r.nbytes / 1e6 / wall:7.1f}" if r.nbytes else f"{'-':>7}"
            ratio = ""
            if r.tool == "mirrord":
                q = self.ratio(r.key)
                ratio = f"{q:15.2f}" if q is not None else f"{'-':>15}"
            print(
                f"{r.tool:<8} {r.scenario:<44} {wall:8.2f} {cpu:8.2f} {per} {floor + f'{rss:.1f}':>12} {rate} {mbs} {ratio}"
            )
            if len(r.runs) > 1:
                print(f"{'':<8} {'  walls: ' + ', '.join(f'{x.wall:.2f}' for x in r.runs)}")


# ---------------------------------------------------------------------------
# Scenarios


def scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path, server: PrivateDovecot, report: Report) -> None:
        self.args = args
        self.root = root
        self.server = server
        self.report = report
        self.serial = 1  # message index: distinct across everything this run generates
        self.seed = 1

    def tools(self, account: ImapAccount, scenario: str) -> list[Tool]:
        tools: list[Tool] = []
        for name in self.args.tools:
            cls = Mirrord if name == "mirrord" else Mbsync
            if name == "mbsync" and self.args.mbsync_version is None:
                continue
            tools.append(cls(name, self.root / scenario / name, account, self.args))
        return tools

    def skipped_rows(self, scenario: str, key: str) -> None:
        if "mbsync" in self.args.tools and self.args.mbsync_version is None:
            row = self.report.row("mbsync", scenario, key, 0, 0)
            row.skipped = "skipped: mbsync not installed; apt-get install -y --no-install-recommends isync"

    def build(self, name: str, mailboxes: dict[str, int], mix: str) -> tuple[ImapAccount, Path, dict[str, tuple[int, int]]]:
        account = self.server.new_account(name)
        account.client.close()
        plan = []
        for mailbox, count in mailboxes.items():
            specs = message_specs(self.serial, count, mix, self.seed)
            self.serial += count
            self.seed += 1
            plan.append((mailbox, specs, flag_runs(count)))
        started = time.monotonic()
        fill(account, plan)
        truth = self.root / f"{name}-truth.json"
        summary = digest(account, list(mailboxes), truth)
        total = sum(c for c, _ in summary.values())
        nbytes = sum(b for _, b in summary.values())
        print(
            f"  built {len(mailboxes)} mailbox(es), {total} messages, {nbytes / 1e6:.0f} MB "
            f"({mix} mix) in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        for mailbox, count in mailboxes.items():
            if summary[mailbox][0] != count:
                raise RuntimeError(f"{mailbox}: the server holds {summary[mailbox][0]} messages, not {count}")
        quiesce()
        return account, truth, summary

    def cleanup(self, tools: list[Tool]) -> None:
        if self.args.keep:
            return
        for tool in tools:
            shutil.rmtree(tool.base, ignore_errors=True)
        quiesce()

    def verify(self, tool: Tool, what: str, mailboxes: list[str], truth: Path) -> bool:
        mirrord = tool.name == "mirrord"
        r = check(tool.maildir, mailboxes, truth, strip_tuid=not mirrord)
        detail = f"{r['files']}/{r['expected']} files"
        if mirrord:
            # Byte for byte: only the LF form of the server's BODY[] counts.
            ok = r["ok"] and r["lf"] == r["files"]
            detail += (
                f"; sha256 set == server BODY[] CRLF->LF: {'yes' if r['content_ok'] and r['lf'] == r['files'] else 'NO'}"
                f"; flags: {'same' if r['flags_ok'] else 'DIFFER'}"
            )
        else:
            ok = r["ok"]
            forms = [
                (r["lf"], "LF (CRLF converted), byte-identical"),
                (r["crlf"], "CRLF as sent, byte-identical"),
                (r["tuid_lf"], "LF (CRLF converted) plus an X-TUID: header line, otherwise identical"),
                (r["tuid_crlf"], "CRLF plus an X-TUID: header line, otherwise identical"),
            ]
            found = [f"{n} {text}" for n, text in forms if n]
            detail += f"; stores: {'; '.join(found) or 'nothing that matches the server'}"
            detail += f"; content matches: {'yes' if r['content_ok'] else 'NO'}; flags: {'same' if r['flags_ok'] else 'DIFFER'}"
        bad = [
            f"{m}: {x['files']}/{x['expected']} files"
            + ("" if x["content_ok"] else ", content differs")
            + ("" if x["flags_ok"] or not x["content_ok"] else f", {x['flag_mismatches']} flag mismatches")
            for m, x in r["mailboxes"].items()
            if not (x["content_ok"] and x["flags_ok"])
        ]
        if bad:
            detail += " [" + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else "") + "]"
        self.report.check(f"{what}, {tool.name}", ok, detail)
        return ok

    # -- 1 and 2: initial sync --------------------------------------------------

    def initial(self, key: str, title: str, mailboxes: dict[str, int]) -> None:
        print(f"\n== {title}", flush=True)
        account, truth, summary = self.build(f"bench-{key}", mailboxes, self.args.mix)
        total = sum(c for c, _ in summary.values())
        nbytes = sum(b for _, b in summary.values())
        label = f"{key} initial {len(mailboxes)}x{next(iter(mailboxes.values()))} ({nbytes / 1e6:.0f} MB)"
        tools = self.tools(account, f"s{key}")
        rows = {t.name: self.report.row(t.name, label, key, total, nbytes) for t in tools}
        self.skipped_rows(label, key)
        for rep in range(self.args.repeat):
            order = tools if rep % 2 == 0 else list(reversed(tools))
            for tool in order:
                tool.reset()
                run = tool.run("initial")
                rows[tool.name].runs.append(run)
                print(f"  {tool.name} run {rep + 1}: {describe(run)}; "
                      f"{run.cpu / total * 1e6:.0f} us CPU per message", flush=True)
                self.verify(tool, f"{key} initial (run {rep + 1})", list(mailboxes), truth)
                if isinstance(tool, Mirrord):
                    fetched = Mirrord.fetched(run)
                    self.report.check(
                        f"{key} initial (run {rep + 1}), mirrord log", fetched == total, f"{fetched} fetched of {total}"
                    )
        self.cleanup(tools)
        q = self.report.ratio(key)
        if q is not None:
            c = self.report.ratio(key, "cpu")
            print(f"  mirrord/mbsync wall: {q:.2f}, CPU: {c:.2f}", flush=True)

    # -- 3 and 4: catch-up -------------------------------------------------------

    def _run_and_count(self, tool: Tool, names: list[str], label: str, what: str, check: str, want: int) -> Run:
        """One timed run that must fetch exactly ``want`` new files and remove none."""
        before = tool.workdir / "names-before.txt"
        in_child(_names, str(tool.maildir), names, str(before))
        run = tool.run(label, settle=True)
        print(f"  {tool.name} {what}: {describe(run)}", flush=True)
        added, removed = in_child(_names_diff, str(tool.maildir), names, str(before))
        self.report.check(check, added == want and removed == 0,
                          f"{added} new files (want {want}), {removed} gone (want 0)")
        return run

    def catchup(self, no_changes: bool, changes: bool) -> None:
        a = self.args
        per = scaled(2000, a.scale)
        names = ["INBOX", *(f"Archive/{2000 + i}" for i in range(1, a.catchup_mailboxes))]
        mailboxes = {m: per for m in names}
        print(f"\n== 3/4 catch-up set: {len(names)} mailboxes x {per} messages", flush=True)
        account, truth, summary = self.build("bench-catchup", mailboxes, a.catchup_mix)
        total = sum(c for c, _ in summary.values())
        nbytes = sum(b for _, b in summary.values())
        tools = self.tools(account, "catchup")
        setup_label = f"3/4 setup: initial {len(names)}x{per} ({nbytes / 1e6:.0f} MB)"
        rows = {t.name: self.report.row(t.name, setup_label, "setup", total, nbytes) for t in tools}
        self.skipped_rows(setup_label, "setup")
        for tool in tools:
            tool.reset()
            run = tool.run("setup")
            rows[tool.name].runs.append(run)
            print(f"  {tool.name} setup: {describe(run)}", flush=True)
            self.verify(tool, "3/4 setup", names, truth)

        if no_changes:
            label = f"3 catch-up, nothing changed, {len(names)}x{per}"
            rows = {t.name: self.report.row(t.name, label, "3", 0, 0) for t in tools}
            self.skipped_rows(label, "3")
            for rep in range(a.repeat):
                for tool in tools if rep % 2 == 0 else list(reversed(tools)):
                    run = tool.run("nochange", settle=True)
                    rows[tool.name].runs.append(run)
                    print(f"  {tool.name} no-change run {rep + 1}: {describe(run)}", flush=True)
                    if isinstance(tool, Mirrord):
                        fetched = Mirrord.fetched(run)
                        self.report.check(f"3 catch-up (run {rep + 1}), mirrord log", fetched == 0,
                                          f"{fetched} fetched")
            for tool in tools:
                self.verify(tool, "3 catch-up", names, truth)

        if changes:
            n_new, n_flags = a.new_messages, a.flag_changes
            label = f"4 catch-up, {n_new} new + {n_flags} flag changes"
            changed_boxes = names[: min(10, len(names))]
            rows = {t.name: self.report.row(t.name, label, "4", 0, 0) for t in tools}
            self.skipped_rows(label, "4")
            taken: list[list[Any]] = []
            for rep in range(a.repeat):
                # Changes made while neither tool runs: new mail spread over
                # the first ten mailboxes, flag changes over the same ones.
                new_plan = []
                for i, mailbox in enumerate(changed_boxes):
                    count = n_new // len(changed_boxes) + (1 if i < n_new % len(changed_boxes) else 0)
                    if count:
                        specs = message_specs(self.serial, count, a.catchup_mix, 1000 + self.seed)
                        self.serial += count
                        self.seed += 1
                        new_plan.append((mailbox, specs, [(count, ())]))
                picks = in_child(_choose_changes, str(truth), changed_boxes, n_flags, 4242 + rep, taken)
                taken += picks
                fill(account, new_plan)
                in_child(_apply_flag_changes, account, picks)
                after = digest(account, changed_boxes, truth)
                new_bytes = sum(after[m][1] - summary[m][1] for m in changed_boxes)
                summary.update(after)
                for tool in tools if rep % 2 == 0 else list(reversed(tools)):
                    row = rows[tool.name]
                    row.messages, row.nbytes = n_new, new_bytes
                    run = self._run_and_count(tool, names, "changes", f"changes run {rep + 1}",
                                              f"4 changes (run {rep + 1}), {tool.name} fetched", n_new)
                    row.runs.append(run)
                    if isinstance(tool, Mirrord):
                        fetched = Mirrord.fetched(run)
                        self.report.check(f"4 changes (run {rep + 1}), mirrord log", fetched == n_new,
                                          f"{fetched} fetched")
                    self.verify(tool, f"4 changes (run {rep + 1})", names, truth)
        self.cleanup(tools)


    # -- 5: catch-up of one big mailbox, beside the start-up floor -----------------

    def catchup_single(self) -> None:
        a = self.args
        count = scaled(10_000, a.scale)
        print(f"\n== 5 catch-up of one mailbox of {count} messages, beside the start-up floor", flush=True)
        account, truth, summary = self.build("bench-single-catchup", {"INBOX": count}, a.catchup_mix)
        names = ["INBOX"]
        tools = self.tools(account, "single-catchup")
        mirrord_tool = next((t for t in tools if isinstance(t, Mirrord)), None)
        imported: list[str] = []
        for tool in tools:
            tool.reset()
            if tool is mirrord_tool:
                # Untimed, under -X importtime: the modules the floor imports.
                imported += mirrord_imports(tool, "setup")
                time.sleep(1.05)
                imported += mirrord_imports(tool, "nochange-imports")
            else:
                run = tool.run("setup")
                print(f"  {tool.name} setup (not timed for the table): {describe(run)}", flush=True)
            self.verify(tool, "5 setup", names, truth)
        floor_tool = Floor("floor", self.root / "single-catchup" / "floor", account, a)
        floor_tool.reset()
        floor_tool.write(imported)
        print(f"  start-up floor: {sys.executable} FLOOR.py, importing the {len(floor_tool.modules)} modules "
              "`run --once` imported (python -X importtime), then exiting as mirrord does (exit_quickly)", flush=True)
        labels = {
            "5a": f"5 one mailbox of {count}: nothing changed",
            "5b": f"5 one mailbox of {count}: {a.new_messages} new",
        }
        rows = {
            (key, t.name): self.report.row(t.name, label, key, 0, 0)
            for key, label in labels.items()
            for t in [*tools, floor_tool]
        }
        for key, label in labels.items():
            self.skipped_rows(label, key)
        for rep in range(a.repeat):
            order = [*tools, floor_tool] if rep % 2 == 0 else [floor_tool, *reversed(tools)]
            for tool in order:
                run = tool.run("nochange", settle=True)
                rows["5a", tool.name].runs.append(run)
                print(f"  {tool.name} no-change run {rep + 1}: {describe(run)}", flush=True)
                if tool is mirrord_tool:
                    fetched = Mirrord.fetched(run)
                    self.report.check(f"5 no change (run {rep + 1}), mirrord log", fetched == 0, f"{fetched} fetched")
            specs = message_specs(self.serial, a.new_messages, a.catchup_mix, 2000 + self.seed)
            self.serial += a.new_messages
            self.seed += 1
            fill(account, [("INBOX", specs, [(a.new_messages, ())])])
            after = digest(account, names, truth)
            new_bytes = after["INBOX"][1] - summary["INBOX"][1]
            summary.update(after)
            for tool in order:
                row = rows["5b", tool.name]
                if isinstance(tool, Floor):
                    run = tool.run("new", settle=True)
                    row.runs.append(run)
                    print(f"  {tool.name} {a.new_messages}-new run {rep + 1}: {describe(run)}", flush=True)
                    continue
                row.messages, row.nbytes = a.new_messages, new_bytes
                row.runs.append(self._run_and_count(
                    tool, names, "new", f"{a.new_messages}-new run {rep + 1}",
                    f"5 {a.new_messages} new (run {rep + 1}), {tool.name} fetched", a.new_messages))
                self.verify(tool, f"5 {a.new_messages} new (run {rep + 1})", names, truth)
        for key, label in labels.items():
            self.report.floor_lines.append(floor_line(self.report, key, label))
            print("  " + self.report.floor_lines[-1], flush=True)
        self.cleanup([*tools, floor_tool])


def floor_line(report: Report, key: str, label: str) -> str:
    """``label``: mirrord, floor, mbsync walls (medians) and (mirrord - floor) against mbsync."""
    m, f, b = report.find("mirrord", key), report.find("floor", key), report.find("mbsync", key)
    if m is None or f is None:
        return f"{label}: no mirrord or floor figure"
    above = m.med("wall") - f.med("wall")
    text = (f"{label}: mirrord {m.med('wall') * 1e3:.0f} ms, floor {f.med('wall') * 1e3:.0f} ms, "
            f"mirrord - floor {above * 1e3:.0f} ms")
    if b is None:
        return text + "; no mbsync figure (target: mirrord - floor <= mbsync)"
    verdict = "met" if above <= b.med("wall") else "NOT met"
    return text + f", mbsync {b.med('wall') * 1e3:.0f} ms: target (mirrord - floor) <= mbsync {verdict}"


_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|( *)(\S+)$", re.M)


def mirrord_imports(tool: Mirrord, label: str) -> list[str]:
    """One untimed ``run --once`` under ``python -X importtime``: the modules it imported, in order."""
    argv = tool.command()
    at = argv.index(sys.executable) + 1 if sys.executable in argv else 1
    argv = [*argv[:at], "-X", "importtime", *argv[at:]]
    log = tool.workdir / f"imports-{label}.log"
    with open(log, "wb") as out:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True, timeout=tool.args.timeout)
    tool.last_end = time.time()
    return [m.group(2) for m in _IMPORTED.finditer(log.read_text("utf-8", "replace"))]


class Floor(Tool):
    """The start-up floor as a tool: a Python that imports what ``run --once`` imports, and exits."""

    modules: list[str] = []

    def write(self, imported: list[str]) -> None:
        seen: set[str] = set()
        self.modules = [m for m in imported if m not in seen and not seen.add(m)  # type: ignore[func-returns-value]
                        and m not in ("__main__", "mirrord.__main__", "site") and not m.startswith("encodings")]
        # Only those modules: a module of the list may try to import more
        # than mirrord let it (run --once keeps the TLS stack out for
        # tls: none accounts, cli.without_tls); the floor must not pay for it.
        (self.workdir / "floor.py").write_text(
            "import importlib, sys\n"
            f"allowed = set({self.modules!r})\n"
            "class OnlyThose:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name not in allowed:\n"
            "            raise ModuleNotFoundError(name)\n"
            "        return None\n"
            "sys.meta_path.insert(0, OnlyThose())\n"
            f"for name in {self.modules!r}:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception:\n"
            "        pass\n"
            "try:\n"
            "    from mirrord.cli import exit_quickly\n"
            "except ImportError:  # a tree from before it: mirrord exits normally there too\n"
            "    import sys\n"
            "    exit_quickly = sys.exit\n"
            "exit_quickly(0)\n"
        )

    def command(self) -> list[str]:
        return [sys.executable, str(self.workdir / "floor.py")]

# ---------------------------------------------------------------------------


def versions(args: argparse.Namespace) -> list[str]:
    import twisted

    lines = [
        f"python   {platform.python_version()} ({sys.executable})",
        f"twisted  {twisted.__version__}",
    ]
    repo = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    lines.append(f"mirrord  {rev or '?'} ({repo})")
    if args.mbsync_version is None:
        lines.append("mbsync   not installed: its rows are skipped (apt-get install -y --no-install-recommends isync)")
    else:
        out = subprocess.run(["mbsync", "--version"], capture_output=True, text=True).stdout.strip()
        lines.append(f"mbsync   {out} ({shutil.which('mbsync')})")
    try:
        dv = subprocess.run([str(DOVECOT), "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        dv = "?"
    lines.append(f"dovecot  {dv}")
    lines.append(f"host     {platform.platform()}, {os.cpu_count()} CPUs")
    lines.append(
        "peak RSS "
        + ("GNU time (%M) around each tool" if args.gnu_time else "wait4 (no GNU time: may show this process's peak)")
    )
    return lines


def compile_mirrord() -> str:
    """Byte-compile mirrord's modules, as ``pip install`` does.

    Under PYTHONDONTWRITEBYTECODE (set on some machines) a source checkout
    would otherwise compile every module on every run, and the timed runs
    would measure the compiler rather than a catch-up.
    """
    import compileall

    import mirrord

    root = Path(mirrord.__file__).parent
    compileall.compile_dir(str(root), quiet=1)
    return f"bytecode: compiled {root} ahead, as pip install does"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single", action="store_true", help="scenario 1: one mailbox of 10,000")
    parser.add_argument("--small", action="store_true", help="scenario 1b: one mailbox of 2,000")
    parser.add_argument("--multi", action="store_true", help="scenario 2: 4 mailboxes of 2,500")
    parser.add_argument("--catchup", action="store_true", help="scenario 3: no-change catch-up, 50 x 2,000")
    parser.add_argument("--changes", action="store_true", help="scenario 4: catch-up after 100 new + 100 flag changes")
    parser.add_argument("--catchup-single", action="store_true",
                        help="scenario 5: one mailbox of 10,000, no change and 100 new, beside the start-up floor")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply message counts (default 1.0)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool and scenario; medians reported")
    parser.add_argument("--workers", type=int, default=4, help="mirrord's workers (default 4)")
    parser.add_argument("--tools", default="mirrord,mbsync", help="comma-separated: mirrord,mbsync")
    parser.add_argument("--mix", choices=MIXES, default="realistic", help="messages of scenarios 1 and 2")
    parser.add_argument("--catchup-mix", choices=MIXES, default="text", help="messages of scenarios 3 and 4")
    parser.add_argument("--catchup-mailboxes", type=int, default=50)
    parser.add_argument("--hide-resync", action="store_true",
                        help="the server does not offer CONDSTORE/QRESYNC (times the plain listing path)")
    parser.add_argument("--new-messages", type=int, default=100)
    parser.add_argument("--flag-changes", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a tool run is killed")
    parser.add_argument("--mirrord-wrapper", default="", help="command put in front of mirrord's, e.g. a profiler")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put server and mirrors (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the server data and the mirrors")
    args = parser.parse_args()
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not args.tools or any(t not in ("mirrord", "mbsync") for t in args.tools):
        parser.error("--tools takes mirrord and/or mbsync")
    if args.repeat < 1 or args.scale <= 0 or args.catchup_mailboxes < 1:
        parser.error("--repeat, --scale and --catchup-mailboxes must be positive")
    if not (args.single or args.small or args.multi or args.catchup or args.changes or args.catchup_single):
        args.single = args.small = args.multi = True
    args.mbsync_version = mbsync_version()
    args.gnu_time = have_gnu_time()

    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(compile_mirrord())
    for line in versions(args):
        print(line)
    print(
        f"mirrord: python -m mirrord -c RUN/mirrord.yaml run --once   (tls: none, workers: {args.workers}"
        + (f", wrapped in: {args.mirrord_wrapper}" if args.mirrord_wrapper else "")
        + ")"
    )
    if args.mbsync_version is not None:
        print("mbsync:  mbsync -c RUN/mbsyncrc -a   with this mbsyncrc (password elided):")
        example = mbsyncrc("127.0.0.1", "PORT", "USER", "...", Path("RUN/Mail"), Path("RUN/state"),
                           args.mbsync_version)
        print("    " + example.strip().replace("\n", "\n    "))
    print(flush=True)

    base = args.workdir if args.workdir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="mirrord-bench-sync-", dir=base))
    report = Report()
    server = PrivateDovecot(
        root / "server",
        max_connections=50,
        hide_capabilities=("CONDSTORE", "QRESYNC") if args.hide_resync else (),
    )
    if args.hide_resync:
        print("server: CONDSTORE and QRESYNC hidden (--hide-resync): catch-ups use the plain UID listing")
    ok = True
    try:
        server.start()
        bench = Bench(args, root, server, report)
        if args.single:
            bench.initial("1", "scenario 1: initial sync, 1 mailbox", {"INBOX": scaled(10_000, args.scale)})
        if args.small:
            bench.initial("1b", "scenario 1b: initial sync, 1 mailbox", {"INBOX": scaled(2_000, args.scale)})
        if args.multi:
            per = scaled(2_500, args.scale)
            bench.initial(
                "2", "scenario 2: initial sync, 4 mailboxes",
                {"INBOX": per, "Archive/2023": per, "Archive/2024": per, "Lists/dev": per},
            )
        if args.catchup or args.changes:
            bench.catchup(args.catchup, args.changes)
        if args.catchup_single:
            bench.catchup_single()
    except ToolFailed as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        ok = False
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        ok = False
    finally:
        server.stop()
        if args.keep:
            print(f"\nkept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print("\n" + "=" * 20 + " results " + "=" * 20)
    print(f"(medians of {args.repeat} run(s); MB = 10^6 bytes as the server sends them; "
          "CPU = user + sys of the tool's process)")
    report.print_table(args.repeat)

    print("\nchecks:")
    for what, passed, detail in report.checks:
        print(f"  {'ok  ' if passed else 'FAIL'} {what}: {detail}")
    all_ok = ok and all(p for _, p, _ in report.checks)

    print("\ntargets:")
    q = report.ratio("1")
    if q is not None:
        c = report.ratio("1", "cpu")
        assert c is not None
        print(f"  1: mirrord/mbsync wall {q:.2f}, target <= 0.50: {'met' if q <= 0.50 else 'NOT met'}; "
              f"CPU {c:.2f}, target <= 1.00: {'met' if c <= 1.0 else 'NOT met'}")
    elif report.find("mirrord", "1"):
        print("  1: no mbsync figure to compare with (targets: mirrord/mbsync wall <= 0.50, CPU <= 1.00)")
    q = report.ratio("1b")
    if q is not None:
        print(f"  1b: mirrord/mbsync wall {q:.2f}, target <= 0.80: {'met' if q <= 0.80 else 'NOT met'}")
    elif report.find("mirrord", "1b"):
        print("  1b: no mbsync figure to compare with (target: mirrord/mbsync wall <= 0.80)")
    for key in ("1", "1b"):
        m = report.find("mirrord", key)
        if m is not None and m.runs:
            peak = max(r.rss_mb for r in m.runs)
            print(f"  {key}: mirrord peak RSS {peak:.1f} MB (highest of its runs), target < {MEMORY_TARGET_MB} MB: "
                  f"{'met' if peak < MEMORY_TARGET_MB else 'NOT met'}")
    q = report.ratio("2")
    if q is not None:
        print(f"  2: mirrord/mbsync wall {q:.2f} (no target of its own; 1's is <= 0.50)")
    m3 = report.find("mirrord", "3")
    if m3 is not None:
        wall = m3.med("wall")
        b3 = report.find("mbsync", "3")
        versus = f", mbsync {b3.med('wall'):.2f} s: {'met' if wall <= b3.med('wall') else 'NOT met'}" if b3 else ""
        print(f"  3: mirrord {wall:.2f} s, target < 1 s: {'met' if wall < 1 else 'NOT met'}; "
              f"target <= mbsync{versus or ': no mbsync figure'}")
    m4 = report.find("mirrord", "4")
    if m4 is not None:
        b4 = report.find("mbsync", "4")
        print(f"  4: mirrord {m4.med('wall'):.2f} s" + (f", mbsync {b4.med('wall'):.2f} s" if b4 else "")
              + "; both must fetch exactly the new messages (see checks)")
    if m3 is not None or m4 is not None:
        floor = import_floor()
        print(f"  start-up floor: a Python that only imports Twisted's reactor and IMAP4Client takes "
              f"{floor:.2f} s wall (median of {FLOOR_RUNS}); mirrord's catch-ups cannot be faster than that")
    for line in report.floor_lines:
        print(f"  {line}")
    print(f"\n{'all checks passed' if all_ok else 'SOME CHECKS FAILED'}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
