"""The new-mail hook: run the user's command when mail lands (``on_new_mail``).

This is what lets users drop goimapnotify: a desktop notification, or
``notmuch new`` / ``mu index`` right after the files are there. The command
is an argv list run without a shell, with what happened in its environment:

- ``MIRRORD_ACCOUNT``: the account name;
- ``MIRRORD_MAILBOX``: the mailbox, or the first of several;
- ``MIRRORD_MAILBOXES``: every mailbox with new mail, one per line;
- ``MIRRORD_NEW``: how many new messages in all.

Bursts are coalesced: at most one run per ``MIN_INTERVAL`` per account, and
never two at once; mail that lands meanwhile is reported by the next run.

What the command prints (stdout and stderr) goes to the log a line at a
time, prefixed with the account and the command.

Mailbox names come from the server: control characters in them are spelled
``\\xNN``. The command runs in a process group of its own and is killed
(the whole group: a shell and what it started) after ``TIMEOUT`` seconds,
so a hung command cannot stop every later run. Its environment is the
daemon's minus what systemd meant for the daemon alone (``NOTIFY_SOCKET``,
``WATCHDOG_*``, ``LISTEN_*``): a hook that inherited them could tell systemd
the daemon is ready or alive, or take its sockets.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal as _signal
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from mirrord.sync.names import visible

log = logging.getLogger("mirrord.hooks")

MIN_INTERVAL = 5.0
"""Seconds between two runs of one account's hook."""

TIMEOUT = 60.0
"""Seconds a hook may run before its process group is killed."""

_DAEMON_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
"""Variables systemd sets for the service's main process only."""

_LAUNCH = "import os, sys; os.setpgid(0, 0); os.execv(sys.argv[1], sys.argv[2:])"
"""Puts the command in a process group of its own (Twisted's spawnProcess cannot), so a timeout kills all of it."""


def hook_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The daemon's environment without what belongs to the daemon alone (PATH, HOME, LANG... stay)."""
    env = dict(os.environ if base is None else base)
    for key in _DAEMON_ONLY:
        env.pop(key, None)
    return env


OUTPUT_LINE_MAX = 4096
"""Characters of one line of a hook's output kept for the log; the rest is cut."""


class _HookProcess(protocol.ProcessProtocol):
    """Logs the command's output line by line, prefixed with the account, and reports its end.

    The output used to go straight to the daemon's stderr, so the journal
    showed a bare "No new mail." with no account or cause. The end is
    reported when the process exits, not when its pipes close: something it
    started in the background may keep them open for long.
    """

    def __init__(self, hook: NewMailHook) -> None:
        self.hook = hook
        self._partial = {1: b"", 2: b""}
        self._reported = False

    def childDataReceived(self, fd: int, data: bytes) -> None:  # noqa: N802 - Twisted's name
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()[: OUTPUT_LINE_MAX * 4]
        for line in lines:
            self._log(fd, line)

    def _log(self, fd: int, line: bytes) -> None:
        text = visible(line.rstrip(b"\r").decode("utf-8", "replace"))[:OUTPUT_LINE_MAX]
        if text.strip():
            level = logging.INFO if fd == 1 else logging.WARNING
            log.log(level, "%s: on_new_mail %s: %s", self.hook.account, self.hook.argv[0], text)

    def _flush(self) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._log(fd, rest)
        self._partial = {1: b"", 2: b""}

    def _report(self, reason: Any) -> None:
        if self._reported:
            return
        self._reported = True
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        self.hook._ended(code, signal)

    def processExited(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
        self._report(reason)

    def processEnded(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
        self._flush()
        self._report(reason)


class NewMailHook:
    """Runs one account's ``on_new_mail`` command; see the module docstring."""

    def __init__(
        self,
        reactor: Any,
        account: str,
        argv: Sequence[str],
        *,
        clock: IReactorTime | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor
        self.account = account
        self.argv = list(argv)
        self.enabled = True
        """Whether new mail triggers the command (the first sync never reports any)."""
        self._pending: dict[str, int] = {}
        self._running = False
        self._last_start: float | None = None
        self._timer: IDelayedCall | None = None
        self.timeout = timeout
        self._process: Any = None
        self._deadline: IDelayedCall | None = None

    def new_mail(self, mailbox: str, count: int) -> None:
        if not self.enabled or count <= 0:
            return
        self._pending[mailbox] = self._pending.get(mailbox, 0) + count
        self._schedule()

    def _schedule(self) -> None:
        if self._running or (self._timer is not None and self._timer.active()) or not self._pending:
            return
        wait = 0.0
        if self._last_start is not None:
            wait = max(0.0, self._last_start + MIN_INTERVAL - self.clock.seconds())
        self._timer = self.clock.callLater(wait, self._run)

    def _run(self) -> None:
        self._timer = None
        pending, self._pending = self._pending, {}
        mailboxes = sorted(visible(m) for m in pending)
        env = {
            **hook_environment(),
            "MIRRORD_ACCOUNT": visible(self.account),
            "MIRRORD_MAILBOX": mailboxes[0],
            "MIRRORD_MAILBOXES": "\n".join(mailboxes),
            "MIRRORD_NEW": str(sum(pending.values())),
        }
        executable = self.argv[0] if os.sep in self.argv[0] else shutil.which(self.argv[0])
        if executable is None:
            log.error("%s: on_new_mail: command not found: %s", self.account, self.argv[0])
            return
        self._running = True
        self._last_start = self.clock.seconds()
        launcher = [sys.executable, "-I", "-S", "-c", _LAUNCH, executable, *self.argv]
        try:
            self._process = self.reactor.spawnProcess(
                _HookProcess(self), sys.executable, launcher, env=env, childFDs={0: "w", 1: "r", 2: "r"}
            )
        except OSError as e:
            self._running = False
            log.error("%s: on_new_mail: cannot run %s: %s", self.account, self.argv[0], e)
            return
        self._deadline = self.clock.callLater(self.timeout, self._kill)

    def _kill(self) -> None:
        """The command ran past its time: kill its whole process group."""
        self._deadline = None
        pid = getattr(self._process, "pid", None)
        log.warning(
            "%s: on_new_mail command %s still running after %gs: killed", self.account, self.argv[0], self.timeout
        )
        if pid is None:
            return
        try:
            os.killpg(pid, _signal.SIGKILL)
        except OSError:
            # No such group yet (killed before the launcher's setpgid): the
            # process itself. Its pid is still ours: Twisted has not reaped it.
            try:
                os.kill(pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _ended(self, code: int | None, signal: int | None) -> None:
        self._running = False
        self._process = None
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if code not in (0, None) or signal is not None:
            how = f"exit status {code}" if signal is None else f"signal {signal}"
            log.warning("%s: on_new_mail command %s ended with %s", self.account, self.argv[0], how)
        self._schedule()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._pending.clear()
