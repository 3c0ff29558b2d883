"""mirrord next to mbsync over a link like the ones users have: 50 ms RTT, 100 Mbit/s.

Usage (from the repository root, Dovecot and isync installed):

    python3 tests/bench/bench_link.py [--messages 2000] [--target-mb 142.5]
        [--rtt-ms 50] [--mbit 100] [--repeat 1] [--workers 4]
        [--tools mirrord,mbsync] [--modes plain,compress] [--no-sync] [--no-push]
        [--push-messages 40] [--push-baseline DIR] [--keep]

This kernel has no ``netem``, so the link is :class:`mirrord.testing.faultproxy.FaultProxy`
on loopback, started here: every byte either way is held ``rtt/2`` and the
rate is capped at ``--mbit`` in each direction (a token bucket shared by all
connections, as one link is shared). ``--rtt-ms 0 --mbit 0`` is plain loopback
(the proxy still forwards, unshaped). The proxy's byte counters give the bytes
that crossed the link ("wire MB"), which shows what COMPRESS saved.

1. Initial sync. One mailbox of ``--messages`` messages, about ``--target-mb``
   MB (the issue's 2,000 messages, 142.5 MB: the link's floor, those bytes at
   the link's rate, is 11.4 s): bench_sync's realistic text (2-30 KB) with a
   base64 attachment (0.2-2 MB) on one message in twenty, to reach the size.
   Each tool syncs it into a fresh Maildir, through the proxy:

   * mode ``plain``: Dovecot without imap_zlib (no COMPRESS offered): mirrord
     (``compress: no``) and mbsync;
   * mode ``compress``: Dovecot restarted with imap_zlib (COMPRESS=DEFLATE
     offered after login): mirrord (``compress: yes``) and mbsync, which since
     isync 1.4 uses COMPRESS=DEFLATE whenever the server offers it (it has no
     setting to turn it off; the wire bytes show it did).

   Both are verified as in bench_sync (mirrord byte for byte against the
   server's BODY[] with CRLF -> LF, mbsync apart from its X-TUID header line).
   The table: tool, mode, wall s, CPU s, peak RSS MB, messages/s, MB/s (message
   bytes), wire MB, wall / link floor, and mirrord's wall / mbsync's in the same
   mode. Targets (issue "Fastest mirror in its field"): mirrord with COMPRESS
   no slower than mbsync with COMPRESS; mirrord without COMPRESS within 10 % of
   the link floor.

2. Push over the link (``--no-push`` skips it). A fresh account with 200
   messages; ``mirrord run`` (``compress: no``, since these are 2 KB
   messages) and a bare IDLE client (the floor: EXAMINE, IDLE, nothing else)
   both connect through the shaped proxy; a third client APPENDs
   ``--push-messages`` messages directly (as mail arriving from elsewhere)
   with 0.6-1.2 s gaps. Per message: the floor client reading ``* N EXISTS``
   vs mirrord's file appearing in the Maildir (inotify), exactly as in
   bench_latency.py, whose pieces this reuses. Target: overhead (file -
   EXISTS) at most one RTT + 10 ms (a worker already logged in fetches on
   EXISTS in one round trip). ``--push-baseline DIR`` runs the push test once
   more with the mirrord package found in DIR (e.g. /work/main) for
   comparison.

Figures measured while other work runs on the machine are noisy: use
``--repeat`` and read the spread (each run's load average is printed).
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _benchlib  # the benchmarks' shared helpers, a sibling module
import bench_latency as latency
import bench_sync as syncb

from mirrord.testing import ImapAccount, PrivateDovecot, make_message
from mirrord.testing.faultproxy import FaultProxy

# ---------------------------------------------------------------------------
# The messages


ATTACHMENT_SHARE = 0.05
"""One message in twenty carries an attachment: 2,000 messages come to about 142 MB."""


def link_specs(count: int, seed: int, target_bytes: float) -> list[syncb.Spec]:
    """Deterministic sizes: realistic text, a few attachments, scaled towards ``target_bytes``.

    Attachments are scaled so that the estimated total (text as asked; a
    base64 attachment 4/3 of its bytes plus line ends) meets the target.
    """
    rng = random.Random(seed)
    raw = []
    for k in range(count):
        size = rng.randint(2_000, 30_000)
        attachment = rng.randint(150_000, 1_500_000) if rng.random() < ATTACHMENT_SHARE else 0
        raw.append((size, attachment, rng.getrandbits(64)))
    text = sum(s for s, _, _ in raw)
    attach = sum(a for _, a, _ in raw) * 1.37
    scale = max(0.0, (target_bytes - text) / attach) if attach else 0.0
    return [syncb.Spec(1 + k, s, int(a * scale), seed_k) for k, (s, a, seed_k) in enumerate(raw)]


# ---------------------------------------------------------------------------
# The tools, pointed at the proxy


@dataclass
class Endpoint:
    """What bench_sync's tools read from an account: here the proxy's address."""

    host: str
    port: int
    user: str
    password: str


class LinkMirrord(syncb.Mirrord):
    compress = "no"

    def reset(self) -> None:
        super().reset()
        config = self.workdir / "mirrord.yaml"
        config.write_text(config.read_text() + f"    compress: {self.compress}\n")


@dataclass
class Row:
    tool: str
    mode: str
    runs: list[syncb.Run] = field(default_factory=list)
    wire: list[int] = field(default_factory=list)

    def med(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)


def run_sync(args: argparse.Namespace, root: Path, server: PrivateDovecot, proxy: FaultProxy,
             report: syncb.Report) -> tuple[list[Row], int, int]:
    account = server.new_account("link")
    account.client.close()
    specs = link_specs(args.messages, 7, args.target_mb * 1e6)
    started = time.monotonic()
    syncb.fill(account, [("INBOX", specs, syncb.flag_runs(len(specs)))])
    truth = root / "truth.json"
    summary = syncb.digest(account, ["INBOX"], truth)
    count, nbytes = summary["INBOX"]
    print(f"  built INBOX: {count} messages, {nbytes / 1e6:.1f} MB in {time.monotonic() - started:.0f} s; "
          f"link floor {floor_seconds(args, nbytes):.2f} s", flush=True)
    syncb.quiesce()
    via = Endpoint(proxy.listen_host, proxy.port, account.user, account.password)
    bench = syncb.Bench(args, root, server, report)
    rows: list[Row] = []
    for mode in args.modes:
        if server.compress != (mode == "compress"):
            server.stop()
            server.compress = mode == "compress"
            server.start()
        tools: list[syncb.Tool] = []
        for name in args.tools:
            if name == "mbsync" and args.mbsync_version is None:
                continue
            tool: syncb.Tool
            if name == "mirrord":
                tool = LinkMirrord("mirrord", root / mode / name, via, args)  # type: ignore[arg-type]
                tool.compress = "yes" if mode == "compress" else "no"  # type: ignore[attr-defined]
            else:
                tool = syncb.Mbsync("mbsync", root / mode / name, via, args)  # type: ignore[arg-type]
            tools.append(tool)
        mode_rows = {t.name: Row(t.name, mode) for t in tools}
        rows.extend(mode_rows.values())
        for rep in range(args.repeat):
            for tool in tools if rep % 2 == 0 else list(reversed(tools)):
                tool.reset()
                before = proxy.bytes_from_server
                run = tool.run(f"{mode}-initial")
                wire = proxy.bytes_from_server - before
                mode_rows[tool.name].runs.append(run)
                mode_rows[tool.name].wire.append(wire)
                print(f"  {tool.name} {mode} run {rep + 1}: {syncb.describe(run)}; "
                      f"{wire / 1e6:.1f} MB from the server over the link", flush=True)
                bench.verify(tool, f"{mode} (run {rep + 1})", ["INBOX"], truth)
                if isinstance(tool, syncb.Mirrord):
                    fetched = syncb.Mirrord.fetched(run)
                    report.check(f"{mode} (run {rep + 1}), mirrord log", fetched == count,
                                 f"{fetched} fetched of {count}")
        bench.cleanup(tools)
    return rows, count, nbytes


def floor_seconds(args: argparse.Namespace, nbytes: int) -> float:
    return nbytes / rate_bytes(args) if args.mbit else 0.0


def rate_bytes(args: argparse.Namespace) -> float:
    return args.mbit * 1e6 / 8


def print_sync_table(args: argparse.Namespace, rows: list[Row], count: int, nbytes: int) -> dict[str, float]:
    floor = floor_seconds(args, nbytes)
    walls = {(r.tool, r.mode): r.med("wall") for r in rows if r.runs}
    head = (f"{'tool':<8} {'mode':<9} {'wall s':>7} {'CPU s':>7} {'peak RSS MB':>12} {'msgs/s':>7} "
            f"{'MB/s':>6} {'wire MB':>8} {'/floor':>7} {'/mbsync':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if not r.runs:
            continue
        wall = r.med("wall")
        vs_floor = f"{wall / floor:7.2f}" if floor else f"{'-':>7}"
        other = walls.get(("mbsync", r.mode))
        vs_mbsync = f"{wall / other:8.2f}" if r.tool == "mirrord" and other else f"{'-':>8}"
        rss_floor = ">=" if any(x.rss_floor for x in r.runs) else ""
        print(f"{r.tool:<8} {r.mode:<9} {wall:7.2f} {r.med('cpu'):7.2f} {rss_floor + format(r.med('rss_mb'), '.1f'):>12} "
              f"{count / wall:7.0f} {nbytes / 1e6 / wall:6.1f} {statistics.median(r.wire) / 1e6:8.1f} {vs_floor} {vs_mbsync}")
        if len(r.runs) > 1:
            print(f"{'':<18}walls: {', '.join(f'{x.wall:.2f}' for x in r.runs)}")
    return {f"{t}/{m}": w for (t, m), w in walls.items()}


# ---------------------------------------------------------------------------
# The link itself


def check_link(args: argparse.Namespace, megabytes: float = 25.0) -> tuple[float, float]:
    """(Mbit/s, RTT ms) of a proxy shaped like the benchmark's, measured with a raw socket.

    A bulk transfer from a local source through a second proxy with the
    same shape, then ten 1-byte ping-pongs: shows that the emulated link
    delivers the rate and delay asked for, so that the floor is a floor.
    """
    source = socket.socket()
    source.bind(("127.0.0.1", 0))
    source.listen(1)
    total = int(megabytes * 1e6)

    def serve() -> None:
        conn, _ = source.accept()
        with conn:
            conn.recv(1)
            block = b"x" * 65536
            left = total
            while left > 0:
                conn.sendall(block[: min(left, len(block))])
                left -= len(block)
            for _ in range(10):
                conn.sendall(conn.recv(1))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with FaultProxy("127.0.0.1", source.getsockname()[1]) as proxy:
        proxy.shape(delay=args.rtt_ms / 2000, rate_bytes_per_second=rate_bytes(args) if args.mbit else None)
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.monotonic()
            sock.sendall(b"g")
            got = 0
            while got < total:
                data = sock.recv(1 << 20)
                if not data:
                    break
                got += len(data)
            elapsed = time.monotonic() - started
            rtts = []
            for _ in range(10):
                t = time.monotonic()
                sock.sendall(b"p")
                sock.recv(1)
                rtts.append((time.monotonic() - t) * 1000)
    source.close()
    thread.join(5)
    # The first byte waits one RTT (request out, data back): not transfer time.
    transfer = max(elapsed - args.rtt_ms / 1000, 1e-9)
    return got * 8 / transfer / 1e6, statistics.median(rtts)


# ---------------------------------------------------------------------------
# Push over the link


def push_config(directory: Path, account: ImapAccount, port: int, workers: int, compress_key: bool = True) -> Path:
    return _benchlib.write_config(
        directory, account.user, account.password, port,
        f"    workers: {workers}\n    mailboxes: [INBOX]\n"
        + ("    compress: no\n" if compress_key else ""),  # a baseline may predate the key
    )


def run_push(args: argparse.Namespace, root: Path, server: PrivateDovecot, proxy: FaultProxy,
             name: str, pythonpath: str | None) -> latency.Outcome:
    out = latency.Outcome(latency.Scenario(name, 200))
    work = root / name
    work.mkdir()
    account = server.new_account(name)
    account.fill("INBOX", (make_message(i, size=latency.MESSAGE_SIZE) for i in range(1, 201)))
    opener = latency.RawImap(account.host, account.port)
    opener.login(account.user, account.password)
    opener.command(b'SELECT "INBOX"')
    opener.close()
    config = push_config(work, account, proxy.port, args.workers, compress_key=pythonpath is None)
    old_path = os.environ.get("PYTHONPATH")
    if pythonpath is not None:
        os.environ["PYTHONPATH"] = pythonpath
    # "watcher": mirrord's log also has, on the same clock, when its INBOX
    # watcher read each EXISTS; watcher EXISTS -> file is mirrord's own share,
    # free of the phase between two Dovecot sessions' notification timers.
    daemon = latency.Mirrord(config, work / "mirrord.log", log_mode="watcher")
    inbox = work / "Mail" / "INBOX"
    rng = random.Random(1)
    inotify = floor = collector = appender = None
    sent: list[tuple[int, int, float]] = []
    try:
        # ``python -m``/``-c`` put the working directory first on sys.path,
        # ahead of PYTHONPATH: start the baseline from its own tree.
        here = os.getcwd()
        if pythonpath is not None:
            os.chdir(pythonpath)
        try:
            out.first_sync_s = daemon.start(timeout=300)
        finally:
            os.chdir(here)
        latency._wait(lambda: len(latency._local_files(inbox)) >= 200, 60)
        inotify = latency.Inotify()
        for sub in ("new", "cur"):
            inotify.watch(inbox / sub)
        floor = latency.RawImap("127.0.0.1", proxy.port)
        floor.login(account.user, account.password)
        floor.start_idle("INBOX")
        appender = latency.RawImap(account.host, account.port)
        appender.login(account.user, account.password)
        collector = latency.Collector(inotify, floor)
        collector.start()
        time.sleep(1.0)  # mirrord's workers settle (first sync done, connections open)
        print(f"  {name}: measuring {args.push_messages} messages ...", flush=True)
        for k in range(args.push_messages):
            if not daemon.alive():
                raise RuntimeError(f"mirrord died:\n{daemon.log_tail()}")
            uid, t_ok = appender.append("INBOX", make_message(latency.MEASURED_BASE + k, size=latency.MESSAGE_SIZE))
            sent.append((k, uid, t_ok))
            time.sleep(rng.uniform(0.6, 1.2))
        total = 200 + args.push_messages
        if not latency._wait(lambda: len(latency._local_files(inbox)) >= total, 60, 0.2):
            out.notes.append("mirrord did not catch up within 60 s of the last APPEND")
        time.sleep(0.5)
        collector.stop()
        out.peak_rss_mb = daemon.peak_rss_mb()
        daemon.stop()
        latency._evaluate(out, account, collector, sent, inbox, daemon)
    finally:
        if pythonpath is not None:
            if old_path is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old_path
        latency._quietly(daemon.stop)
        if collector is not None and collector.is_alive():
            latency._quietly(collector.stop)
        for client in (floor, appender):
            if client is not None:
                client.close()
        if inotify is not None:
            latency._quietly(inotify.close)
        latency._quietly(account.close)
    return out


def print_push(out: latency.Outcome, target_ms: float) -> bool:
    print(f"  {'latency (ms)':<44}{'median':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    print(latency._row(f"floor: APPEND OK -> EXISTS (n={len(out.floor_ms)})", out.floor_ms))
    print(latency._row(f"mirrord: APPEND OK -> file (n={len(out.mirrord_ms)})", out.mirrord_ms))
    print(latency._row(f"overhead: file - EXISTS (n={len(out.overhead_ms)})", out.overhead_ms))
    print(latency._row(f"watcher EXISTS -> file (n={len(out.internal_ms)})", out.internal_ms))
    ok = bool(out.overhead_ms) and out.identical and not out.missing
    if out.overhead_ms:
        med = latency.percentile(out.overhead_ms, 50)
        met = med <= target_ms
        ok = ok and met
        print(f"  target: overhead median <= RTT + 10 ms = {target_ms:g} ms: {'met' if met else 'NOT met'} ({med:.1f})")
    if out.internal_ms:
        inner = latency.percentile(out.internal_ms, 50)
        print(f"  mirrord's own share (watcher EXISTS -> file) median {inner:.1f} ms = "
              f"{inner / max(target_ms - 10, 1e-9):.2f} RTT + processing")
    print(f"  mirror: {out.local_count} files, server {out.server_count}, byte-identical: "
          f"{'yes' if out.identical else 'NO'}; missing {out.missing}")
    for note in out.notes:
        print(f"  note: {note}")
    return ok


# ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--target-mb", type=float, default=142.5, help="total size of the mailbox, MB (10^6)")
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="round-trip time of the link (0: none)")
    parser.add_argument("--mbit", type=float, default=100.0, help="rate each way, Mbit/s (0: unlimited)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tools", default="mirrord,mbsync")
    parser.add_argument("--modes", default="plain,compress", help="plain and/or compress")
    parser.add_argument("--no-sync", action="store_true", help="skip the initial-sync part")
    parser.add_argument("--no-push", action="store_true", help="skip the push-latency part")
    parser.add_argument("--push-messages", type=int, default=40)
    parser.add_argument("--push-baseline", default=None, help="also measure push with the mirrord package in DIR")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in ("plain", "compress") for m in args.modes):
        parser.error("--modes takes plain and/or compress")
    # What bench_sync's tools and checks read from args.
    args.mirrord_wrapper = ""
    args.mbsync_version = syncb.mbsync_version()
    args.gnu_time = syncb.have_gnu_time()

    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(syncb.compile_mirrord())
    for line in syncb.versions(args):
        print(line)
    link = (f"{args.rtt_ms:g} ms RTT ({args.rtt_ms / 2:g} ms each way), "
            + (f"{args.mbit:g} Mbit/s each way" if args.mbit else "no rate limit"))
    print(f"link:    FaultProxy on 127.0.0.1: {link}")
    mbit, rtt = check_link(args)
    link_check = f"measured with a raw socket: {mbit:.1f} Mbit/s, RTT {rtt:.1f} ms"
    print(f"         {link_check}")
    print(flush=True)

    root = Path(tempfile.mkdtemp(prefix="mirrord-bench-link-"))
    report = syncb.Report()
    server = PrivateDovecot(root / "server", max_connections=50)
    proxy: FaultProxy | None = None
    ok = True
    sync_rows: list[Row] = []
    count = nbytes = 0
    pushes: list[tuple[str, latency.Outcome]] = []
    try:
        server.start()
        proxy = FaultProxy(server.host, server.port)
        proxy.start()
        proxy.shape(delay=args.rtt_ms / 2000, rate_bytes_per_second=rate_bytes(args) if args.mbit else None)
        if not args.no_sync:
            print("== initial sync over the link", flush=True)
            sync_rows, count, nbytes = run_sync(args, root, server, proxy, report)
        if not args.no_push:
            if server.compress:
                server.stop()
                server.compress = False
                server.start()
            print("\n== push over the link", flush=True)
            pushes.append(("mirrord (this tree)", run_push(args, root, server, proxy, "push", None)))
            if args.push_baseline:
                try:
                    pushes.append((f"mirrord from {args.push_baseline}",
                                   run_push(args, root, server, proxy, "push-baseline", args.push_baseline)))
                except RuntimeError as e:
                    print(f"  the baseline failed: {e}", flush=True)
    except syncb.ToolFailed as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        ok = False
    finally:
        if proxy is not None:
            proxy.close()
        server.stop()
        if args.keep:
            print(f"\nkept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print("\n" + "=" * 20 + " results " + "=" * 20)
    print(f"link: {link}; {link_check}")
    if sync_rows:
        floor = floor_seconds(args, nbytes)
        print(f"initial sync of {count} messages, {nbytes / 1e6:.1f} MB; link floor {floor:.2f} s "
              f"(medians of {args.repeat} run(s); wire MB: bytes from the server through the proxy)")
        walls = print_sync_table(args, sync_rows, count, nbytes)
        print("\ntargets:")
        mc, bc = walls.get("mirrord/compress"), walls.get("mbsync/compress")
        if mc is not None and bc is not None:
            print(f"  mirrord with COMPRESS {mc:.2f} s <= mbsync with COMPRESS {bc:.2f} s: "
                  f"{'met' if mc <= bc else 'NOT met'}")
            print(f"  (of mirrord's time, {syncb.import_floor():.2f} s is the start-up floor: a Python "
                  "that only imports Twisted's reactor and IMAP4Client; mbsync starts in milliseconds)")
        mp = walls.get("mirrord/plain")
        if mp is not None and floor:
            print(f"  mirrord without COMPRESS {mp:.2f} s within 10 % of the link floor {floor:.2f} s "
                  f"({mp / floor:.2f}x): {'met' if mp <= 1.1 * floor else 'NOT met'}")
    push_ok = True
    for label, out in pushes:
        print(f"\npush, {label}: {out.measured} messages of {latency.MESSAGE_SIZE} bytes, "
              f"mirrord and the floor client through the link")
        met = print_push(out, args.rtt_ms + 10)
        if label.endswith("(this tree)"):
            push_ok = push_ok and met
    print("\nchecks:")
    for what, passed, detail in report.checks:
        print(f"  {'ok  ' if passed else 'FAIL'} {what}: {detail}")
    all_ok = ok and all(p for _, p, _ in report.checks) and all(o.identical and not o.missing for _, o in pushes)
    print(f"\n{'all checks passed' if all_ok else 'SOME CHECKS FAILED'}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
