"""Lag of ``mirrord run`` behind a stock Courier-IMAP, whose IDLE polls once a minute.

Usage (as root, with Courier unpacked as mirrord/testing/courier.py says):

    python3 tests/bench/bench_courier_idle.py [--messages 20] [--gap-max 60]
        [--seed 1] [--tree PATH] [--enhanced]

Starts a private Courier (plain IDLE; ``--enhanced``: IMAP_ENHANCEDIDLE=1)
and ``mirrord run`` from ``--tree`` (default: this checkout; give another
worktree to measure another version, e.g. the one before the fix), watching
INBOX. Then APPENDs ``--messages`` messages one at a time from another
connection, each after a random pause (uniform 0..``--gap-max`` s, seeded,
so two runs get the same pauses), and times each from the APPEND's tagged
OK to its file in the Maildir (polled every 10 ms). Prints every delay,
then the median and maximum, and how mirrord's log and status described
the watcher.
"""

from __future__ import annotations

import argparse
import imaplib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mirrord.testing.courier import PrivateCourier


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--gap-max", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tree", type=Path, default=REPO)
    parser.add_argument("--enhanced", action="store_true")
    args = parser.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]), flush=True)
    why = PrivateCourier.available()
    if why:
        print(why)
        return 2
    root = Path(tempfile.mkdtemp(prefix="mirrord-courier-"))
    os.chmod(root, 0o755)
    rng = random.Random(args.seed)
    try:
        return _run(args, root, rng)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(args: argparse.Namespace, root: Path, rng: random.Random) -> int:
    with PrivateCourier(root / "courier", enhanced_idle=args.enhanced) as courier:
        work = root / "mirror"
        work.mkdir()
        password = work / "password"
        password.write_text(courier.password + "\n")
        password.chmod(0o600)
        config = work / "config.yaml"
        config.write_text(
            f"state_dir: {work / 'state'}\naccounts:\n  courier:\n    host: 127.0.0.1\n"
            f"    port: {courier.port}\n    tls: none\n    username: {courier.user}\n"
            f"    password_file: {password}\n    maildir: {work / 'Mail'}\n    watch: [INBOX]\n"
            "    workers: 1\n    max_connections: 4\n"
        )
        config.chmod(0o600)
        # Courier gives an empty mailbox a new UIDVALIDITY at its first message: start with one.
        first = imaplib.IMAP4(courier.host, courier.port)
        first.login(courier.user, courier.password)
        first.append("INBOX", None, None, b"Message-ID: <seed@bench>\r\nSubject: seed\r\n\r\nseed\r\n")
        first.logout()
        log_path = work / "mirrord.log"
        env = {**os.environ, "PYTHONPATH": str(args.tree)}
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "mirrord", "-c", str(config), "run"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(args.tree),
            )
        try:
            deadline = time.monotonic() + 60
            while b"first sync done" not in log_path.read_bytes():
                if time.monotonic() > deadline or daemon.poll() is not None:
                    print(log_path.read_text())
                    return 1
                time.sleep(0.05)
            time.sleep(1.0)  # the watcher's IDLE is up
            imap = imaplib.IMAP4(courier.host, courier.port)
            imap.login(courier.user, courier.password)
            new = work / "Mail" / "INBOX" / "new"
            cur = work / "Mail" / "INBOX" / "cur"
            delays: list[float] = []
            for i in range(args.messages):
                time.sleep(rng.uniform(0, args.gap_max))
                marker = f"bench-{args.seed}-{i}"
                message = (f"Message-ID: <{marker}@bench>\r\nSubject: {marker}\r\n\r\nbody {i}\r\n").encode()
                imap.append("INBOX", None, None, message)
                t0 = time.monotonic()
                while True:
                    if _has(new, marker) or _has(cur, marker):
                        break
                    if time.monotonic() - t0 > 180:
                        print(f"message {i} never arrived")
                        return 1
                    time.sleep(0.01)
                delay = time.monotonic() - t0
                delays.append(delay)
                print(f"message {i + 1:2d}: {delay:6.2f} s", flush=True)
            imap.logout()
            status = subprocess.run(
                [sys.executable, "-m", "mirrord", "-c", str(config), "status"],
                capture_output=True, text=True, env=env, cwd=str(args.tree), check=False,
            ).stdout
        finally:
            daemon.terminate()
            daemon.wait(20)
        print(f"median {statistics.median(delays):.2f} s, max {max(delays):.2f} s, min {min(delays):.2f} s"
              f" over {len(delays)} APPENDs")
        said = [line for line in log_path.read_text().splitlines() if "does not push" in line]
        print("log:", said or "(nothing about IDLE)")
        print("status:\n" + status)
    return 0


_seen: dict[Path, set[str]] = {}


def _has(directory: Path, marker: str) -> bool:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return False
    known = _seen.setdefault(directory, set())
    for name in names:
        if name in known:
            continue
        try:
            head = (directory / name).read_bytes()[:200]
        except FileNotFoundError:
            continue
        known.add(name)
        if marker.encode() in head:
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
