"""``mirrord demo``: see mirrord work without an IMAP account of your own.

Starts a private Dovecot on loopback (Debian's ``dovecot-imapd``), fills it
with a few dozen realistic messages in three mailboxes, writes a config file
for it, runs ``mirrord run --once`` exactly as a user would, and shows what
landed where. Then it starts the daemon, sends a few messages while it
watches, shows how long each took to land, and stops it with SIGTERM.
Everything stays in one directory so you can open the mirror with your mail
reader afterwards.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mirrord._dirs import make_private_dirs
from mirrord.testing import DovecotMissing, PrivateDovecot, make_message, populate, sample_mailboxes
from mirrord.units import plural


def _subject(path: Path) -> str:
    with path.open("rb") as f:
        for raw in f:
            if raw in (b"\n", b"\r\n"):
                break
            if raw.lower().startswith(b"subject:"):
                import email.header

                text = raw[8:].decode("ascii", "replace").strip()
                try:
                    return str(email.header.make_header(email.header.decode_header(text)))
                except Exception:  # noqa: BLE001 - a demo, shown as is
                    return text
    return "(no subject)"


def _count(folder: Path) -> int:
    return sum(1 for sub in ("new", "cur") for _ in os.scandir(folder / sub))


def _live(server: PrivateDovecot, root: Path, config: Path, count: int, verbose: bool) -> int:
    """Run the daemon and show mail arriving while it watches, with its latency."""
    if count <= 0:
        return 0
    log_path = root / "daemon.log"
    command = [sys.executable, "-m", "mirrord", "-c", str(config), "run"] + (["-v"] if verbose else [])
    print(f"\n$ mirrord -c {config} run      (the daemon; its log goes to {log_path})")
    with log_path.open("w") as log_file:
        daemon = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
    try:
        deadline = time.monotonic() + 30
        while "first sync done" not in log_path.read_text():
            if daemon.poll() is not None or time.monotonic() > deadline:
                print(f"the daemon did not start; see {log_path}", file=sys.stderr)
                return 1
            time.sleep(0.05)
        print("It is watching every mailbox with IDLE. Sending a few messages to INBOX:")
        inbox = root / "Mail" / "INBOX"
        rng = random.Random(7)
        with server.client() as client:
            for i in range(count):
                time.sleep(rng.uniform(0.5, 1.0))
                before = _count(inbox)
                client.append("INBOX", make_message(1000 + i, rng=rng, subject=f"Live message {i + 1}"))
                sent = time.monotonic()
                while _count(inbox) == before and time.monotonic() - sent < 10:
                    time.sleep(0.001)
                waited = (time.monotonic() - sent) * 1000
                print(f"  Live message {i + 1}: on disk {waited:4.0f} ms after the server accepted it")
        print("  (Dovecot itself waits 500 ms before telling an IDLE client about new mail;")
        print("   the rest is mirrord fetching and writing it.)")
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            code = daemon.wait()
    print(f"Sent SIGTERM: the daemon logged out and exited with status {code}.")
    return 0 if code == 0 else 1


def run_demo(directory: Path | None = None, *, verbose: bool = False, live: int = 5) -> int:
    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="mirrord-demo-"))
    make_private_dirs(root)
    server = PrivateDovecot(root / "server")
    try:
        server.start()
    except DovecotMissing as e:
        print(f"mirrord demo: {e}", file=sys.stderr)
        return 1
    try:
        print(f"Started a private Dovecot on {server.host}:{server.imaps_port} (IMAPS, throwaway CA).")
        samples = sample_mailboxes(random.Random(2024))
        with server.client() as client:
            populate(client, samples)
        total = sum(len(v) for v in samples.values())
        print(f"Filled it with {total} messages: " + ", ".join(f"{k} ({len(v)})" for k, v in samples.items()))

        password_file = root / "password"
        password_file.write_text(server.password + "\n")
        os.chmod(password_file, 0o600)
        config = root / "config.yaml"
        config.write_text(
            "# Written by `mirrord demo`: an account on the demo's private Dovecot.\n"
            f"state_dir: {root / 'state'}\n"
            "accounts:\n"
            "  demo:\n"
            "    host: localhost\n"
            f"    port: {server.imaps_port}\n"
            "    tls: implicit\n"
            f"    ca_file: {server.ca_file}\n"
            f"    username: {server.user}\n"
            f"    password_file: {password_file}\n"
            f"    maildir: {root / 'Mail'}\n"
            "    workers: 4\n"
        )
        os.chmod(config, 0o600)
        command = [sys.executable, "-m", "mirrord", "-c", str(config), "run", "--once"] + (["-v"] if verbose else [])
        print(f"\n$ mirrord -c {config} run --once")
        started = time.monotonic()
        status = subprocess.run(command).returncode
        elapsed = time.monotonic() - started
        if status != 0:
            print(f"\nmirrord exited with status {status}", file=sys.stderr)
            return 1
        print(f"\nDone in {elapsed:.2f} s. What landed where:")
        mail = root / "Mail"
        for mailbox in samples:
            folder = mail / mailbox
            files = sorted((folder / "new").iterdir()) + sorted((folder / "cur").iterdir())
            print(f"  {folder}/  {plural(len(files), 'message')} "
                  f"({len(list((folder / 'new').iterdir()))} in new/, {len(list((folder / 'cur').iterdir()))} in cur/)")
            for path in files[:3]:
                print(f"      {path.parent.name}/{path.name[:28]}...  {_subject(path)[:50]}")
        status = _live(server, root, config, live, verbose)
    finally:
        server.stop()
        print("Stopped the private Dovecot.")
    if status == 0:
        _parting_advice(root, config)
    return status


def _parting_advice(root: Path, config: Path) -> None:
    """The demo's last words: only commands that work now that its server is gone.

    It used to suggest ``mirrord -c CONFIG run``, which needs the private
    Dovecot the demo had just stopped, and so failed with "Connection
    refused". The mirror stays on disk; a real account starts with ``init``.
    """
    print(f"\nThe mirror stays in {root / 'Mail'}; the demo's server is gone. Try:")
    print(f"  neomutt -f {root / 'Mail' / 'INBOX'}")
    print(f"  mirrord -c {config} status")
    print("To mirror your own mail:")
    print("  mirrord init          writes a commented config and says what to edit")
    print("  mirrord check         tests it: connects, logs in, lists what would be mirrored")
    print("  mirrord run --once    the first copy; then `mirrord install-service`, or `mirrord run`")
