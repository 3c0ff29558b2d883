"""The worker pool's connection handling, with fake connections: no sockets, no sleeps."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from mirrord.pool import WorkerPool
from mirrord.protocol.errors import LoginFailed


class FakeClient:
    connected_transport_lost = False
    transport = None

    async def logout(self) -> None:
        pass


class Connector:
    """Hands out connections when the test says so, and counts the attempts."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, defer.Deferred[Any]]] = []

    async def __call__(self, label: str) -> Any:
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append((label, d))
        return await d

    def succeed(self) -> None:
        self.pending.pop(0)[1].callback(FakeClient())

    def fail(self, error: Exception) -> None:
        self.pending.pop(0)[1].errback(error)


def make(size: int = 4, ahead: int | None = None) -> tuple[WorkerPool, Connector]:
    settings: Any = type("S", (), {"name": "acct"})()
    connector = Connector()
    return WorkerPool(None, settings, "pw", size, connect=connector, ahead=ahead), connector


async def _uses(worker: Any) -> int:
    await worker.connection()
    return worker.number


def test_the_other_workers_log_in_as_soon_as_one_login_worked() -> None:
    pool, connector = make()
    job = defer.Deferred.fromCoroutine(pool.run(_uses))
    assert [label for label, _ in connector.pending] == ["acct worker 1"]
    connector.succeed()
    assert job.result == 1
    # Workers 2-4 connect ahead of need, all at once.
    assert sorted(label for label, _ in connector.pending) == ["acct worker 2", "acct worker 3", "acct worker 4"]
    for _ in range(3):
        connector.succeed()
    assert all(w.connected for w in pool._all)


def test_only_ahead_workers_log_in_ahead_and_a_job_still_opens_another() -> None:
    """A catch-up of one mailbox (``ahead=1``) logs in once (issue #15)."""
    pool, connector = make(ahead=2)
    job = defer.Deferred.fromCoroutine(pool.run(_uses))
    connector.succeed()
    assert job.result == 1
    assert [label for label, _ in connector.pending] == ["acct worker 2"]
    connector.succeed()
    pool, connector = make(ahead=1)
    hold: defer.Deferred[None] = defer.Deferred()
    first = defer.Deferred.fromCoroutine(pool.run(lambda w: _held(w, hold)))
    connector.succeed()
    assert connector.pending == []
    second = defer.Deferred.fromCoroutine(pool.run(_uses))  # worker 1 is busy: another one opens
    assert [label for label, _ in connector.pending] == ["acct worker 2"]
    connector.succeed()
    assert second.result == 2
    hold.callback(None)
    assert first.result == 1


async def _held(worker: Any, until: defer.Deferred[None]) -> int:
    await worker.connection()
    await until
    return worker.number


def test_a_refused_login_is_not_repeated_on_every_worker() -> None:
    pool, connector = make()
    job = defer.Deferred.fromCoroutine(pool.run(_uses))
    connector.fail(LoginFailed("refused"))
    assert connector.pending == []
    job.addErrback(lambda f: f.trap(LoginFailed))


def _holds(until: defer.Deferred[None]) -> Any:
    """A job that keeps its worker busy until ``until`` fires."""

    async def job(worker: Any) -> int:
        await worker.connection()
        await until
        return worker.number

    return job


def test_a_job_goes_to_a_logged_in_worker_before_one_still_logging_in() -> None:
    pool, connector = make(3)
    defer.Deferred.fromCoroutine(pool.run(_uses))
    connector.succeed()  # worker 1 logged in and free again; workers 2 and 3 connecting ahead
    second = defer.Deferred.fromCoroutine(pool.run(_uses))
    assert second.result == 1
    assert len(connector.pending) == 2  # nothing waited on, nothing opened anew


def test_a_job_on_a_worker_still_logging_in_joins_that_login() -> None:
    pool, connector = make(2)
    busy: defer.Deferred[None] = defer.Deferred()
    defer.Deferred.fromCoroutine(pool.run(_holds(busy)))
    connector.succeed()  # worker 1 logged in and busy; worker 2 connecting ahead, still free
    second = defer.Deferred.fromCoroutine(pool.run(_uses))
    assert [label for label, _ in connector.pending] == ["acct worker 2"]  # no second connect
    assert not second.called
    connector.succeed()
    assert second.result == 2


def test_a_failed_connect_ahead_is_left_to_the_job_that_needs_the_worker() -> None:
    pool, connector = make(2)
    busy: defer.Deferred[None] = defer.Deferred()
    defer.Deferred.fromCoroutine(pool.run(_holds(busy)))
    connector.succeed()
    connector.fail(ConnectionRefusedError("busy"))  # worker 2's early connect
    assert not pool._all[1].connected
    job = defer.Deferred.fromCoroutine(pool.run(_uses))
    assert [label for label, _ in connector.pending] == ["acct worker 2"]
    connector.succeed()
    assert job.result == 2


def test_a_connection_that_opens_after_the_pool_closed_is_dropped() -> None:
    pool, connector = make(2)
    defer.Deferred.fromCoroutine(pool.run(_uses))
    connector.succeed()
    defer.Deferred.fromCoroutine(pool.close())
    late = FakeClient()
    aborted: list[bool] = []
    late.transport = type("T", (), {"abortConnection": lambda self: aborted.append(True)})()  # type: ignore[attr-defined]
    connector.pending.pop(0)[1].callback(late)
    assert aborted == [True]
    assert pool._all[1].client is None


def test_stop_returns_with_the_logouts_sent_and_fires_when_they_are_answered() -> None:
    """`run --once` closes its state while the servers answer LOGOUT (issue #15)."""
    answered: list[defer.Deferred[None]] = []

    class SlowLogout(FakeClient):
        async def logout(self) -> None:
            d: defer.Deferred[None] = defer.Deferred()
            answered.append(d)
            await d

    pool, connector = make(size=2, ahead=1)
    job = defer.Deferred.fromCoroutine(pool.run(_uses))
    connector.pending.pop(0)[1].callback(SlowLogout())
    assert job.result == 1
    stopping = defer.Deferred.fromCoroutine(pool.stop())
    logged_out = stopping.result  # returned at once: no job runs
    assert len(answered) == 1 and not logged_out.called  # LOGOUT sent, not answered yet
    answered[0].callback(None)
    assert logged_out.called
