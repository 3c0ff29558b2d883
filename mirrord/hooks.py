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
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime

log = logging.getLogger("mirrord.hooks")

MIN_INTERVAL = 5.0
"""Seconds between two runs of one account's hook."""


class _HookProcess(protocol.ProcessProtocol):
    def __init__(self, hook: NewMailHook) -> None:
        self.hook = hook

    def processEnded(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        self.hook._ended(code, signal)


class NewMailHook:
    """Runs one account's ``on_new_mail`` command; see the module docstring."""

    def __init__(self, reactor: Any, account: str, argv: Sequence[str], *, clock: IReactorTime | None = None) -> None:
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
        mailboxes = sorted(pending)
        env = {
            **os.environ,
            "MIRRORD_ACCOUNT": self.account,
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
        try:
            self.reactor.spawnProcess(_HookProcess(self), executable, self.argv, env=env, childFDs={0: "w", 1: 2, 2: 2})
        except OSError as e:
            self._running = False
            log.error("%s: on_new_mail: cannot run %s: %s", self.account, self.argv[0], e)

    def _ended(self, code: int | None, signal: int | None) -> None:
        self._running = False
        if code not in (0, None) or signal is not None:
            how = f"exit status {code}" if signal is None else f"signal {signal}"
            log.warning("%s: on_new_mail command %s ended with %s", self.account, self.argv[0], how)
        self._schedule()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._pending.clear()
