"""One mirrord per account at a time: the account locks under the state dir.

Apart from :mod:`mirrord.service` so that ``run --once`` takes them without
importing the daemon (its watchers, poller, notifications: 10 ms of start-up).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mirrord._dirs import make_private_dirs
from mirrord.config import Account, Config


class AccountLock:
    """One mirrord per account at a time: two would fetch the same mail twice."""

    def __init__(self, state_dir: Path, account: str) -> None:
        self.path = state_dir / "locks" / f"{account}.lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock and write our PID into it, so a second mirrord can say who holds it."""
        make_private_dirs(self.path.parent)  # the state dir too, if missing: 0700
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the lock is what matters; the PID only helps the message
        self._fd = fd
        return True

    def holder(self) -> int | None:
        """The PID written by whoever holds the lock, if it can be read."""
        try:
            text = self.path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LockHeld(Exception):
    def __init__(self, account: str, path: Path, pid: int | None = None) -> None:
        who = f"another mirrord (PID {pid})" if pid is not None else "another mirrord"
        super().__init__(
            f"{account}: {who} is already mirroring this account (lock: {path}); stop it first "
            "(`systemctl --user stop mirrord` if it runs as the service)"
        )
        self.pid = pid


def lock_accounts(config: Config, accounts: list[Account]) -> dict[str, AccountLock]:
    """Take the locks of ``accounts``, all or none."""
    locks: dict[str, AccountLock] = {}
    for account in accounts:
        lock = AccountLock(config.state_dir, account.name)
        if not lock.acquire():
            for held in locks.values():
                held.release()
            raise LockHeld(account.name, lock.path, lock.holder())
        locks[account.name] = lock
    return locks
