"""Peak memory of mirrord: with very large messages, or with very many.

Usage: python3 tests/bench/bench_memory.py [--size-mb 100] [--small 200]
       python3 tests/bench/bench_memory.py --mailbox 100000 [--pushes 5] [--catchup 100]

Default: builds a private Dovecot with one mailbox holding a message of
--size-mb MB (plus --small ordinary messages), runs mirrord once as a child
process, checks that the result is byte-identical to the server's, and prints
wall time, throughput and the child's peak RSS (from wait4's rusage: the
mirrord process alone, not the server). The target (issue: streaming bodies)
is under 100 MB for the whole process; Twisted's stock client needed ~510 MB
for one 100 MB message.

``--mailbox N`` (issue #15: under 64 MB at 10,000 messages): INBOX holds N
messages (2 KB each below 20,000, tiny ones from there on, as
bench_latency.py fills them); ``mirrord run`` (the daemon, default two-way)
makes its first sync, then --pushes messages are APPENDed one at a time
(each mirrored live), then every connection is kicked and --catchup messages
APPENDed while the watcher reconnects (its full sync catches up). Prints
mirrord's peak RSS (VmHWM) after each phase, beside the floor: a process
importing what ``mirrord run`` imports.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import random
import resource
import shutil
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


_FLOOR = (
    "import mirrord.cli, mirrord.daemon, mirrord.protocol.connect, mirrord.sync.mailbox\n"
    "from twisted.internet import reactor, ssl\n"
    "import OpenSSL, sqlite3\n"
    "print([l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1])\n"
)


def _vm(pid: int, name: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def mailbox_main(args: argparse.Namespace) -> int:
    """``--mailbox N``: the daemon's peak RSS through first sync, live pushes and a catch-up."""
    sys.path.insert(0, str(Path(__file__).parent))
    import _benchlib

    floor = float(subprocess.run([sys.executable, "-c", _FLOOR], capture_output=True, text=True,
                                 check=True).stdout) / 1024
    n = args.mailbox
    root = Path(tempfile.mkdtemp(prefix="mirrord-bench-"))
    # At 100,000 messages an imap process outgrows Dovecot's default 256 MB address space.
    server = PrivateDovecot(root / "server", extra_config="service imap {\n  vsz_limit = 1G\n}\n")
    server.start()
    daemon = None
    rows: list[tuple[str, float, float]] = []
    ok = True
    try:
        account = server.new_account("memory")
        if n >= 20_000:
            account.fill("INBOX", (b"X-Mirrord-Test-Index: %d\r\nSubject: prefill %d\r\n\r\nx\r\n" % (i, i)
                                   for i in range(1, n + 1)), flags=("\\Seen",))
        else:
            account.fill("INBOX", (make_message(i, size=2000) for i in range(1, n + 1)))
            opener = _benchlib.RawImap(account.host, account.port)
            opener.login(account.user, account.password)
            opener.command(b'SELECT "INBOX"')  # Dovecot moves them to cur/, as any mail client makes it
            opener.close()
        work = root / "work"
        work.mkdir()
        config = _benchlib.write_config(work, account.user, account.password, account.port,
                                        f"    workers: {args.workers}\n    mailboxes: [INBOX]\n")
        daemon = _benchlib.MirrordProcess(config, work / "mirrord.log")
        first = daemon.start(timeout=900)
        inbox = work / "Mail" / "INBOX"
        ok &= _benchlib.wait(lambda: len(_benchlib.local_files(inbox)) >= n, 120)
        assert daemon.process is not None
        pid = daemon.process.pid
        rows.append((f"first sync ({first:.1f} s)", _vm(pid, "VmHWM"), _vm(pid, "VmRSS")))
        appender = _benchlib.RawImap(account.host, account.port)
        appender.login(account.user, account.password)
        gap = 3.0 if n >= 50_000 else 1.0  # Dovecot rescans a huge folder for every session
        for k in range(args.pushes):
            appender.command(b'APPEND "INBOX"', make_message(1_000_000 + k, size=2000))
            time.sleep(gap)
        ok &= _benchlib.wait(lambda: len(_benchlib.local_files(inbox)) >= n + args.pushes, 120)
        rows.append((f"{args.pushes} messages pushed live", _vm(pid, "VmHWM"), _vm(pid, "VmRSS")))
        appender.close()
        if args.catchup:
            server.doveadm("kick", account.user, check=False)
            appender = _benchlib.RawImap(account.host, account.port)
            appender.login(account.user, account.password)
            for k in range(args.catchup):
                appender.command(b'APPEND "INBOX"', make_message(2_000_000 + k, size=2000))
            appender.close()
            total = n + args.pushes + args.catchup
            ok &= _benchlib.wait(lambda: len(_benchlib.local_files(inbox)) >= total, 300)
            time.sleep(2)
            rows.append((f"reconnect, {args.catchup} caught up", _vm(pid, "VmHWM"), _vm(pid, "VmRSS")))
        if not daemon.alive():
            print(daemon.log_tail(), file=sys.stderr)
            ok = False
    finally:
        if daemon is not None:
            daemon.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"messages in INBOX   {n} (+{args.pushes} pushed, +{args.catchup} caught up); workers {args.workers}")
    print(f"floor (imports)     {floor:.1f} MB")
    print(f"  {'after':<32}{'VmHWM':>10}{'VmRSS':>10}  (MB)")
    for label, hwm, rss in rows:
        print(f"  {label:<32}{hwm:>10.1f}{rss:>10.1f}")
    print(f"all mirrored        {'yes' if ok else 'NO'}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--mailbox", type=int, default=0, help="messages in INBOX: measure the daemon instead")
    parser.add_argument("--pushes", type=int, default=5, help="--mailbox: messages APPENDed live")
    parser.add_argument("--catchup", type=int, default=100, help="--mailbox: messages APPENDed during a reconnect")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    if args.mailbox:
        return mailbox_main(args)

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
