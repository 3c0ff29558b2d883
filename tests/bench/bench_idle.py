"""Idle cost of a running ``mirrord run`` watching many mailboxes: CPU, wakeups and their causes.

Usage: python tests/bench/bench_idle.py [--seconds 300] [--mailboxes 20] [--idle-renew 20m]

Builds a private Dovecot with --mailboxes mailboxes of a few messages each,
starts the daemon as users do (``python -m mirrord -c CONFIG run``, in the
foreground, as a child), waits until `mirrord status` shows every mailbox
idling, lets it settle, then measures for --seconds:

- CPU seconds (utime + stime of the whole process, /proc/PID/stat);
- voluntary context switches summed over its threads (/proc/PID/task/*/status):
  a sleeping daemon switches once per wakeup, so this cross-checks the probe;
- wakeups and their causes, from a probe loaded into the daemon through
  PYTHONPATH (tests/bench/_idle_probe/sitecustomize.py): every return from a
  blocking epoll_wait, with the timers that ran and the lines that arrived;
- RSS now and peak (VmRSS, VmHWM).

Wakeups the daemon cannot avoid are renewals of IDLE (one per mailbox per
idle_renew) and the server's own keepalives: Dovecot sends ``* OK Still
here`` every imap_idle_notify_interval (2 min by default) on every IDLE
connection. TCP keepalive probes are sent and answered by the kernel and
wake nobody. Everything else the table lists is ours to justify.

--strace additionally runs ``strace -f -tt -e trace=epoll_wait,epoll_pwait``
on the daemon for the same period and counts blocking waits that returned
(strace slows every system call: the CPU figures are then not comparable,
so the CPU row comes from the same run with strace attached and says so).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from mirrord.testing import PrivateDovecot, make_message

PROBE_DIR = Path(__file__).resolve().parent / "_idle_probe"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_KEEPALIVE = "OK Still here"


def cpu_seconds(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    rest = raw[raw.rfind(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def status_fields(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in kB, and context switches summed over every thread."""
    fields: dict[str, int] = {"voluntary_ctxt_switches": 0, "nonvoluntary_ctxt_switches": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                fields[key] += int(value)
    fields["threads"] = len(list(Path(f"/proc/{pid}/task").iterdir()))
    return fields


def write_config(root: Path, account: Any, mailboxes: int, idle_renew: str | None) -> Path:
    password = root / "password"
    password.write_text(account.password + "\n")
    password.chmod(0o600)
    workers = 2
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
        f"    workers: {workers}",
        f"    max_connections: {mailboxes + workers}",
    ]
    if idle_renew:
        lines.append(f"    idle_renew: {idle_renew}")
    config = root / "config.yaml"
    config.write_text("\n".join(lines) + "\n")
    config.chmod(0o600)
    return config


def wait_all_idling(config: Path, state_dir: Path, mailboxes: int, process: subprocess.Popen[bytes],
                    log: Path, timeout: float) -> float:
    """Seconds until the status file shows every mailbox idling."""
    from mirrord.status import find_status

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"mirrord exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        status = find_status(config, state_dir)
        if status is not None:
            states = [m.state for a in status.accounts for m in a.mailboxes]
            if len(states) == mailboxes and all(s == "idling" for s in states):
                return time.monotonic() - started
        time.sleep(0.2)
    raise SystemExit(f"not every mailbox idling within {timeout} s:\n{log.read_text()[-3000:]}")


def cause_of(wakeup: dict[str, Any]) -> list[str]:
    """What woke the daemon: the timers that ran, else what the server said."""
    if wakeup["timers"]:
        return ["timer: " + re.sub(r" \(after .*\)", "", t) for t in wakeup["timers"]]
    lines = [line.split(": ", 1)[-1] for line in wakeup["lines"]]
    if lines and all(SERVER_KEEPALIVE in line for line in lines):
        return ["server keepalive: * OK Still here"]
    if lines:
        # One cause per kind of reply: no tags, counts or timings.
        first = re.sub(r"^[A-Z]+\d+ ", "<tag> ", lines[0])
        return ["server data: " + re.sub(r"\d+(\.\d+)?", "N", first)[:30]]
    if wakeup["io"]:
        return ["I/O without an IMAP line: " + ",".join(sorted(set(wakeup["io"])))]
    return ["timeout with nothing due yet (woke before a timer's time)"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mirrord-idle-") as tmp:
        root = Path(tmp)
        server = PrivateDovecot(root / "server", max_connections=args.mailboxes + 10)
        server.start()
        process: subprocess.Popen[bytes] | None = None
        tracer: subprocess.Popen[bytes] | None = None
        try:
            account = server.new_account("idle")
            names = ["INBOX"] + [f"Box{i:02d}" for i in range(1, args.mailboxes)]
            serial = 0
            for name in names:
                if name != "INBOX":
                    account.client.create(name)
                messages = []
                for _ in range(args.messages):
                    serial += 1
                    messages.append(make_message(serial))
                account.fill(name, messages)
            account.client.close()
            config = write_config(root, account, args.mailboxes, args.idle_renew)
            runtime = root / "runtime"
            runtime.mkdir(mode=0o700)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)  # where find_status looks, here too
            probe_out = root / "probe.json"
            env = {
                **os.environ,
                "XDG_RUNTIME_DIR": str(runtime),
                "PYTHONPATH": os.pathsep.join([str(PROBE_DIR), os.environ.get("PYTHONPATH", "")]),
                "MIRRORD_IDLE_PROBE": str(probe_out),
            }
            env.pop("NOTIFY_SOCKET", None)
            env.pop("WATCHDOG_USEC", None)
            log = root / "mirrord.log"
            command = [sys.executable, "-m", "mirrord", "-c", str(config), "run"]
            with open(log, "wb") as log_file:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                           stderr=log_file, env=env)
            up = wait_all_idling(config, root / "state", args.mailboxes, process, log, timeout=120)
            time.sleep(args.settle)
            pid = process.pid
            if args.strace:
                tracer = subprocess.Popen(
                    ["strace", "-f", "-tt", "-e", "trace=epoll_wait,epoll_pwait", "-o", str(root / "strace.txt"),
                     "-p", str(pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                time.sleep(1.0)
            os.kill(pid, signal.SIGUSR1)
            time.sleep(0.2)
            cpu0, st0, t0 = cpu_seconds(pid), status_fields(pid), time.monotonic()
            time.sleep(args.seconds)
            cpu1, st1, t1 = cpu_seconds(pid), status_fields(pid), time.monotonic()
            os.kill(pid, signal.SIGUSR2)
            for _ in range(100):
                if probe_out.exists():
                    break
                time.sleep(0.05)
            probe = json.loads(probe_out.read_text())
            blocking_waits = None
            if tracer is not None:
                tracer.send_signal(signal.SIGINT)
                tracer.wait(10)
                text = (root / "strace.txt").read_text()
                # A return from a wait that could block: timeout argument not 0.
                blocking_waits = len(re.findall(r"epoll_p?wait\(\d+, .*?, \d+, (?!0[,)])-?\d+.*\) = \d+", text))
            process.send_signal(signal.SIGTERM)
            status = process.wait(30)
            if status != 0:
                print(f"warning: mirrord exited with {status}", file=sys.stderr)
            return {
                "up": up,
                "seconds": t1 - t0,
                "cpu": cpu1 - cpu0,
                "voluntary": st1["voluntary_ctxt_switches"] - st0["voluntary_ctxt_switches"],
                "involuntary": st1["nonvoluntary_ctxt_switches"] - st0["nonvoluntary_ctxt_switches"],
                "rss_kb": st1["VmRSS"],
                "hwm_kb": st1["VmHWM"],
                "threads": st1["threads"],
                "wakeups": probe["wakeups"],
                "probe_seconds": probe["seconds"],
                "blocking_waits": blocking_waits,
            }
        finally:
            if tracer is not None and tracer.poll() is None:
                tracer.kill()
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
            server.stop()


def report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    minutes = result["seconds"] / 60
    wakeups = result["wakeups"]
    causes: Counter[str] = Counter()
    for w in wakeups:
        causes.update(cause_of(w))
    ours = sum(1 for w in wakeups if not all(c.startswith("server keepalive") for c in cause_of(w)))
    rows = [
        ("idle seconds measured", f"{result['seconds']:.0f}"),
        ("CPU seconds (utime+stime)", f"{result['cpu']:.3f}"),
        ("CPU % of one core", f"{100 * result['cpu'] / result['seconds']:.4f}"),
        ("wakeups (blocking epoll_wait returns)", f"{len(wakeups)}"),
        ("wakeups / min", f"{len(wakeups) / minutes:.2f}"),
        ("  of them not server keepalives, / min", f"{ours / minutes:.2f}"),
        ("voluntary context switches (all threads)", f"{result['voluntary']}"),
        ("involuntary context switches", f"{result['involuntary']}"),
        ("threads", f"{result['threads']}"),
        ("RSS MB now / peak", f"{result['rss_kb'] / 1024:.1f} / {result['hwm_kb'] / 1024:.1f}"),
        ("start to all idling, s", f"{result['up']:.1f}"),
    ]
    if result["blocking_waits"] is not None:
        rows.append(("strace: blocking epoll_wait returns", str(result["blocking_waits"])))
    width = max(len(r[0]) for r in rows)
    print(f"\nmirrord run, {args.mailboxes} mailboxes watched, idle_renew {args.idle_renew or 'default (20m)'}")
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value:>12}")
    print("\nwakeups by cause:")
    if not causes:
        print("  (none)")
    for cause, n in causes.most_common():
        print(f"  {n:6d}  {n / minutes:7.2f}/min  {cause}")
    # Timers that fired, with the delay they were set for and the gaps between firings.
    fired: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for w in wakeups:
        for t in w["timers"]:
            name, _, after = t.partition(" (after ")
            fired[name].append((w["t"], after.rstrip(")")))
    print("\ntimers that fired:")
    if not fired:
        print("  (none)")
    for name, events in sorted(fired.items()):
        delays = sorted({d for _, d in events})
        times = sorted({round(t, 1) for t, _ in events})
        gaps = [b - a for a, b in zip(times, times[1:])]
        period = f", gaps {min(gaps):.1f}-{max(gaps):.1f} s" if gaps else ""
        print(f"  {name}: {len(events)} runs, set for {', '.join(delays[:4])}{period}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0, help="idle time measured (default 300)")
    parser.add_argument("--mailboxes", type=int, default=20)
    parser.add_argument("--messages", type=int, default=3, help="messages per mailbox")
    parser.add_argument("--idle-renew", default=None, help="idle_renew for the config, e.g. 1m (default: mirrord's)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after all idle before measuring")
    parser.add_argument("--strace", action="store_true", help="also count epoll waits with strace")
    parser.add_argument("--json", type=Path, help="write the raw result here")
    args = parser.parse_args()
    if args.strace and shutil.which("strace") is None:
        parser.error("strace is not installed (apt-get install strace)")
    result = run(args)
    report(args, result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
