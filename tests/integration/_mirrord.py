"""Running the real ``mirrord`` command against the test Dovecot, and reading its Maildir.

Tests run mirrord as a user does, as a separate process (a Twisted reactor
runs once per process, and the exit status is part of what users see).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirrord.flags import flags_from_info, representable
from mirrord.testing import ImapAccount, ImapCommandError


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str


def write_config(
    directory: Path,
    account: ImapAccount,
    *,
    tls: str = "implicit",
    host: str = "localhost",
    ca_file: Path | None | str = "default",
    password: str | None = None,
    extra: str = "",
    name: str = "test",
    port: int | None = None,
) -> Path:
    """A config file for ``account`` with state and Maildir under ``directory``; ``port``: a proxy's."""
    if port is None:
        port = account.imaps_port if tls == "implicit" else account.port
    ca = account.ca_file if ca_file == "default" else ca_file
    password_file = directory / f"{name}.password"
    password_file.write_text((password if password is not None else account.password) + "\n")
    os.chmod(password_file, 0o600)
    lines = [
        f"state_dir: {directory / 'state'}",
        "accounts:",
        f"  {name}:",
        f"    host: {host}",
        f"    port: {port}",
        f"    tls: {tls}",
        f"    username: {account.user}",
        f"    password_file: {password_file}",
        f"    maildir: {directory / 'Mail'}",
        "    workers: 3",
    ]
    if ca is not None:
        lines.append(f"    ca_file: {ca}")
    config = directory / "config.yaml"
    config.write_text("\n".join(lines) + "\n" + extra)
    os.chmod(config, 0o600)
    return config


def mirrord(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> Run:
    completed = subprocess.run(
        [sys.executable, "-m", "mirrord", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    return Run(completed.returncode, completed.stdout, completed.stderr)


@dataclass(frozen=True)
class LocalMessage:
    path: Path
    sha256: str
    flags: frozenset[str]


def local_messages(maildir: Path) -> list[LocalMessage]:
    found = []
    for sub in ("new", "cur"):
        for path in sorted((maildir / sub).iterdir()):
            _, _, info = path.name.partition(":2,")
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # renamed or removed by the running daemon since the listing
            found.append(LocalMessage(path, hashlib.sha256(data).hexdigest(), flags_from_info(info)))
    return found


def expected_messages(account: ImapAccount, mailbox: str) -> list[tuple[str, frozenset[str]]]:
    """(sha256 of the server's BODY[] with CRLF turned into LF, representable flags), sorted."""
    return sorted(
        (hashlib.sha256(body.replace(b"\r\n", b"\n")).hexdigest(), representable(flags))
        for flags, body in account.client.messages(mailbox).values()
    )


def assert_mirrors(account: ImapAccount, root: Path, mailbox: str) -> None:
    local = sorted((m.sha256, m.flags) for m in local_messages(root / mailbox))
    expected = expected_messages(account, mailbox)
    assert local == expected, f"{mailbox} differs from the server: {difference(local, expected)}"


def difference(local: list[tuple[str, frozenset[str]]], expected: list[tuple[str, frozenset[str]]]) -> str:
    """A readable account of how a mirror differs, for failure messages."""
    mine = {sha: flags for sha, flags in local}
    theirs = {sha: flags for sha, flags in expected}
    missing = [sha[:8] for sha in theirs if sha not in mine]
    extra = [sha[:8] for sha in mine if sha not in theirs]
    flags = [f"{sha[:8]}: local {sorted(mine[sha])} server {sorted(theirs[sha])}"
             for sha in theirs if sha in mine and mine[sha] != theirs[sha]]
    twice = len(local) - len(mine)
    return f"missing {missing}, extra {extra}, flags differ {flags}, duplicates {twice}"


def tree_snapshot(root: Path) -> dict[str, Any]:
    """Every file under ``root`` with its inode and mtime: any change shows."""
    snap = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            snap[os.path.relpath(os.path.join(dirpath, f), root)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return snap


class DaemonProcess:
    """``mirrord run`` in the background, its log collected, stopped with SIGTERM."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.args = args
        self.env = env
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> DaemonProcess:
        self.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop()
        if exc_type is not None:
            print(f"--- mirrord's log ---\n{self.log}")  # shown by pytest on failure

    def start(self, ready_timeout: float = 60.0) -> None:
        # MIRRORD_TEST_TRACE=1 adds the protocol trace to every daemon a test starts.
        trace = ["-v"] if os.environ.get("MIRRORD_TEST_TRACE") and "-v" not in self.args else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mirrord", "-c", str(self.config), "run", *self.args, *trace],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(self.env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for_log("first sync done", ready_timeout)

    def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            assert self.process is not None
            if self.process.poll() is not None:
                time.sleep(0.1)
                raise AssertionError(f"mirrord exited with {self.process.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout} s:\n{self.log}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        if self._reader is not None:
            self._reader.join(5)
        return status


def wait_until(
    condition: Any, timeout: float = 20.0, what: str = "condition", explain: Any = None
) -> None:
    """Poll ``condition()`` until true; the daemon works asynchronously to the test."""
    deadline = time.monotonic() + timeout
    while True:
        last = condition()
        if last:
            return
        if time.monotonic() > deadline:
            detail = f": {explain()}" if explain is not None else ""
            raise AssertionError(f"timed out waiting for {what}{detail}")
        time.sleep(0.02)


def converged(account: ImapAccount, root: Path, mailbox: str, timeout: float = 20.0) -> None:
    """Wait until the mirror of ``mailbox`` equals the server; say how it differs if it never does."""

    def explain() -> str:
        try:
            return _explain()
        except ImapCommandError as e:
            account.client.close()
            return f"(the server would not list {mailbox}: {e})"

    def _explain() -> str:
        local = sorted((m.sha256, m.flags) for m in local_messages(root / mailbox))
        mine = {sha for sha, _ in local}
        missing_uids = sorted(
            uid for uid, (_, body) in account.client.messages(mailbox).items()
            if hashlib.sha256(body.replace(b"\r\n", b"\n")).hexdigest() not in mine
        )
        return f"{difference(local, expected_messages(account, mailbox))}; missing UIDs {missing_uids}"

    wait_until(lambda: mirrors(account, root, mailbox), timeout, f"{mailbox} to converge", explain)


def mirrors(account: ImapAccount, root: Path, mailbox: str) -> bool:
    """Whether the local copy equals the server right now (for wait_until)."""
    try:
        assert_mirrors(account, root, mailbox)
    except (AssertionError, FileNotFoundError):
        return False
    except ImapCommandError:
        # After a mailbox is recreated, Dovecot may answer "Mailbox was deleted
        # under us" to a session that knew the old one until it logs in anew.
        account.client.close()
        return False
    return True


@contextmanager
def tmpfs(options: str, what: str) -> Iterator[Path]:
    """A small tmpfs mounted for one test (a full disk, a read-only one), removed after.

    Where mounting is not allowed the test is skipped, except under CI, which
    runs as root: there a skip would hide that the test never ran.
    """
    import pytest

    where = Path(tempfile.mkdtemp(prefix="mirrord-tmpfs-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        os.rmdir(where)
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs for {what}: {mounted.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        os.rmdir(where)
