"""The NOTIFY listener (issue 13, part 4) on a fake connection: events in, poller and re-listing out."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.internet.error import ConnectionLost

from mirrord.notify import EVENTS, NotifyService
from mirrord.poller import StatusPoller
from mirrord.protocol._parser import Untagged
from mirrord.protocol.errors import CommandFailed, TooManyConnections


class FakeClient:
    def __init__(self, refuse: bool = False) -> None:
        self.sent: list[bytes] = []
        self.on_unsolicited: Any = None
        self.on_lost: Any = None
        self.connected_transport_lost = False
        self.refuse = refuse
        self.noops = 0
        self.logged_out = False

    async def notify_set(self, spec: bytes) -> None:
        self.sent.append(spec)
        if self.refuse:
            raise CommandFailed("NOTIFY", "BAD", "Invalid arguments")

    async def noop(self) -> None:
        if self.connected_transport_lost:
            raise ConnectionLost("gone")
        self.noops += 1

    async def logout(self) -> None:
        self.logged_out = True

    def lose(self) -> None:
        self.connected_transport_lost = True
        self.on_lost()


class Harness:
    def __init__(self, clients: list[Any]) -> None:
        self.clock = task.Clock()
        self.clients = clients
        self.statuses: list[tuple[bytes, dict[str, int]]] = []
        self.names = 0
        self.connected = 0
        self.gone: list[str] = []
        self.service = NotifyService(
            connect=self.connect, clock=self.clock, label="acct", keepalive=1200.0,
            on_status=lambda raw, figures: self.statuses.append((raw, figures)),
            on_names=self.more_names, on_connected=self.more_connected, on_gone=self.gone.append,
        )

    async def connect(self, label: str) -> Any:
        item = self.clients.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def more_names(self) -> None:
        self.names += 1

    def more_connected(self) -> None:
        self.connected += 1


def status(name: bytes, *pairs: Any) -> Untagged:
    return Untagged("STATUS", data=[name, [str(p).encode() if not isinstance(p, bytes) else p for p in pairs]])


def test_events_become_status_changes_and_relistings() -> None:
    client = FakeClient()
    h = Harness([client])
    h.service.start()
    assert client.sent == [EVENTS] and h.connected == 1 and h.service.state == "listening"
    client.on_unsolicited(status(b"Lists/7", b"MESSAGES", 3, b"UIDNEXT", 9))
    client.on_unsolicited(Untagged("LIST", data=[[b"\\NonExistent"], b"/", b"Old"]))
    assert h.statuses == [(b"Lists/7", {"MESSAGES": 3, "UIDNEXT": 9})] and h.names == 1
    h.clock.advance(1200)
    assert client.noops == 1
    d = defer.Deferred.fromCoroutine(h.service.stop())
    assert d.called and client.logged_out


def test_a_lost_connection_is_noticed_at_once_and_reconnected_with_a_fresh_look() -> None:
    first, second = FakeClient(), FakeClient()
    h = Harness([first, second])
    h.service.start()
    first.lose()
    assert h.service.state == "reconnecting"
    h.clock.advance(2)
    assert second.sent == [EVENTS] and h.connected == 2


def test_a_refused_notify_or_connection_gives_up_for_good() -> None:
    h = Harness([FakeClient(refuse=True)])
    h.service.start()
    assert h.gone and "refused NOTIFY SET" in h.gone[0] and h.service.state == "stopped"
    h = Harness([TooManyConnections("too many")])
    h.service.start()
    assert h.gone and "no connection left" in h.gone[0]
    h.clock.advance(3600)
    assert h.clients == []


class Listener:
    def __init__(self) -> None:
        self.polls = 0

    def poll(self) -> None:
        self.polls += 1


def test_a_status_event_syncs_a_polled_mailbox_only_when_its_figures_moved() -> None:
    clock = task.Clock()
    poller = StatusPoller(None, clock, 60.0, label="acct")  # type: ignore[arg-type]
    box = Listener()
    poller.add("Lists/7", b"Lists/7", box)
    poller._entries["Lists/7"].figures = (("HIGHESTMODSEQ", 4), ("MESSAGES", 2), ("UIDNEXT", 3))
    assert poller.changed(b"Lists/7", {"MESSAGES": 2, "UIDNEXT": 3}) and box.polls == 0  # nothing new
    poller.changed(b"Lists/7", {"HIGHESTMODSEQ": 5})  # a flag change: partial figures
    assert box.polls == 1
    assert not poller.changed(b"INBOX", {"UIDNEXT": 9})  # watched elsewhere: not ours
    poller.stop()
