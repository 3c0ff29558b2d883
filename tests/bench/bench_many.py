"""Many mailboxes under a connection cap (issue 13): connections, push and poll latency, quiet cost.

Usage: python tests/bench/bench_many.py [--mailboxes 200] [--messages 50] [--max-connections 10]
                                        [--samples 6] [--quiet 300] [--poll-interval 1m]

Builds a private Dovecot with --mailboxes mailboxes of --messages realistic
messages each (written with doveadm, not APPEND), starts ``mirrord run`` as
users do (a child process; the wakeup probe of bench_idle.py loaded through
PYTHONPATH) with ``max_connections: --max-connections`` and the default
workers, and prints, next to the issue's targets:

- the first sync's duration;
- connections mirrord holds to the server after the first sync (its
  ESTABLISHED TCP sockets to the server's port, from /proc): target <= the cap;
- latency from APPEND (its tagged OK) to the file in the Maildir, for a
  watched mailbox (INBOX) and for one outside the watched set (polled):
  target for the polled one, without NOTIFY: within poll_interval + 1 s;
- a quiet daemon over --quiet seconds: CPU seconds and wakeups per minute
  (the issue's reference: 0.02 CPU s and 8 wakeups/min with 20 mailboxes).

Dovecot's own cap is set to the configured one plus two, for the bench's
own client; mirrord does not know that and stays within its configured cap.

Dovecot offers NOTIFY (RFC 5465), so by default the mailboxes outside the
watched set are covered by NOTIFY (plus the poll as a safety net), and the
bench also times a folder created, renamed and deleted on the server until
the Maildir shows it. ``--hide-notify`` hides NOTIFY from the server: then
the polled mailbox's latency is the poll's.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_idle import PROBE_DIR, cause_of, cpu_seconds, status_fields

from mirrord.testing import PrivateDovecot, make_message


def parse_duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def established_to(pid: int, port: int) -> int:
    """TCP connections of process ``pid`` to ``port`` that are ESTABLISHED (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def write_config(root: Path, account: Any, args: argparse.Namespace) -> Path:
    password = root / "password"
    password.write_text(account.password + "\n")
    password.chmod(0o600)
    lines = [
        f"state_dir: {root / 'state'}",
        "accounts:",
        "  bench:",
        f"    host: {account.host}",
        f"    port: {account.imaps_port}",
        "    tls: implicit",
        f"    ca_file: {account.ca_file}",
        f"    username: {account.user}",
        f"    password_file: {password}",
        f"    maildir: {root / 'Mail'}",
        f"    max_connections: {args.max_connections}",
    ]
    if args.poll_interval:
        lines.append(f"    poll_interval: {args.poll_interval}")
    config = root / "config.yaml"
    config.write_text("\n".join(lines) + "\n")
    config.chmod(0o600)
    return config


def files_in(maildir: Path) -> set[str]:
    found: set[str] = set()
    for sub in ("new", "cur"):
        try:
            found.update(os.listdir(maildir / sub))
        except FileNotFoundError:
            pass
    return found


def wait_for_log(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if process.poll() is not None:
            raise SystemExit(f"mirrord exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{text!r} not logged within {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def latency(account: Any, root: Path, mailboxes: list[str], samples: int, serial: int, rng: random.Random,
            gap: tuple[float, float], timeout: float) -> list[float]:
    """APPEND ``samples`` times, to each of ``mailboxes`` in turn; seconds from the APPEND's OK to the file.

    One mailbox per sample where the point is a mailbox without a watcher:
    the daemon gives a watcher to a mailbox where mail just arrived.
    """
    found: list[float] = []
    for i in range(samples):
        mailbox = mailboxes[i % len(mailboxes)]
        maildir = root / "Mail" / mailbox
        time.sleep(rng.uniform(*gap))
        before = files_in(maildir)
        account.client.append(mailbox, make_message(serial + i), ())
        appended = time.monotonic()
        while time.monotonic() - appended < timeout:
            if files_in(maildir) - before:
                found.append(time.monotonic() - appended)
                break
            time.sleep(0.005)
        else:
            found.append(float("inf"))
        print(f"  {mailbox}: {found[-1]:.3f} s", flush=True)
    return found


def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    poll = parse_duration(args.poll_interval) if args.poll_interval else 60.0
    with tempfile.TemporaryDirectory(prefix="mirrord-many-") as tmp:
        root = Path(tmp)
        server = PrivateDovecot(root / "server", max_connections=args.max_connections + 2,
                                hide_capabilities=("NOTIFY",) if args.hide_notify else ())
        server.start()
        process: subprocess.Popen[bytes] | None = None
        try:
            account = server.new_account("many")
            names = ["INBOX"] + [f"Lists/{i:03d}" for i in range(1, args.mailboxes)]
            filled = time.monotonic()
            serial = 0
            for name in names:
                if name != "INBOX":
                    account.client.create(name)
                account.fill(name, [make_message(serial + k) for k in range(args.messages)])
                serial += args.messages
            print(f"filled {len(names)} x {args.messages} messages in {time.monotonic() - filled:.0f} s", flush=True)
            config = write_config(root, account, args)
            runtime = root / "runtime"
            runtime.mkdir(mode=0o700)
            probe_out = root / "probe.json"
            env = {
                **os.environ,
                "XDG_RUNTIME_DIR": str(runtime),
                "PYTHONPATH": os.pathsep.join([str(PROBE_DIR), os.environ.get("PYTHONPATH", "")]),
                "MIRRORD_IDLE_PROBE": str(probe_out),
            }
            env.pop("NOTIFY_SOCKET", None)
            log = root / "mirrord.log"
            with open(log, "wb") as log_file:
                started = time.monotonic()
                process = subprocess.Popen([sys.executable, "-m", "mirrord", "-c", str(config), "run"],
                                           stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env)
            wait_for_log(log, "first sync done", process, args.first_sync_timeout)
            first_sync = time.monotonic() - started
            time.sleep(args.settle)
            pid = process.pid
            connections = established_to(pid, account.imaps_port)
            text = log.read_text(errors="replace")
            summary = next((line for line in text.splitlines() if "mailboxes to mirror" in line), "")
            print(summary.split("INFO", 1)[-1].strip(), flush=True)

            print("latency, watched mailbox (INBOX):", flush=True)
            watched = latency(account, root, ["INBOX"], args.samples, serial, rng, (0.6, 1.2), 30)
            serial += args.samples
            unwatched = names[::-1][: args.samples]  # they rank last: outside the watched set
            print(f"latency, unwatched mailboxes ({unwatched[0]}...), poll_interval {poll:g} s:", flush=True)
            gap = (0.0, poll) if args.hide_notify else (0.6, 1.2)
            polled = latency(account, root, unwatched, args.samples, serial, rng, gap, poll + 30)
            serial += args.samples
            connections_after = established_to(pid, account.imaps_port)
            folders: dict[str, float] = {}
            if not args.hide_notify:
                mail = root / "Mail"

                def timed(what: str, change: Any, done: Any) -> None:
                    started = time.monotonic()
                    change()
                    while not done() and time.monotonic() - started < 60:
                        time.sleep(0.005)
                    folders[what] = time.monotonic() - started if done() else float("inf")
                    print(f"  folder {what}: {folders[what]:.3f} s", flush=True)

                time.sleep(1.0)
                timed("created", lambda: account.client.create("Fresh"), lambda: (mail / "Fresh" / "cur").exists())
                time.sleep(1.0)
                timed("renamed", lambda: account.client.rename("Fresh", "Renamed"),
                      lambda: (mail / "Renamed" / "cur").exists() and not (mail / "Fresh" / "cur").exists())
                time.sleep(1.0)
                timed("deleted", lambda: account.client.delete("Renamed"), lambda: not (mail / "Renamed" / "cur").exists())

            account.client.close()
            time.sleep(args.settle)
            print(f"quiet for {args.quiet:g} s...", flush=True)
            os.kill(pid, signal.SIGUSR1)
            time.sleep(0.2)
            cpu0, st0, t0 = cpu_seconds(pid), status_fields(pid), time.monotonic()
            time.sleep(args.quiet)
            cpu1, st1, t1 = cpu_seconds(pid), status_fields(pid), time.monotonic()
            os.kill(pid, signal.SIGUSR2)
            for _ in range(100):
                if probe_out.exists():
                    break
                time.sleep(0.05)
            import json

            wakeups = json.loads(probe_out.read_text())["wakeups"]
            minutes = (t1 - t0) / 60
            ours = sum(1 for w in wakeups if not all(c.startswith("server keepalive") for c in cause_of(w)))
            log_text = log.read_text(errors="replace")
            process.send_signal(signal.SIGTERM)
            process.wait(60)

            def med(values: list[float]) -> str:
                return f"{statistics.median(values):.3f} s (max {max(values):.3f})"

            rows = [
                ("mailboxes x messages", f"{len(names)} x {args.messages}", ""),
                ("first sync (start to 'first sync done')", f"{first_sync:.1f} s", ""),
                ("connections open after the first sync", f"{connections} (later {connections_after})",
                 f"<= {args.max_connections}"),
                ("push latency, watched INBOX, median", med(watched), "Dovecot's 0.5 s IDLE floor + a little"),
                (f"latency outside the watched set, median ({'poll' if args.hide_notify else 'NOTIFY'})", med(polled),
                 f"<= poll_interval + 1 s = {poll + 1:g} s" if args.hide_notify else "IDLE floor (0.5 s) + 50 ms"),
                ("folder created / renamed / deleted seen",
                 " / ".join(f"{folders[k]:.2f}" for k in ("created", "renamed", "deleted")) + " s" if folders
                 else "n/a (no NOTIFY)", "<= 1 s with NOTIFY"),
                ("quiet: seconds measured", f"{t1 - t0:.0f}", ""),
                ("quiet: CPU seconds", f"{cpu1 - cpu0:.3f}", "~0.02 (today, 20 mailboxes)"),
                ("quiet: wakeups / min", f"{len(wakeups) / minutes:.2f}", "~8 (today, 20 mailboxes)"),
                ("  of them not server keepalives, / min", f"{ours / minutes:.2f}", ""),
                ("quiet: voluntary context switches", f"{st1['voluntary_ctxt_switches'] - st0['voluntary_ctxt_switches']}",
                 ""),
                ("RSS MB now / peak", f"{st1['VmRSS'] / 1024:.1f} / {st1['VmHWM'] / 1024:.1f}", ""),
            ]
            width = max(len(r[0]) for r in rows)
            mode = "NOTIFY hidden" if args.hide_notify else "NOTIFY offered"
            print(f"\nmirrord run, {len(names)} mailboxes, max_connections {args.max_connections}, {mode}")
            print(f"  {'':{width}}  {'measured':>28}  target")
            for name, value, target in rows:
                print(f"  {name.ljust(width)}  {value:>28}  {target}")
            print(f"  watched set changes logged: {log_text.count('watched set changed')}")
            for line in log_text.splitlines():
                if "refused" in line or "ERROR" in line:
                    print("  log:", line)
        finally:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mailboxes", type=int, default=200)
    parser.add_argument("--messages", type=int, default=50, help="messages per mailbox")
    parser.add_argument("--max-connections", type=int, default=10)
    parser.add_argument("--poll-interval", default=None, help="poll_interval for the config (default: mirrord's)")
    parser.add_argument("--samples", type=int, default=6, help="APPENDs measured per mailbox")
    parser.add_argument("--quiet", type=float, default=300.0, help="quiet seconds measured (default 300)")
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--first-sync-timeout", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hide-notify", action="store_true", help="hide NOTIFY: unwatched mailboxes are polled")
    run(parser.parse_args())
    return 0


if __name__ == "__main__":
    sys.exit(main())
