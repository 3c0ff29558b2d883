"""Peak memory of ``mirrord run --once`` while it mirrors very large messages.

Usage: python3 tests/bench/bench_memory.py [--size-mb 100] [--small 200]

Builds a private Dovecot with one mailbox holding a message of --size-mb MB
(plus --small ordinary messages), runs mirrord once as a child process, checks
that the result is byte-identical to the server's, and prints wall time,
throughput and the child's peak RSS (from wait4's rusage: the mirrord process
alone, not the server). The target (issue: streaming bodies) is under 100 MB
for the whole process; Twisted's stock client needed ~510 MB for one 100 MB
message.
"""

from __future__ import annotations

import argparse
import multiprocessing
import hashlib
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mirrord.testing import PrivateDovecot, make_message


def _fill(account: Any, size_mb: int, small: int) -> None:
    rng = random.Random(1)
    big = make_message(0, rng=rng, attachment_bytes=size_mb * 1024 * 1024)
    account.fill("INBOX", [big, *(make_message(i, rng=rng) for i in range(1, small + 1))])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--small", type=int, default=200)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mirrord-bench-") as tmp:
        root = Path(tmp)
        server = PrivateDovecot(root / "server")
        server.start()
        try:
            account = server.new_account("bench")
            # A forked child inherits its parent's peak-RSS mark, and exec keeps
            # it in the rusage: the big message must never pass through the
            # process that spawns mirrord, or its peak would be reported.
            filler = multiprocessing.get_context("fork").Process(
                target=_fill, args=(account, args.size_mb, args.small)
            )
            filler.start()
            filler.join()
            if filler.exitcode != 0:
                print("filling the mailbox failed", file=sys.stderr)
                return 1
            parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            config = root / "config.yaml"
            config.write_text(
                f"state_dir: {root / 'state'}\naccounts:\n  bench:\n    host: 127.0.0.1\n"
                f"    port: {account.port}\n    tls: none\n    username: {account.user}\n"
                f"    password: {account.password!r}\n    maildir: {root / 'Mail'}\n    workers: 4\n"
            )
            os.chmod(config, 0o600)

            started = time.monotonic()
            child = subprocess.Popen(
                [sys.executable, "-m", "mirrord", "-c", str(config), "run", "--once"],
                stdin=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _, status, usage = os.wait4(child.pid, 0)
            wall = time.monotonic() - started
            child.returncode = os.waitstatus_to_exitcode(status)
            if child.returncode != 0:
                print(f"mirrord failed with status {child.returncode}", file=sys.stderr)
                return 1

            expected = sorted(
                hashlib.sha256(body.replace(b"\r\n", b"\n")).hexdigest()
                for _, body in account.client.messages("INBOX").values()
            )
            inbox = root / "Mail" / "INBOX"
            local = sorted(
                hashlib.sha256(p.read_bytes()).hexdigest() for sub in ("new", "cur") for p in (inbox / sub).iterdir()
            )
            identical = local == expected
            total_mb = sum(p.stat().st_size for sub in ("new", "cur") for p in (inbox / sub).iterdir()) / 1e6
        finally:
            server.stop()

    print(f"messages            {args.small + 1} (one of {args.size_mb} MB)")
    print(f"byte-identical      {'yes' if identical else 'NO'}")
    print(f"wall time           {wall:.2f} s")
    print(f"throughput          {total_mb / wall:.1f} MB/s")
    print(f"peak RSS (mirrord)  {usage.ru_maxrss / 1024:.1f} MB   (target: < 100 MB; "
          f"the spawning process peaked at {parent_peak:.0f} MB)")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
