"""What the benchmarks share: a raw IMAP client, percentiles, waiting, the Maildir's files.

Imported as a sibling module: the benchmarks are run as scripts
(``python3 tests/bench/bench_push.py``), so this directory is on sys.path.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_LITERAL = re.compile(rb"\{(\d+)\}$")


def quote(text: str) -> bytes:
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'


class RawImap:
    """A raw-socket IMAP client with little overhead per command and exact timing; benchmarks add what they need."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self._tags = itertools.count(1)
        greeting = self.readline()
        if not greeting.startswith(b"* OK"):
            raise RuntimeError(f"unexpected greeting {greeting!r}")

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    def readline(self) -> bytes:
        """One response line, with any literals in it inlined (``{n}`` kept before each)."""
        line = b""
        while True:
            end = self.buf.find(b"\r\n")
            if end < 0:
                self._fill()
                continue
            part, self.buf = self.buf[:end], self.buf[end + 2 :]
            line += part
            literal = _LITERAL.search(part)
            if literal is None:
                return line
            size = int(literal.group(1))
            while len(self.buf) < size:
                self._fill()
            line, self.buf = line + b"\r\n" + self.buf[:size], self.buf[size:]

    def command(self, text: bytes, literal: bytes | None = None) -> tuple[list[bytes], bytes, float]:
        """Send one command (a literal goes as LITERAL+, in the same write); return
        (untagged lines, tagged line, time.monotonic() when the tagged line was read)."""
        tag = b"b%d" % next(self._tags)
        if literal is None:
            self.sock.sendall(tag + b" " + text + b"\r\n")
        else:
            self.sock.sendall(tag + b" " + text + b" {%d+}\r\n" % len(literal) + literal + b"\r\n")
        untagged: list[bytes] = []
        while True:
            line = self.readline()
            if line.startswith(tag + b" "):
                done = time.monotonic()
                if not line[len(tag) + 1 :].startswith(b"OK"):
                    raise RuntimeError(f"{text[:40]!r} failed: {line!r}")
                return untagged, line, done
            untagged.append(line)

    def login(self, user: str, password: str) -> None:
        self.command(b"LOGIN " + quote(user) + b" " + quote(password))

    def lines(self, text: bytes) -> list[bytes]:
        """Send one command; its untagged lines (a NO or BAD raises)."""
        return self.command(text)[0]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * p / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def local_files(folder: Path) -> list[Path]:
    """The message files in a Maildir folder's new/ and cur/ (none if it is not there yet)."""
    files: list[Path] = []
    for sub in ("new", "cur"):
        try:
            files.extend((folder / sub).iterdir())
        except FileNotFoundError:
            pass
    return files


def wait(condition: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def quietly(call: Callable[[], Any]) -> None:
    try:
        call()
    except Exception as e:  # noqa: BLE001 - cleaning up after another error
        print(f"  (cleanup: {call!r} failed: {e})", file=sys.stderr)


class MirrordProcess:
    """``mirrord run`` as a subprocess with its log in a file (no pipe, no reader thread here).

    Subclasses say how it is started (:meth:`command`): a wrapper that
    stamps the log with time.monotonic(), a profiler...
    """

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mirrord", "-c", str(self.config), "run"]

    def popen_options(self) -> dict[str, Any]:
        # Without JOURNAL_STREAM the log keeps the plain format the benchmarks parse.
        return {"env": {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}}

    def start(self, timeout: float) -> float:
        """Start; return the seconds until it logged its first sync done."""
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, **self.popen_options()
            )
        deadline = started + timeout
        while "first sync done" not in self.log():
            if self.process.poll() is not None:
                raise RuntimeError(f"mirrord exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mirrord's first sync not done within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)
        return time.monotonic() - started

    def log(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_mb(self, field_name: str = "VmHWM") -> float | None:
        """Peak (VmHWM) or current (VmRSS) resident memory, in MB."""
        if self.process is None:
            return None
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def stop(self, timeout: float = 60) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def write_config(directory: Path, user: str, password: str, port: int, settings: str) -> Path:
    """A plaintext loopback account ``bench`` with its state and Maildir under ``directory``.

    ``settings``: more account keys, as YAML lines indented by four spaces.
    """
    password_file = directory / "password"
    password_file.write_text(password + "\n")
    os.chmod(password_file, 0o600)
    config = directory / "config.yaml"
    config.write_text(
        f"state_dir: {directory / 'state'}\n"
        "accounts:\n"
        "  bench:\n"
        "    host: 127.0.0.1\n"
        f"    port: {port}\n"
        "    tls: none\n"
        f"    username: {user}\n"
        f"    password_file: {password_file}\n"
        f"    maildir: {directory / 'Mail'}\n"
        + settings
    )
    os.chmod(config, 0o600)
    return config
