"""Two-way latency of ``mirrord run``: a reader's local change to the server showing it.

Usage (from the repository root, Dovecot installed as for the integration tests):

    python3 tests/bench/bench_push.py [--messages 200 --messages 10000] [--flags 100]
        [--deletions 20] [--moves 20] [--gap-min 0.3] [--gap-max 0.6] [--burst 1]
        [--poll-interval 0.005] [--profile DIR] [--per-change] [--keep]

A quick run: ``--messages 200 --flags 20 --deletions 5 --moves 5``. The full
run (both folder sizes, 140 changes each) takes about 6 minutes, most of it
filling and first-syncing the 10,000-message folder.

Against a private Dovecot on 127.0.0.1, for each ``--messages`` size
(repeatable; default 200 and 10,000), with a fresh user, Maildir and
``mirrord run`` on a two-way account mirroring INBOX and Archive:

* INBOX holds that many unflagged messages (written with ``fill()``, then
  opened read-write once so that Dovecot moves them to cur/), Archive a few;
  mirrord's first sync is waited for;
* then, in a shuffled order, ``--flags`` local flag changes (a rename to
  ``cur/KEY:2,LETTERS`` with a non-empty subset of S, F, R: what neomutt and
  notmuch do), ``--deletions`` unlinks and ``--moves`` renames of an INBOX
  file into ``Archive/cur/``, each on a different message. ``--burst K``
  makes K changes back to back (K=1: one at a time); between bursts a gap
  uniform in ``--gap-min``..``--gap-max`` s, counted from when the server
  showed the last change of the burst, so that with K=1 each change is its
  own round.

Per change, t0 is ``time.monotonic()`` just before the rename/unlink; the
server "shows" it when a separate client polling every ``--poll-interval`` s
(two dedicated connections, EXAMINE on INBOX and on Archive; ``UID FETCH
<pending UIDs> (FLAGS)`` and ``UID SEARCH HEADER Message-ID``) sees it:

* flag change: the UID's flags equal the new letters' flags;
* deletion: the UID carries ``\\Deleted`` or is gone (expunged);
* move: the UID is gone from INBOX (or ``\\Deleted``) and Archive holds a
  message with its Message-ID.

So a figure is mirrord's latency (0.2 s debounce, the round, the server's
work) plus up to one poll interval and one poll's round trip. The poller
needs no IDLE and so has no 500 ms floor. mirrord's own INFO log is kept,
stamped with the monotonic clock, and the row "round logged" gives, per
change, t0 to the end of the first round whose "sent local changes" line
came after t0 and names that kind ("move" or "new message" for a move, singular or plural);
the kinds those lines add up to are printed too (a move sent as a deletion
plus an upload shows there, and is flagged).

Prints the exact command line, then per folder size a table of median, p90,
p99 and max (ms) per kind of change and for all of them, PASS/FAIL against
the issue's target (median of all under 1 s), how many rounds mirrord logged,
the first sync's duration and mirrord's peak RSS (VmHWM) after the first sync
and at the end; then a summary comparing the sizes (the target wants them
flat). ``--profile DIR`` runs mirrord under cProfile and writes
``DIR/mirrord-<size>.prof`` (the first sync included; look at it with
``python3 -m pstats``). Exit status 0 when every size met the target and
every change was seen, 1 otherwise. Linux only; nothing beyond mirrord's
test dependencies.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import _benchlib
from _benchlib import local_files as _local_files
from _benchlib import percentile, quote
from _benchlib import quietly as _quietly
from _benchlib import wait as _wait

from mirrord.testing import ImapAccount, PrivateDovecot, make_message

MESSAGE_SIZE = 2000
ARCHIVE_PREFILL = 5
ARCHIVE_BASE = 900_000
TARGET_MEDIAN_MS = 1000.0
FLAG_NAMES = {"S": "\\Seen", "F": "\\Flagged", "R": "\\Answered"}
LETTER_SETS = ["S", "F", "FS", "R", "RS", "FRS", "FR"]

_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]+>)", re.MULTILINE | re.IGNORECASE)
_FETCH = re.compile(rb"^\* \d+ FETCH \((.*)\)$")
_UID = re.compile(rb"UID (\d+)")
_FLAGS = re.compile(rb"FLAGS \(([^)]*)\)")
_LITERAL = re.compile(rb"\{(\d+)\}$")
_ROUND_WORDS = {"flags": ("flag change",), "deletion": ("deletion",), "move": ("move", "new message")}
"""Which words of a "sent local changes" line mean a round sent a change of that kind."""
_SENT = re.compile(r"^(\d+\.\d+) INFO +\S+: sent local changes to the server: (.*)$", re.MULTILINE)


# --------------------------------------------------------------------------
# A minimal synchronous IMAP client on a raw socket


class RawImap(_benchlib.RawImap):
    """UID FETCH FLAGS and SEARCH by Message-ID, with little overhead per poll."""

    def flags(self, uids: Sequence[int]) -> dict[int, frozenset[str]]:
        """UID -> flags (without \\Recent) of those of ``uids`` still in the selected mailbox."""
        found: dict[int, frozenset[str]] = {}
        if not uids:
            return found
        for line in self.lines(b"UID FETCH " + ",".join(map(str, uids)).encode() + b" (UID FLAGS)"):
            match = _FETCH.match(line)
            if match is None:
                continue
            uid, flags = _UID.search(match.group(1)), _FLAGS.search(match.group(1))
            if uid is not None and flags is not None:
                found[int(uid.group(1))] = frozenset(flags.group(1).decode().split()) - {"\\Recent"}
        return found

    def has_message_id(self, mid: str) -> bool:
        for line in self.lines(b"UID SEARCH HEADER Message-ID " + quote(mid)):
            if line.startswith(b"* SEARCH") and line[len(b"* SEARCH") :].strip():
                return True
        return False

    def message_ids(self) -> dict[str, int]:
        """Message-ID -> UID of every message in the selected mailbox."""
        out: dict[str, int] = {}
        for line in self.lines(b"UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"):
            uid, mid = _UID.search(line), _MESSAGE_ID.search(line)
            if uid is not None and mid is not None:
                out[mid.group(1).decode()] = int(uid.group(1))
        return out


# --------------------------------------------------------------------------
# The changes and the poller that sees them on the server


@dataclass
class Change:
    kind: str  # "flags" | "deletion" | "move"
    uid: int
    message_id: str
    path: Path
    """The INBOX file the change starts from."""
    letters: str = ""
    """flags: the new ``:2,`` letters."""
    t0: float | None = None
    seen: float | None = None

    def apply(self, root: Path) -> None:
        key, _, _ = self.path.name.partition(":")
        self.t0 = time.monotonic()
        if self.kind == "flags":
            os.rename(self.path, root / "INBOX" / "cur" / f"{key}:2,{self.letters}")
        elif self.kind == "deletion":
            os.unlink(self.path)
        else:
            name = self.path.name if ":2," in self.path.name else self.path.name + ":2,"
            os.rename(self.path, root / "Archive" / "cur" / name)


class Poller(threading.Thread):
    """Polls the server for the changes made so far, stamping each when it shows."""

    def __init__(self, account: ImapAccount, interval: float) -> None:
        super().__init__(name="poller", daemon=True)
        self.interval = interval
        self.inbox = RawImap(account.host, account.port)
        self.inbox.login(account.user, account.password)
        self.inbox.command(b'EXAMINE "INBOX"')
        self.archive = RawImap(account.host, account.port)
        self.archive.login(account.user, account.password)
        self.archive.command(b'EXAMINE "Archive"')
        self.lock = threading.Lock()
        self.pending: list[Change] = []
        self.polls = 0
        self.error: str | None = None
        self._stopping = threading.Event()
        self._woken = threading.Event()

    def add(self, change: Change) -> None:
        with self.lock:
            self.pending.append(change)
        self._woken.set()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                with self.lock:
                    pending = list(self.pending)
                if not pending:
                    self._woken.wait(0.1)
                    self._woken.clear()
                    continue
                self._poll(pending)
                self.polls += 1
                time.sleep(self.interval)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            self.error = f"{type(e).__name__}: {e}"

    def _poll(self, pending: list[Change]) -> None:
        flags = self.inbox.flags(sorted({c.uid for c in pending}))
        now = time.monotonic()
        done = []
        for c in pending:
            current = flags.get(c.uid)
            if c.kind == "flags":
                shown = current == frozenset(FLAG_NAMES[letter] for letter in c.letters)
            elif c.kind == "deletion":
                shown = current is None or "\\Deleted" in current
            else:
                shown = (current is None or "\\Deleted" in current) and self.archive.has_message_id(c.message_id)
                now = time.monotonic() if shown else now
            if shown:
                c.seen = now
                done.append(c)
        if done:
            with self.lock:
                self.pending = [c for c in self.pending if c not in done]

    def idle(self) -> bool:
        with self.lock:
            return not self.pending

    def stop(self) -> None:
        self._stopping.set()
        self._woken.set()
        self.join(10)
        self.inbox.close()
        self.archive.close()


# --------------------------------------------------------------------------
# mirrord as a separate process


class Mirrord(_benchlib.MirrordProcess):
    """``mirrord run`` as a subprocess, its INFO log stamped with time.monotonic() (optionally profiled)."""

    _WRAPPER = (
        "import logging, sys, time\n"
        "logging.Formatter.formatTime = lambda self, record, datefmt=None: '%.6f' % time.monotonic()\n"
        "from mirrord.cli import main\n"
        "if PROFILE:\n"
        "    import cProfile\n"
        "    prof = cProfile.Profile()\n"
        "    prof.enable()\n"
        "    try:\n"
        "        status = main(sys.argv[1:])\n"
        "    finally:\n"
        "        prof.disable()\n"
        "        prof.dump_stats(PROFILE)\n"
        "    sys.exit(status)\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )

    def __init__(self, config: Path, log_path: Path, profile: Path | None = None) -> None:
        super().__init__(config, log_path)
        self.profile = profile

    def command(self) -> list[str]:
        wrapper = f"PROFILE = {str(self.profile) if self.profile else None!r}\n" + self._WRAPPER
        return [sys.executable, "-c", wrapper, "-c", str(self.config), "run"]


# --------------------------------------------------------------------------
# One folder size


@dataclass
class Outcome:
    messages: int
    changes: list[Change] = field(default_factory=list)
    first_sync_s: float = 0.0
    rss_after_first_sync_mb: float | None = None
    peak_rss_mb: float | None = None
    rounds: list[tuple[float, str]] = field(default_factory=list)
    polls: int = 0
    notes: list[str] = field(default_factory=list)

    def latencies(self, kind: str | None = None) -> list[float]:
        return [(c.seen - c.t0) * 1000 for c in self.changes
                if c.seen is not None and c.t0 is not None and kind in (None, c.kind)]

    def round_latencies(self, kind: str | None = None) -> list[float]:
        """t0 -> the end of the first round logged after t0 that sent a change of that kind."""
        rounds = sorted(self.rounds)
        out = []
        for c in self.changes:
            if c.t0 is None or kind not in (None, c.kind):
                continue
            words = _ROUND_WORDS[c.kind]
            after = next((t for t, what in rounds if t > c.t0 and any(w in what for w in words)), None)
            if after is not None:
                out.append((after - c.t0) * 1000)
        return out

    def tally(self) -> dict[str, int]:
        """What mirrord's "sent local changes" lines add up to, by kind."""
        out: dict[str, int] = {}
        for _, what in self.rounds:
            for part in what.split(", "):
                count, _, kind = part.partition(" ")
                if count.isdigit():
                    out[kind] = out.get(kind, 0) + int(count)
        return out

    @property
    def unseen(self) -> int:
        return sum(1 for c in self.changes if c.seen is None)

    @property
    def passed(self) -> bool:
        all_ms = self.latencies()
        return bool(all_ms) and not self.unseen and percentile(all_ms, 50) <= TARGET_MEDIAN_MS




def _write_config(directory: Path, account: ImapAccount) -> Path:
    return _benchlib.write_config(
        directory, account.user, account.password, account.port,
        "    mailboxes: [INBOX, Archive]\n    sync: two-way\n    local_delete: expunge\n",
    )






def _plan(account: ImapAccount, inbox: Path, args: argparse.Namespace, rng: random.Random) -> list[Change]:
    """Pick distinct INBOX messages for each change, tying each local file to its server UID."""
    reader = RawImap(account.host, account.port)
    reader.login(account.user, account.password)
    reader.command(b'EXAMINE "INBOX"')
    uid_of = reader.message_ids()
    reader.close()
    wanted = args.flags + args.deletions + args.moves
    files = _local_files(inbox)
    rng.shuffle(files)
    changes: list[Change] = []
    kinds = ["flags"] * args.flags + ["deletion"] * args.deletions + ["move"] * args.moves
    rng.shuffle(kinds)
    for path in files:
        if len(changes) == wanted:
            break
        with open(path, "rb") as f:
            match = _MESSAGE_ID.search(f.read(8192))
        if match is None or match.group(1).decode() not in uid_of:
            continue
        mid = match.group(1).decode()
        kind = kinds[len(changes)]
        letters = rng.choice(LETTER_SETS) if kind == "flags" else ""
        changes.append(Change(kind, uid_of[mid], mid, path, letters))
    if len(changes) < wanted:
        raise RuntimeError(f"only {len(changes)} of the {wanted} messages needed could be matched to a UID")
    return changes


def run_size(server: PrivateDovecot, messages: int, args: argparse.Namespace, root: Path) -> Outcome:
    out = Outcome(messages)
    work = root / f"size-{messages}"
    work.mkdir()
    account = server.new_account(f"push-{messages}")
    rng = random.Random(args.seed)
    profile = Path(args.profile).resolve() / f"mirrord-{messages}.prof" if args.profile else None
    daemon = Mirrord(_write_config(work, account), work / "mirrord.log", profile)
    poller: Poller | None = None
    mail = work / "Mail"
    try:
        print(f"  {messages}: filling INBOX ...", flush=True)
        account.fill("INBOX", (make_message(i, size=MESSAGE_SIZE) for i in range(1, messages + 1)))
        account.fill("Archive", (make_message(ARCHIVE_BASE + i, size=MESSAGE_SIZE) for i in range(ARCHIVE_PREFILL)))
        opener = RawImap(account.host, account.port)  # Dovecot moves new/ to cur/ on a read-write SELECT
        opener.login(account.user, account.password)
        opener.command(b'SELECT "INBOX"')
        opener.command(b'SELECT "Archive"')
        opener.close()

        out.first_sync_s = daemon.start(timeout=args.first_sync_timeout)
        if not _wait(lambda: len(_local_files(mail / "INBOX")) >= messages, 120):
            out.notes.append(f"after the first sync only {len(_local_files(mail / 'INBOX'))} of {messages} files")
        time.sleep(1.0)  # let the first sync's own renames and the watcher's first look settle
        out.rss_after_first_sync_mb = daemon.rss_mb()
        out.changes = _plan(account, mail / "INBOX", args, rng)

        poller = Poller(account, args.poll_interval)
        poller.start()
        total = len(out.changes)
        print(f"  {messages}: {args.flags} flag changes, {args.deletions} deletions, {args.moves} moves, "
              f"bursts of {args.burst} ...", flush=True)
        for start in range(0, total, args.burst):
            if not daemon.alive():
                raise RuntimeError(f"mirrord died:\n{daemon.log_tail()}")
            burst = out.changes[start : start + args.burst]
            for change in burst:
                change.apply(mail)
                poller.add(change)
            if not _wait(poller.idle, args.change_timeout, 0.01):
                out.notes.append(f"changes {start}..{start + len(burst) - 1} not seen on the server within "
                                 f"{args.change_timeout:g} s; going on")
                with poller.lock:
                    poller.pending.clear()
            if poller.error:
                raise RuntimeError(f"the poller failed: {poller.error}")
            done = start + len(burst)
            if args.progress and done // args.progress != start // args.progress:
                print(f"    {done}/{total}", flush=True)
            time.sleep(rng.uniform(args.gap_min, args.gap_max))

        time.sleep(1.0)
        out.polls = poller.polls
        out.peak_rss_mb = daemon.rss_mb()
        if not daemon.alive():
            out.notes.append(f"mirrord exited early:\n{daemon.log_tail()}")
        status = daemon.stop()
        if status not in (0, None):
            out.notes.append(f"mirrord exited with status {status}")
        log = daemon.log()
        out.rounds = [(float(m.group(1)), m.group(2)) for m in _SENT.finditer(log)]
        for line in log.splitlines():
            if " ERROR " in line or " WARNING " in line:
                out.notes.append(f"mirrord: {line}")
    finally:
        if poller is not None:
            _quietly(poller.stop)
        _quietly(daemon.stop)
        _quietly(account.close)
    return out




# --------------------------------------------------------------------------
# Reporting


def _row(label: str, values: Sequence[float]) -> str:
    if not values:
        return f"  {label:<34}{'(no data)':>10}"
    cells = [percentile(values, 50), percentile(values, 90), percentile(values, 99), max(values)]
    return f"  {label:<34}" + "".join(f"{c:>9.0f}" for c in cells)


def report(out: Outcome, args: argparse.Namespace) -> None:
    print()
    print(f"== {out.messages} messages in INBOX: {len(out.changes)} local changes, bursts of {args.burst}, "
          f"gaps {args.gap_min:g}-{args.gap_max:g} s, poll every {args.poll_interval * 1000:g} ms "
          f"({out.polls} polls)")
    print(f"   first sync {out.first_sync_s:.1f} s; mirrord rounds that sent something: {len(out.rounds)}")
    tally = out.tally()
    print("   mirrord's rounds reported: " + (", ".join(f"{n} {what}" for what, n in sorted(tally.items())) or "nothing"))
    moves = sum(1 for c in out.changes if c.kind == "move")
    if tally.get("moves", 0) < moves:
        print(f"   NOTE: {moves} local moves but {tally.get('moves', 0)} UID MOVEs: the rest went as a deletion "
              "plus an upload (likely: the two halves of the rename seen in different rounds)")
    print(f"  {'local change -> server shows (ms)':<34}{'median':>9}{'p90':>9}{'p99':>9}{'max':>9}")
    for kind, label in (("flags", "flag changes"), ("deletion", "deletions"), ("move", "moves"), (None, "all")):
        values = out.latencies(kind)
        print(_row(f"{label} (n={len(values)})", values))
    print(_row("round logged, all", out.round_latencies()))
    all_ms = out.latencies()
    if all_ms:
        med = percentile(all_ms, 50)
        print(f"  target: median <= {TARGET_MEDIAN_MS:g} ms: {'PASS' if med <= TARGET_MEDIAN_MS else 'FAIL'} "
              f"({med:.0f}); min {min(all_ms):.0f}")
    if out.unseen:
        print(f"  NOT SEEN on the server: {out.unseen} changes")

    def mb(v: float | None) -> str:
        return f"{v:.1f} MB" if v is not None else "unknown"

    print(f"  mirrord peak RSS (VmHWM): after first sync {mb(out.rss_after_first_sync_mb)}, "
          f"at the end {mb(out.peak_rss_mb)}")
    for note in out.notes:
        print(f"  note: {note}")
    if args.per_change:
        print(f"    {'#':>4} {'kind':<9} {'uid':>6} {'letters':<7} {'ms':>8}")
        for i, c in enumerate(out.changes):
            ms = f"{(c.seen - c.t0) * 1000:.0f}" if c.seen is not None and c.t0 is not None else "-"
            print(f"    {i:4d} {c.kind:<9} {c.uid:6d} {c.letters:<7} {ms:>8}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, action="append",
                        help="messages in INBOX (repeatable; default 200 and 10000)")
    parser.add_argument("--flags", type=int, default=100, help="local flag changes (default 100)")
    parser.add_argument("--deletions", type=int, default=20, help="local deletions (default 20)")
    parser.add_argument("--moves", type=int, default=20, help="local moves INBOX -> Archive (default 20)")
    parser.add_argument("--burst", type=int, default=1, help="changes made back to back (default 1)")
    parser.add_argument("--gap-min", type=float, default=0.3, help="shortest gap between bursts, s")
    parser.add_argument("--gap-max", type=float, default=0.6, help="longest gap between bursts, s")
    parser.add_argument("--poll-interval", type=float, default=0.005, help="pause between server polls, s")
    parser.add_argument("--change-timeout", type=float, default=30.0, help="give up on a burst after this, s")
    parser.add_argument("--seed", type=int, default=1, help="seed of the choices and gaps")
    parser.add_argument("--first-sync-timeout", type=float, default=900.0)
    parser.add_argument("--progress", type=int, default=35, help="print progress every N changes (0: never)")
    parser.add_argument("--profile", metavar="DIR", help="run mirrord under cProfile; stats in DIR")
    parser.add_argument("--per-change", action="store_true", help="print every change's latency")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, Maildirs)")
    args = parser.parse_args()
    sizes = args.messages or [200, 10_000]
    wanted = args.flags + args.deletions + args.moves
    if wanted < 1 or args.burst < 1 or not 0 <= args.gap_min <= args.gap_max:
        parser.error("need at least one change, --burst >= 1 and 0 <= --gap-min <= --gap-max")
    if any(n < wanted for n in sizes):
        parser.error(f"every --messages must be at least the number of changes ({wanted})")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)

    print("command: " + shlex.join([sys.executable, *sys.argv]), flush=True)
    root = Path(tempfile.mkdtemp(prefix="mirrord-push-"))
    server = PrivateDovecot(root / "server")
    outcomes: list[Outcome] = []
    try:
        server.start()
        for n in sizes:
            outcome = run_size(server, n, args, root)
            outcomes.append(outcome)
            report(outcome, args)
    finally:
        server.stop()
        if args.keep:
            print(f"\nkept {root} (mirrord logs: {root}/size-N/mirrord.log)")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print("summary (local change -> server shows, all kinds, ms):")
    for o in outcomes:
        values = o.latencies()
        if values:
            print(f"  {o.messages:>6} messages: median {percentile(values, 50):6.0f}  p90 {percentile(values, 90):6.0f}"
                  f"  p99 {percentile(values, 99):6.0f}  max {max(values):6.0f}  "
                  f"{'PASS' if o.passed else 'FAIL'}")
        else:
            print(f"  {o.messages:>6} messages: no data  FAIL")
    return 0 if outcomes and all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
