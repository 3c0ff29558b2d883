"""Issue 13's pure parts and timing logic: the connection budget, the watched-set chooser, the status poller,
and reading a refusal as "too many connections". Fake connections, task.Clock, no sockets."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import task

from mirrord import watchset
from mirrord.budget import ConnectionBudget
from mirrord.poller import StatusPoller
from mirrord.protocol.errors import says_too_many_connections
from mirrord.watchset import Candidate

# -- reading the server's refusal -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("Maximum number of connections from user+IP exceeded (mail_max_userip_connections=10)", "LIMIT"),
        ("Too many simultaneous connections. (Failure)", None),  # Gmail
        ("Too many open connections", None),
        ("Connection limit reached", None),
    ],
)
def test_a_refusal_for_too_many_connections_is_recognised(text: str, code: str | None) -> None:
    assert says_too_many_connections(text, code)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("Authentication failed.", "AUTHENTICATIONFAILED"),
        ("Message too large", "LIMIT"),  # [LIMIT] alone is not about connections
        ("Quota exceeded", "OVERQUOTA"),
    ],
)
def test_other_refusals_are_not_read_as_too_many_connections(text: str, code: str | None) -> None:
    assert not says_too_many_connections(text, code)


# -- the budget ------------------------------------------------------------------------------


class Conn:
    connected_transport_lost = False


def test_the_budget_shrinks_once_to_what_is_open_when_the_logins_in_flight_are_done() -> None:
    clock = task.Clock()
    changes: list[int] = []
    budget = ConnectionBudget("acct", 10, clock, on_change=changes.append)
    for _ in range(9):
        budget.attempt()
    for _ in range(3):
        budget.done(Conn())
    budget.done(refused="too many")  # the first refusal comes while 5 logins are still in flight
    for _ in range(4):
        budget.done(Conn())
    budget.done(refused="too many")
    assert budget.unsettled
    clock.advance(0)
    assert (budget.limit, changes) == (7, [7])
    assert not budget.unsettled
    # A later refusal at the same count changes nothing (and logs nothing above debug).
    budget.attempt()
    budget.done(refused="too many")
    clock.advance(0)
    assert (budget.limit, changes) == (7, [7])


def test_closed_connections_do_not_count() -> None:
    clock = task.Clock()
    budget = ConnectionBudget("acct", 10, clock)
    conns = [Conn() for _ in range(4)]
    for c in conns:
        budget.attempt()
        budget.done(c)
    conns[0].connected_transport_lost = True
    budget.attempt()
    budget.done(refused="too many")
    clock.advance(0)
    assert budget.limit == 3


# -- the watched set -------------------------------------------------------------------------


def test_watch_names_come_first_then_inbox_then_recent_arrivals_then_names() -> None:
    pool = [
        Candidate("Archive", False),
        Candidate("INBOX", False),
        Candidate("Lists/busy", False, 100.0),
        Candidate("Lists/quiet", False, 10.0),
        Candidate("Work", True),
        Candidate("Alpha", False),
    ]
    assert watchset.choose(pool, 4) == ["Work", "INBOX", "Lists/busy", "Lists/quiet"]
    assert watchset.choose(pool, 6)[4:] == ["Alpha", "Archive"]
    assert watchset.choose(pool, 0) == []


def test_a_shrunk_room_stops_the_lowest_ranked_watchers() -> None:
    pool = [Candidate("INBOX", False), Candidate("A", False), Candidate("B", False, 5.0)]
    start, stop = watchset.rechoose(pool, ["INBOX", "A", "B"], 2, now=10.0)
    assert (start, stop) == ([], ["A"])


def test_a_busier_polled_mailbox_takes_the_watcher_of_a_quiet_one() -> None:
    pool = [Candidate("INBOX", False), Candidate("Old", False, 0.0), Candidate("Hot", False, 1000.0)]
    # Old has been quiet for 1000 s (over QUIET): Hot takes its watcher.
    assert watchset.rechoose(pool, ["INBOX", "Old"], 2, now=1000.0) == (["Hot"], ["Old"])
    # Not while Old is itself recent.
    pool = [Candidate("INBOX", False), Candidate("Old", False, 900.0), Candidate("Hot", False, 1000.0)]
    assert watchset.rechoose(pool, ["INBOX", "Old"], 2, now=1000.0) == ([], [])
    # INBOX and watch: names are never given up for activity elsewhere.
    pool = [Candidate("INBOX", False), Candidate("Hot", False, 1000.0)]
    assert watchset.rechoose(pool, ["INBOX"], 1, now=5000.0) == ([], [])


def test_room_that_grows_is_filled_best_first() -> None:
    pool = [Candidate("INBOX", False), Candidate("B", False), Candidate("A", False, 3.0)]
    assert watchset.rechoose(pool, [], 2, now=0.0) == (["INBOX", "A"], [])


# -- the status poller -----------------------------------------------------------------------


class FakeClient:
    def __init__(self, caps: set[str], figures: dict[bytes, dict[str, int]]) -> None:
        self.capabilities = frozenset(caps)
        self.figures = figures
        self.calls: list[Any] = []

    async def list_status(self, items: list[str]) -> dict[bytes, dict[str, int]]:
        self.calls.append(("LIST-STATUS", tuple(items)))
        return {k: {i: v[i] for i in items if i in v} for k, v in self.figures.items()}

    async def status_many(self, names: list[bytes], items: list[str]) -> dict[bytes, dict[str, int]]:
        self.calls.append(("STATUS", tuple(names), tuple(items)))
        return {k: {i: v[i] for i in items if i in v} for k, v in self.figures.items() if k in names}


class FakePool:
    closed = False

    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.jobs = 0

    async def run(self, job: Any, what: str = "") -> Any:
        self.jobs += 1
        worker = type("W", (), {})()

        async def connection() -> FakeClient:
            return self.client

        worker.connection = connection
        return await job(worker)


class Listener:
    def __init__(self) -> None:
        self.polls = 0

    def poll(self) -> None:
        self.polls += 1


def _figures(uidnext: int, modseq: int | None = 1) -> dict[str, int]:
    found = {"MESSAGES": uidnext - 1, "UIDNEXT": uidnext, "UIDVALIDITY": 7}
    if modseq is not None:
        found["HIGHESTMODSEQ"] = modseq
    return found


def _setup(caps: set[str], names: list[str], modseq: bool = True) -> tuple[task.Clock, FakeClient, FakePool,
                                                                          StatusPoller, dict[str, Listener]]:
    clock = task.Clock()
    client = FakeClient(caps, {n.encode(): _figures(1, 1 if modseq else None) for n in names})
    pool = FakePool(client)
    poller = StatusPoller(pool, clock, 60.0, label="acct")  # type: ignore[arg-type]
    listeners = {n: Listener() for n in names}
    for n in names:
        poller.add(n, n.encode(), listeners[n])
    return clock, client, pool, poller, listeners


def test_one_list_status_polls_every_mailbox_and_only_moved_ones_are_synced() -> None:
    names = [f"Lists/{i}" for i in range(50)]
    clock, client, pool, poller, listeners = _setup({"LIST-STATUS", "CONDSTORE"}, names)
    clock.advance(0)  # the first look: one command for all 50, and a sync of each (nothing to compare with)
    assert pool.jobs == 1 and client.calls == [("LIST-STATUS", ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "HIGHESTMODSEQ"))]
    assert all(listener.polls == 1 for listener in listeners.values())
    client.figures[b"Lists/7"] = _figures(2, 2)  # new mail in one of them
    clock.advance(60)
    assert pool.jobs == 2
    assert {n for n, listener in listeners.items() if listener.polls == 2} == {"Lists/7"}
    clock.advance(60)  # nothing moved: no sync at all
    assert pool.jobs == 3 and sum(listener.polls for listener in listeners.values()) == 51
    assert poller.describe() == "LIST-STATUS every 60 s"


def test_without_list_status_the_status_commands_go_out_together() -> None:
    clock, client, _pool, poller, listeners = _setup({"CONDSTORE"}, ["A", "B"])
    clock.advance(0)
    assert client.calls == [("STATUS", (b"A", b"B"), ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "HIGHESTMODSEQ"))]
    client.figures[b"B"] = _figures(1, 5)  # a flag change moves HIGHESTMODSEQ only
    clock.advance(60)
    assert (listeners["A"].polls, listeners["B"].polls) == (1, 2)
    assert poller.describe() == "STATUS every 60 s"


def test_without_highestmodseq_a_quiet_mailbox_is_still_synced_now_and_then_for_its_flags() -> None:
    clock, client, _pool, _poller, listeners = _setup({"LIST-STATUS"}, ["A"], modseq=False)
    clock.advance(0)
    assert client.calls[0][1] == ("MESSAGES", "UIDNEXT", "UIDVALIDITY")
    for _ in range(4):
        clock.advance(60)
    assert listeners["A"].polls == 1
    clock.advance(60)  # 300 s since its last sync
    assert listeners["A"].polls == 2


def test_a_removed_mailbox_is_polled_no_more_and_the_last_one_stops_the_loop() -> None:
    clock, _client, pool, poller, listeners = _setup({"LIST-STATUS"}, ["A", "B"])
    clock.advance(0)
    handle_b = poller.add("B", b"B", listeners["B"])
    handle_b.stop()
    assert not handle_b.running and "B" not in poller
    poller.remove("A")
    jobs = pool.jobs
    clock.advance(600)
    assert pool.jobs == jobs


def test_a_mailbox_created_or_gone_between_rounds_has_the_daemon_list_again() -> None:
    clock, client, _pool, poller, _listeners = _setup({"LIST-STATUS"}, ["A", "B"])
    relists: list[int] = []
    poller.on_names = lambda: relists.append(1)
    clock.advance(0)
    clock.advance(60)
    assert relists == []
    client.figures[b"New"] = _figures(1)  # created (or renamed to) on the server
    clock.advance(60)
    assert relists == [1]
    clock, client, _pool, poller, _listeners = _setup({"CONDSTORE"}, ["A", "B"])
    poller.on_names = lambda: relists.append(2)
    del client.figures[b"B"]  # STATUS B fails: gone
    clock.advance(0)
    assert relists == [1, 2]


def test_a_second_shrink_is_not_a_second_warning(caplog: pytest.LogCaptureFixture) -> None:
    clock = task.Clock()
    budget = ConnectionBudget("acct", 10, clock)
    conns = [Conn() for _ in range(6)]
    for c in conns:
        budget.attempt()
        budget.done(c)
    budget.attempt()
    budget.done(refused="too many")
    clock.advance(0)
    conns[0].connected_transport_lost = True  # a watcher given up for INBOX's...
    budget.attempt()
    budget.done(refused="too many")  # ...which the server still refuses: it had let 6 in by mistake
    clock.advance(0)
    assert budget.limit == 5
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "refused a connection beyond 6" in warnings[0].getMessage()
