"""The new-mail hook's coalescing, on task.Clock with a fake process launcher."""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

from mirrord.hooks import MIN_INTERVAL, NewMailHook


class FakeReactor(task.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, str, list[str], dict[str, str]]] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: dict[str, str], **kw: Any) -> None:  # noqa: N802
        self.spawned.append((proto, executable, args, env))

    def finish(self, index: int = -1, code: int = 0) -> None:
        proto = self.spawned[index][0]
        proto.processEnded(Failure(ProcessDone(0) if code == 0 else ProcessTerminated(exitCode=code)))


def make() -> tuple[NewMailHook, FakeReactor]:
    reactor = FakeReactor()
    hook = NewMailHook(reactor, "personal", [sys.executable, "-c", "pass"])
    hook.enabled = True
    return hook, reactor


def test_runs_with_account_mailbox_and_count_in_its_environment() -> None:
    hook, reactor = make()
    hook.new_mail("INBOX", 2)
    reactor.advance(0)
    (_, executable, args, env), = reactor.spawned
    assert executable == sys.executable and args == [sys.executable, "-c", "pass"]
    assert (env["MIRRORD_ACCOUNT"], env["MIRRORD_MAILBOX"], env["MIRRORD_NEW"]) == ("personal", "INBOX", "2")


def test_a_burst_is_coalesced_into_one_run_per_interval() -> None:
    hook, reactor = make()
    hook.new_mail("INBOX", 1)
    reactor.advance(0)
    reactor.finish()
    for mailbox in ("INBOX", "Lists/dev", "INBOX"):
        hook.new_mail(mailbox, 3)
    reactor.advance(MIN_INTERVAL - 0.1)
    assert len(reactor.spawned) == 1, "not before the interval is over"
    reactor.advance(0.1)
    assert len(reactor.spawned) == 2
    env = reactor.spawned[1][3]
    assert env["MIRRORD_NEW"] == "9" and env["MIRRORD_MAILBOXES"] == "INBOX\nLists/dev"


def test_never_two_at_once() -> None:
    hook, reactor = make()
    hook.new_mail("INBOX", 1)
    reactor.advance(0)
    hook.new_mail("INBOX", 1)
    reactor.advance(MIN_INTERVAL * 3)
    assert len(reactor.spawned) == 1, "the first is still running"
    reactor.finish(code=1)  # a failing hook is logged, and does not stop the next
    reactor.advance(0)
    assert len(reactor.spawned) == 2


def test_nothing_when_disabled_or_for_zero() -> None:
    hook, reactor = make()
    hook.enabled = False
    hook.new_mail("INBOX", 500)
    hook.enabled = True
    hook.new_mail("INBOX", 0)
    reactor.advance(MIN_INTERVAL)
    assert reactor.spawned == []
