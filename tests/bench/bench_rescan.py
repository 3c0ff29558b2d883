"""What a second Dovecot session pays to see a message another session was told of, by how it asks.

Usage (from the repository root, Dovecot installed):

    python3 tests/bench/bench_rescan.py [--messages 10000] [--trials 15] [--gap 0.7]

mirrord's push path is two sessions: a watcher in IDLE hears ``* N EXISTS``
and a worker fetches the message. On Dovecot's maildir backend the worker's
session has to catch up with the folder before it can answer (it rescans the
Maildir), and that cost grows with the folder. This measures it on its own,
with raw sockets and no mirrord, so that the push benchmark's figures
(bench_latency.py) can be read: which part is the server's and which part a
way of asking could save.

One private Dovecot, one INBOX of ``--messages`` tiny messages (in cur/),
an IDLE session, a fetching session that has INBOX selected, and a third
session that APPENDs one message every ``--gap`` s. The moment the IDLE
session reads the EXISTS, the fetching session asks, in turn, in one of
these ways (each trial one way, round robin, so they share the machine's
conditions):

* ``examine``: ``EXAMINE INBOX`` and ``UID FETCH uid:* (UID BODY.PEEK[])``
  pipelined, one round trip: mirrord's way (``Worker.examine_then``);
* ``retry``: ``UID FETCH`` on the standing selection, sent again when it
  did not bring the message: the two-session floor's way in bench_latency;
* ``noop``: ``NOOP`` and ``UID FETCH`` pipelined, then again if needed;
* ``double``: two ``UID FETCH`` pipelined: whether the server brings its view
  up to date between pipelined commands (Dovecot 2.3 does not, so the second
  answers from the same old view, and this way misses the message).

Prints, per way, how many trials brought the message in one write, and the
median, p90 and minimum (ms) from the EXISTS to the message's body. Loopback
only; nothing beyond mirrord's test dependencies.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _benchlib  # the benchmarks' shared helpers, a sibling module

from mirrord.testing import PrivateDovecot

_EXISTS = re.compile(rb"^\* (\d+) EXISTS")
_FETCH_UID = re.compile(rb"^\* \d+ FETCH \(.*UID (\d+)", re.DOTALL)
_APPENDUID = re.compile(rb"APPENDUID (\d+) (\d+)")
WAYS = ("examine", "retry", "noop", "double")


def _fetch(uid: int) -> bytes:
    return b"UID FETCH %d:* (UID BODY.PEEK[])" % uid


class Session(_benchlib.RawImap):
    def pipelined(self, commands: Sequence[bytes]) -> tuple[int | None, float]:
        """Send ``commands`` in one write; (highest UID whose body came, when it was read)."""
        tags = [b"r%d" % next(self._tags) for _ in commands]
        self.sock.sendall(b"".join(tag + b" " + c + b"\r\n" for tag, c in zip(tags, commands)))
        got: int | None = None
        when = 0.0
        for tag in tags:
            while not (line := self.readline()).startswith(tag + b" "):
                found = _FETCH_UID.match(line)
                if found and b"BODY[]" in line:
                    got, when = int(found.group(1)), time.monotonic()
        return got, when


def ask(session: Session, way: str, uid: int) -> tuple[float, bool]:
    """Fetch ``uid`` the given way; (time its body was read, whether one write brought it)."""
    first = {
        "examine": [b'EXAMINE "INBOX"', _fetch(uid)],
        "retry": [_fetch(uid)],
        "noop": [b"NOOP", _fetch(uid)],
        "double": [_fetch(uid), _fetch(uid)],
    }[way]
    got, when = session.pipelined(first)
    if got == uid:
        return when, True
    if way == "double":
        return float("nan"), False  # counted as missed: the point of this way
    got, when = session.pipelined([_fetch(uid)])
    if got != uid:
        raise RuntimeError(f"{way}: UID {uid} not fetched even on a second try")
    return when, False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=15, help="per way")
    parser.add_argument("--gap", type=float, default=0.7, help="seconds between APPENDs")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    print("command:", " ".join([sys.executable, *sys.argv]), flush=True)
    root = Path(tempfile.mkdtemp(prefix="mirrord-rescan-"))
    server = PrivateDovecot(root / "server", extra_config="service imap {\n  vsz_limit = 1G\n}\n")
    sessions: list[Session] = []
    try:
        server.start()
        account = server.new_account("rescan")
        account.fill("INBOX", (b"Subject: old %d\r\n\r\nx\r\n" % i for i in range(args.messages)), flags=("\\Seen",))

        def session() -> Session:
            s = Session(account.host, account.port)
            s.login(account.user, account.password)
            sessions.append(s)
            return s

        idle, fetcher, appender = session(), session(), session()
        fetcher.command(b'EXAMINE "INBOX"')
        idle.command(b'EXAMINE "INBOX"')
        idle.sock.sendall(b"idle IDLE\r\n")
        while not idle.readline().startswith(b"+"):
            pass
        times: dict[str, list[float]] = {way: [] for way in WAYS}
        at_once: dict[str, int] = dict.fromkeys(WAYS, 0)
        for trial in range(args.trials * len(WAYS)):
            way = WAYS[trial % len(WAYS)]
            time.sleep(args.gap)
            _, tagged, _ = appender.command(b'APPEND "INBOX"', b"Subject: new %d\r\n\r\nnew\r\n" % trial)
            found = _APPENDUID.search(tagged)
            if found is None:
                raise RuntimeError(f"no APPENDUID in {tagged!r}")
            uid = int(found.group(2))
            while not _EXISTS.match(idle.readline()):
                pass
            heard = time.monotonic()
            when, once = ask(fetcher, way, uid)
            at_once[way] += once
            if not math.isnan(when):
                times[way].append((when - heard) * 1000)
            if way == "double" and not once:
                fetcher.pipelined([_fetch(uid)])  # catch up, so the next trial starts alike
        print(f"\nINBOX of {args.messages} messages; EXISTS (IDLE session) -> body (fetching session), ms")
        print(f"  {'way':10s} {'one write':>10s} {'median':>8s} {'p90':>8s} {'min':>8s}")
        for way in WAYS:
            v = times[way]
            if not v:
                print(f"  {way:10s} {at_once[way]:>4d}/{args.trials:<5d}  (never in one write)")
                continue
            print(f"  {way:10s} {at_once[way]:>4d}/{args.trials:<5d} {_benchlib.percentile(v, 50):8.2f} "
                  f"{_benchlib.percentile(v, 90):8.2f} {min(v):8.2f}")
    finally:
        for s in sessions:
            s.close()
        server.stop()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(60)
    sys.exit(main())
