"""The IDLE watcher's protocol and timing logic, on StringTransport and task.Clock: no sleeps.

Each test plays the server line by line and checks what the watcher sent
and which events its listener heard.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mirrord.flags import Flags
from mirrord.protocol.client import MirrordIMAP4Client
from mirrord.protocol.errors import ConnectFailed, LoginFailed
from mirrord.watcher import Backoff, IdleWatcher, SequenceMap, SequenceMapError, WatcherService, parse_uid_set

RENEW = 1200.0
POLL = 300.0


class Events:
    """A MailboxEvents listener that records what it heard."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def watching(self) -> None:
        self.log.append(("watching",))

    def new_messages(self) -> None:
        self.log.append(("new",))

    def expunged(self, uids: Sequence[int]) -> None:
        self.log.append(("expunged", tuple(uids)))

    def flags_changed(self, changes: Mapping[int, Flags]) -> None:
        self.log.append(("flags", dict(changes)))

    def resync_needed(self, reason: str) -> None:
        self.log.append(("resync", reason))

    def disconnected(self, reason: str) -> None:
        self.log.append(("disconnected", reason))


class Server:
    """Plays the server side of one connection against a watcher."""

    def __init__(self, capabilities: str = "IMAP4rev1 IDLE") -> None:
        self.clock = task.Clock()
        self.client = MirrordIMAP4Client(label="acct/INBOX", clock=self.clock)
        self.transport = StringTransport()
        self.aborted = False
        self.transport.abortConnection = self._abort  # type: ignore[method-assign]
        self.client.makeConnection(self.transport)
        self.client.dataReceived(b"* OK ready\r\n")
        self.client.capabilities = frozenset(capabilities.upper().split())
        self.events = Events()

    def _abort(self) -> None:
        self.aborted = True

    def sent(self) -> list[bytes]:
        lines = self.transport.value().split(b"\r\n")[:-1]
        self.transport.clear()
        return lines

    def say(self, *lines: bytes) -> None:
        self.client.dataReceived(b"".join(line + b"\r\n" for line in lines))

    def watcher(self, **kw: Any) -> IdleWatcher:
        return IdleWatcher(
            self.client,
            b"INBOX",
            self.events,
            clock=self.clock,
            label="acct/INBOX",
            idle_renew=kw.pop("idle_renew", RENEW),
            poll_interval=kw.pop("poll_interval", POLL),
            **kw,
        )

    def start(self, uids: Sequence[int] = (1, 2, 3), **kw: Any) -> tuple[IdleWatcher, defer.Deferred[None]]:
        """Run a watcher through EXAMINE and SEARCH to its IDLE command."""
        watcher = self.watcher(**kw)
        done = defer.Deferred.fromCoroutine(watcher.run())
        assert self.sent() == [b'M1 EXAMINE "INBOX"']
        self.say(
            b"* %d EXISTS" % len(uids),
            b"* OK [UIDVALIDITY 42] ok",
            b"* OK [UIDNEXT %d] ok" % (max(uids, default=0) + 1),
            b"M1 OK [READ-ONLY] done",
        )
        if uids:
            assert self.sent() == [b"M2 UID SEARCH ALL"]
            self.say(b"* SEARCH " + b" ".join(b"%d" % u for u in uids), b"M2 OK done")
        return watcher, done

    def tag(self, line: bytes) -> bytes:
        return line.split()[0]


def idle_tag(server: Server) -> bytes:
    lines = server.sent()
    assert lines and lines[-1].endswith(b"IDLE"), lines
    return server.tag(lines[-1])


def test_idle_counts_only_after_the_continuation() -> None:
    server = Server()
    watcher, _ = server.start()
    tag = idle_tag(server)
    assert server.events.log == [("watching",)], "catch-up may start once IDLE is requested"
    assert watcher.state != "idling"
    server.clock.advance(RENEW * 2)
    assert server.sent() == [], "no renewal is scheduled before the server said +"
    server.say(b"+ idling")
    assert watcher.state == "idling"
    assert tag.startswith(b"M")


def test_refused_idle_falls_back_to_noop_polling() -> None:
    server = Server()
    watcher, _ = server.start()
    tag = idle_tag(server)
    server.say(tag + b" NO IDLE not allowed here")
    assert watcher.state == "polling"
    noop = server.sent()
    assert len(noop) == 1 and noop[0].endswith(b"NOOP")
    server.say(b"* 4 EXISTS", server.tag(noop[0]) + b" OK done")
    assert ("new",) in server.events.log
    learn = server.sent()
    assert learn[0].endswith(b"FETCH 4:* (UID FLAGS)")
    server.say(b"* 4 FETCH (UID 9 FLAGS ())", server.tag(learn[0]) + b" OK")
    assert server.sent() == []
    server.clock.advance(POLL - 1)
    assert server.sent() == []
    server.clock.advance(1)
    assert server.sent()[0].endswith(b"NOOP")


def test_server_without_idle_is_polled() -> None:
    server = Server(capabilities="IMAP4rev1")
    watcher, _ = server.start()
    assert server.sent()[0].endswith(b"NOOP")
    assert server.events.log == [("watching",)]


def renew_examine(server: Server, uidvalidity: int = 42, uids: tuple[int, ...] = (1, 2, 3)) -> None:
    """Answer the EXAMINE and SEARCH a renewal sends to look at the mailbox afresh."""
    examine = server.sent()
    assert examine[-1].endswith(b'EXAMINE "INBOX"'), examine
    server.say(b"* %d EXISTS" % len(uids), b"* OK [UIDVALIDITY %d] ok" % uidvalidity,
               server.tag(examine[-1]) + b" OK [READ-ONLY] done")
    search = server.sent()
    assert search[-1].endswith(b"UID SEARCH ALL"), search
    server.say(b"* SEARCH " + b" ".join(b"%d" % u for u in uids), server.tag(search[-1]) + b" OK")


def test_renewal_fires_at_idle_renew_and_reenters() -> None:
    server = Server()
    watcher, _ = server.start()
    tag = idle_tag(server)
    server.say(b"+ idling")
    server.clock.advance(RENEW - 1)
    assert server.sent() == []
    server.clock.advance(1)
    assert server.sent() == [b"DONE"]
    server.say(tag + b" OK Idle completed")
    renew_examine(server)
    tag2 = idle_tag(server)
    assert tag2 != tag
    server.say(b"+ idling")
    server.clock.advance(RENEW)
    assert server.sent() == [b"DONE"]
    assert [e for e in server.events.log if e[0] == "resync"] == []


def test_renewal_notices_a_mailbox_recreated_on_the_server() -> None:
    server = Server()
    watcher, _ = server.start()
    tag = idle_tag(server)
    server.say(b"+ idling")
    server.clock.advance(RENEW)
    server.sent()
    server.say(tag + b" OK")
    renew_examine(server, uidvalidity=43, uids=(1, 2))
    assert server.events.log[-1][0] == "resync"
    assert len(watcher.map) == 2
    idle_tag(server)


def test_renewal_is_cancelled_when_idle_ends_early() -> None:
    server = Server()
    watcher, _ = server.start()
    tag = idle_tag(server)
    server.say(b"+ idling")
    server.clock.advance(RENEW / 2)
    server.say(b"* 4 EXISTS")  # ends IDLE early, to learn the new UID
    assert server.sent() == [b"DONE"]
    assert len(server.clock.getDelayedCalls()) == 1, "only the DONE deadline is pending"
    server.say(tag + b" OK done")
    learn = server.sent()
    server.say(b"* 4 FETCH (UID 7 FLAGS ())", server.tag(learn[0]) + b" OK")
    idle_tag(server)
    server.say(b"+ idling")
    server.clock.advance(RENEW / 2 + 1)
    assert server.sent() == [], "the old renewal did not fire"
    server.clock.advance(RENEW / 2)
    assert server.sent() == [b"DONE"]


def test_done_without_tagged_ok_drops_the_connection() -> None:
    server = Server()
    watcher, done = server.start()
    idle_tag(server)
    server.say(b"+ idling")
    server.clock.advance(RENEW)
    assert server.sent() == [b"DONE"]
    server.clock.advance(29)
    assert not server.aborted
    server.clock.advance(2)
    assert server.aborted, "no tagged OK within the DONE deadline"
    server.client.connectionLost(Failure(ConnectionLost("aborted")))
    failures: list[Failure] = []
    done.addErrback(failures.append)
    assert failures and failures[0].check(ConnectionLost)


def test_idle_itself_has_no_deadline() -> None:
    server = Server()
    server.start()
    idle_tag(server)
    server.say(b"+ idling")
    server.clock.advance(RENEW - 1)
    assert not server.aborted


def test_expunges_map_to_uids_across_shifts() -> None:
    server = Server()
    server.start(uids=[10, 20, 30, 40, 50])
    idle_tag(server)
    server.say(b"+ idling")
    # Dovecot sends descending; Cyrus and Courier repeat one number: both must work.
    server.say(b"* 4 EXPUNGE", b"* 2 EXPUNGE")
    server.say(b"* 1 EXPUNGE", b"* 1 EXPUNGE")
    assert [e for e in server.events.log if e[0] == "expunged"] == [
        ("expunged", (40,)),
        ("expunged", (20,)),
        ("expunged", (10,)),
        ("expunged", (30,)),
    ]


def test_expunge_between_exists_and_learning_the_new_uid() -> None:
    server = Server()
    server.start(uids=[10, 20, 30])
    tag = idle_tag(server)
    server.say(b"+ idling")
    server.say(b"* 4 EXISTS")  # a new message, UID not known yet
    assert server.sent() == [b"DONE"]
    server.say(b"* 2 EXPUNGE")  # before we learn it: the new one is now number 3
    server.say(tag + b" OK done")
    learn = server.sent()
    assert learn[0].endswith(b"FETCH 3:* (UID FLAGS)")
    server.say(b"* 3 FETCH (UID 31 FLAGS (\\Seen))", server.tag(learn[0]) + b" OK")
    idle_tag(server)
    server.say(b"+ idling", b"* 3 EXPUNGE", b"* 1 EXPUNGE")
    log = server.events.log
    assert ("expunged", (20,)) in log
    assert log[-2:] == [("expunged", (31,)), ("expunged", (10,))]
    assert ("flags", {31: frozenset({"\\Seen"})}) in log


def test_expunge_of_a_message_never_learned_asks_for_resync() -> None:
    server = Server()
    server.start(uids=[10])
    idle_tag(server)
    server.say(b"+ idling", b"* 2 EXISTS", b"* 2 EXPUNGE")
    assert server.events.log[-1][0] == "resync"


def test_vanished_and_flag_changes_name_uids() -> None:
    server = Server(capabilities="IMAP4rev1 IDLE QRESYNC")
    watcher = server.watcher()
    defer.Deferred.fromCoroutine(watcher.run())
    assert server.sent() == [b"M1 ENABLE QRESYNC"]
    server.say(b"* ENABLED QRESYNC", b"M1 OK")
    server.sent()
    server.say(b"* 3 EXISTS", b"* OK [UIDVALIDITY 1] x", b"M2 OK [READ-ONLY] done")
    server.sent()
    server.say(b"* SEARCH 5 6 9", b"M3 OK")
    idle_tag(server)
    server.say(b"+ idling", b"* VANISHED 5:6", b"* 1 FETCH (UID 9 MODSEQ (12) FLAGS (\\Flagged))")
    assert server.events.log[1:] == [("expunged", (5, 6)), ("flags", {9: frozenset({"\\Flagged"})})]


def test_exists_below_known_count_is_a_lost_track_and_drops() -> None:
    server = Server()
    server.start(uids=[1, 2, 3])
    idle_tag(server)
    server.say(b"+ idling", b"* 2 EXISTS")
    assert server.aborted
    assert server.events.log[-1][0] == "resync"


@pytest.mark.parametrize("before_the_continuation", [False, True])
def test_stop_leaves_idle(before_the_continuation: bool) -> None:
    # SIGINT right after the first sync once left the daemon hanging: the
    # stop came between IDLE and the server's "+", and the DONE promised for
    # the "+" was never sent (the watcher, awaiting the "+" first, had the
    # Deferred's result to itself).
    server = Server()
    watcher, done = server.start()
    tag = idle_tag(server)
    if before_the_continuation:
        defer.Deferred.fromCoroutine(watcher.stop())
        assert server.sent() == [], "DONE before the + would be read as a command"
        server.say(b"+ idling")
    else:
        server.say(b"+ idling")
        defer.Deferred.fromCoroutine(watcher.stop())
    assert server.sent() == [b"DONE"]
    server.say(tag + b" OK")
    assert done.called
    assert watcher.state == "stopped"


def test_new_mail_announced_before_the_continuation_still_leaves_idle_to_learn_its_uid() -> None:
    server = Server()
    watcher, _ = server.start()
    tag = idle_tag(server)
    server.say(b"* 4 EXISTS")
    assert server.events.log[-1] == ("new",)
    server.say(b"+ idling")
    assert server.sent() == [b"DONE"], "the new UID is learned now, not at the renewal"
    server.say(tag + b" OK")
    assert server.sent() == [b"M4 FETCH 4:* (UID FLAGS)"]


# -- the sequence map on its own -------------------------------------------------


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_sequence_map_agrees_with_a_model(data: st.DataObject) -> None:
    """Random EXISTS/EXPUNGE/learn histories: the map always names the right UID."""
    server: list[int] = sorted(data.draw(st.sets(st.integers(1, 50), max_size=10)))
    next_uid = 51
    seqmap = SequenceMap(list(server))
    for _ in range(data.draw(st.integers(0, 30))):
        action = data.draw(st.sampled_from(["append", "expunge", "learn"]))
        if action == "append":
            server.append(next_uid)
            next_uid += 1
            assert seqmap.exists(len(server))
        elif action == "expunge" and server:
            seq = data.draw(st.integers(1, len(server)))
            uid = server.pop(seq - 1)
            assert seqmap.expunge(seq) in (uid, None)
        elif action == "learn" and (first := seqmap.first_unknown()) is not None:
            seqmap.learn({i + 1: server[i] for i in range(first - 1, len(server))})
        assert len(seqmap) == len(server)
        for seq, uid in enumerate(server, 1):
            assert seqmap.uid(seq) in (uid, None)


def test_sequence_map_rejects_impossible_numbers() -> None:
    seqmap = SequenceMap([1, 2])
    with pytest.raises(SequenceMapError):
        seqmap.expunge(3)
    with pytest.raises(SequenceMapError):
        seqmap.exists(1)


def test_uid_sets() -> None:
    assert parse_uid_set(b"1:3,7,10:9") == {1, 2, 3, 7, 9, 10}


# -- reconnecting -------------------------------------------------------------------


def test_backoff_grows_with_jitter_to_a_cap_and_resets() -> None:
    backoff = Backoff(first=1.0, cap=60.0, rng=random.Random(1))
    delays = [backoff.next() for _ in range(12)]
    assert all(0.5 <= d <= 60 for d in delays)
    assert delays[-1] >= 30, "grown to the cap"
    assert delays[0] <= 1
    backoff.reset()
    assert backoff.next() <= 1
    assert backoff.next(floor=600) == 600


def test_service_reconnects_with_backoff_and_long_wait_after_refused_login() -> None:
    clock = task.Clock()
    attempts: list[float] = []
    outcomes = [ConnectFailed("refused"), ConnectFailed("refused"), LoginFailed("bad password")]

    async def connect(label: str) -> MirrordIMAP4Client:
        attempts.append(clock.seconds())
        raise outcomes.pop(0) if outcomes else ConnectFailed("still down")

    events = Events()
    service = WatcherService(
        connect=connect,
        raw_name=b"INBOX",
        listener=events,
        clock=clock,
        label="acct/INBOX",
        idle_renew=RENEW,
        poll_interval=POLL,
        backoff=Backoff(first=1.0, cap=60.0, rng=random.Random(3)),
    )
    service.start()
    for _ in range(100):
        clock.advance(10)
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] <= 10 and gaps[1] <= 10
    assert gaps[2] >= WatcherService.LOGIN_RETRY_FLOOR, "a refused login waits long"
    assert [e[0] for e in events.log].count("disconnected") == len(attempts)
    assert service.state == "reconnecting"
    d = defer.Deferred.fromCoroutine(service.stop())
    assert d.called


# -- suspend and resume ------------------------------------------------------------

from mirrord.watcher import ClockJumpDetector  # noqa: E402


def test_without_a_clock_alarm_the_clocks_are_compared_every_interval() -> None:
    clock = task.Clock()
    wall = [1000.0]
    mono = [50.0]
    jumps: list[float] = []
    detector = ClockJumpDetector(jumps.append, clock, interval=5, threshold=30,
                                 wall=lambda: wall[0], monotonic=lambda: mono[0])
    detector.start()
    assert detector.polling, "task.Clock has no file descriptors: the fallback polls"
    for _ in range(10):
        wall[0] += 5
        mono[0] += 5
        clock.advance(5)
    assert jumps == []
    wall[0] += 3600 + 5  # an hour asleep: only the wall clock moved
    mono[0] += 5
    clock.advance(5)
    assert jumps == [3600]
    detector.stop()


def test_check_now_leaves_idle_and_a_dead_connection_is_dropped() -> None:
    server = Server()
    watcher, _ = server.start()
    idle_tag(server)
    server.say(b"+ idling")
    watcher.check_now()
    assert server.sent() == [b"DONE"]
    server.clock.advance(31)
    assert server.aborted, "no answer to DONE: the connection was dead"


def test_vanished_for_a_message_not_yet_learned_rebuilds_the_map() -> None:
    server = Server(capabilities="IMAP4rev1 IDLE QRESYNC")
    watcher = server.watcher()
    defer.Deferred.fromCoroutine(watcher.run())
    server.sent()
    server.say(b"* ENABLED QRESYNC", b"M1 OK")
    server.sent()
    server.say(b"* 2 EXISTS", b"* OK [UIDVALIDITY 1] x", b"M2 OK [READ-ONLY] done")
    server.sent()
    server.say(b"* SEARCH 5 6", b"M3 OK")
    tag = idle_tag(server)
    # Two new messages; one vanishes before we learned its UID.
    server.say(b"+ idling", b"* 4 EXISTS")
    assert server.sent() == [b"DONE"]
    server.say(b"* VANISHED 8")
    server.say(tag + b" OK")
    rebuild = server.sent()
    assert rebuild[0].endswith(b"UID SEARCH ALL"), rebuild
    server.say(b"* SEARCH 5 6 7", server.tag(rebuild[0]) + b" OK")
    assert len(watcher.map) == 3 and watcher.map.complete
    assert ("expunged", (8,)) in server.events.log
    server.say(b"* 4 EXISTS")  # one more arrives: the map must see it as new
    assert server.events.log[-1] == ("new",)


class FakeAlarm:
    """Stands in for the kernel's clock-set alarm: a test says when the clock was set."""

    def __init__(self, on_set: Any) -> None:
        self.on_set = on_set
        self.closed = False

    def fileno(self) -> int:
        return 99

    def doRead(self) -> None:  # noqa: N802
        self.on_set()

    def close(self) -> None:
        self.closed = True


def test_with_a_clock_alarm_an_idle_daemon_is_not_woken_and_a_resume_is_noticed() -> None:
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    wall = [1000.0]
    mono = [50.0]
    jumps: list[float] = []
    alarms: list[FakeAlarm] = []

    def factory(on_set: Any) -> FakeAlarm:
        alarms.append(FakeAlarm(on_set))
        return alarms[-1]

    detector = ClockJumpDetector(jumps.append, reactor, threshold=30, wall=lambda: wall[0],
                                 monotonic=lambda: mono[0], alarm_factory=factory)
    detector.start()
    (alarm,) = alarms
    assert not detector.polling
    assert reactor.getDelayedCalls() == [], "no timer: nothing wakes an idle daemon"
    assert alarm in reactor.getReaders()
    # A day of normal time, the wall clock slewed a little by NTP: no alarm, nothing to do.
    wall[0] += 86400 + 2
    mono[0] += 86400
    reactor.advance(86400)
    assert jumps == []
    # An NTP step of a few seconds sets the clock: the alarm fires, the jump is too small to matter.
    wall[0] += 3
    alarm.doRead()
    assert jumps == []
    # Resume after an hour asleep: the kernel fires the alarm; only the wall clock moved.
    wall[0] += 3600
    alarm.doRead()
    assert jumps == [3600]
    detector.stop()
    assert alarm.closed and alarm not in reactor.getReaders()


def test_where_the_alarm_cannot_be_had_the_detector_falls_back_to_polling() -> None:
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    detector = ClockJumpDetector(lambda jump: None, reactor, interval=5, alarm_factory=lambda on_set: None)
    detector.start()
    assert detector.polling and len(reactor.getDelayedCalls()) == 1
    detector.stop()
    assert reactor.getDelayedCalls() == []


# -- renewals share wakeups ---------------------------------------------------------

def test_watchers_that_started_idling_seconds_apart_renew_in_one_wakeup() -> None:
    clock = task.Clock()
    clock.advance(1_000_007.0)
    servers = []
    for _ in range(5):
        server = Server()
        server.clock = clock
        server.client._clock = clock
        watcher, _ = server.start()
        idle_tag(server)
        server.say(b"+ idling")
        servers.append(server)
        clock.advance(3)  # the next watcher comes up a few seconds later
    due = {round(call.getTime(), 6) for call in clock.getDelayedCalls()}
    assert len(due) == 1, f"one renewal instant for all, not {sorted(due)}"
    (at,) = due
    assert 1_000_007.0 + 4 * 3 + RENEW - 60 < at <= 1_000_007.0 + RENEW, "early by less than the slack, never late"
    clock.advance(at - clock.seconds())
    assert all(s.sent() == [b"DONE"] for s in servers)


def renew(server: Server) -> None:
    """Let the IDLE renewal fire and answer its DONE, up to the re-EXAMINE."""
    tag = idle_tag(server)
    server.say(b"+ idling")
    server.clock.advance(RENEW)
    assert server.sent() == [b"DONE"]
    server.say(tag + b" OK")


def test_expunge_during_the_renewal_search_is_not_translated_through_the_old_map() -> None:
    """Issue #11 item 2: no QRESYNC; between the re-EXAMINE and its UID SEARCH an EXPUNGE comes.

    The server dropped UID 10 without a word (a new EXAMINE renumbers), so
    in the new session 20 is number 1 and 30 number 2; ``* 2 EXPUNGE`` is
    30. Through the old map (10, 20, 30) it would have named 20, which
    still exists, and left 30.
    """
    server = Server()
    watcher, _ = server.start(uids=[10, 20, 30])
    renew(server)
    examine = server.sent()
    server.say(b"* 2 EXISTS", b"* OK [UIDVALIDITY 42] ok", server.tag(examine[-1]) + b" OK [READ-ONLY] done")
    search = server.sent()
    assert search[-1].endswith(b"UID SEARCH ALL")
    # The listing was made before the expunge: it must be asked for again.
    server.say(b"* 2 EXPUNGE", b"* SEARCH 20 30", server.tag(search[-1]) + b" OK")
    assert ("expunged", (20,)) not in server.events.log, "20 still exists"
    again = server.sent()
    assert again[-1].endswith(b"UID SEARCH ALL"), again
    server.say(b"* SEARCH 20", server.tag(again[-1]) + b" OK")
    expunged = {uid for e in server.events.log if e[0] == "expunged" for uid in e[1]}
    assert 20 not in expunged, server.events.log
    assert expunged == {10, 30}
    assert watcher.map.uids() == [20]
    assert [e for e in server.events.log if e[0] == "resync"] == []
    idle_tag(server)


def test_expunge_of_a_message_unknown_to_both_maps_during_renewal_asks_for_resync() -> None:
    server = Server()
    watcher, _ = server.start(uids=[10, 20])
    renew(server)
    examine = server.sent()
    # 30 came and went while the watcher was re-reading: neither map names it.
    server.say(b"* 3 EXISTS", b"* OK [UIDVALIDITY 42] ok", server.tag(examine[-1]) + b" OK [READ-ONLY] done")
    search = server.sent()
    server.say(b"* 3 EXPUNGE", server.tag(search[-1]) + b" OK")  # no SEARCH line: suspect anyway
    again = server.sent()
    assert again[-1].endswith(b"UID SEARCH ALL"), again
    server.say(b"* SEARCH 10 20", server.tag(again[-1]) + b" OK")
    assert watcher.map.uids() == [10, 20]
    assert not [e for e in server.events.log if e[0] == "expunged"]
    assert server.events.log[-1][0] == "resync"


def test_flag_change_by_number_during_renewal_is_not_translated_but_resynced() -> None:
    server = Server()
    watcher, _ = server.start(uids=[10, 20, 30])
    renew(server)
    examine = server.sent()
    server.say(b"* 2 EXISTS", b"* OK [UIDVALIDITY 42] ok", server.tag(examine[-1]) + b" OK [READ-ONLY] done")
    search = server.sent()
    server.say(b"* 1 FETCH (FLAGS (\\Seen))", b"* SEARCH 20 30", server.tag(search[-1]) + b" OK")
    assert not [e for e in server.events.log if e[0] == "flags"], "number 1 is 20 now, not 10"
    assert ("expunged", (10,)) in server.events.log
    assert server.events.log[-1][0] == "resync"


def test_expunge_during_the_first_search_lists_again_instead_of_dropping() -> None:
    server = Server()
    watcher = server.watcher()
    defer.Deferred.fromCoroutine(watcher.run())
    server.sent()
    server.say(b"* 3 EXISTS", b"* OK [UIDVALIDITY 42] ok", b"M1 OK [READ-ONLY] done")
    assert server.sent() == [b"M2 UID SEARCH ALL"]
    server.say(b"* 1 EXPUNGE", b"* SEARCH 1 2 3", b"M2 OK")
    assert not server.aborted
    assert server.sent() == [b"M3 UID SEARCH ALL"]
    server.say(b"* SEARCH 2 3", b"M3 OK")
    assert watcher.map.uids() == [2, 3]
    assert server.events.log == [("watching",)]


def test_uids_learned_across_an_expunge_are_asked_for_again() -> None:
    """A FETCH's sequence numbers predate an EXPUNGE that came with it: not learned as they are."""
    server = Server()
    watcher, _ = server.start(uids=[10, 20, 30])
    tag = idle_tag(server)
    server.say(b"+ idling", b"* 5 EXISTS")
    assert server.sent() == [b"DONE"]
    server.say(tag + b" OK")
    learn = server.sent()
    assert learn[0].endswith(b"FETCH 4:* (UID FLAGS)")
    server.say(b"* 4 FETCH (UID 40 FLAGS ())", b"* 1 EXPUNGE", server.tag(learn[0]) + b" OK")
    again = server.sent()
    assert again[0].endswith(b"FETCH 3:* (UID FLAGS)"), again
    assert watcher.map.uids() == [20, 30, None, None]
    server.say(b"* 3 FETCH (UID 40 FLAGS ())", b"* 4 FETCH (UID 50 FLAGS ())", server.tag(again[0]) + b" OK")
    assert watcher.map.uids() == [20, 30, 40, 50]


def test_idle_flag_events_carry_no_recent() -> None:
    """``\\Recent`` is the session's, not the message's (issue #11 item 7)."""
    server = Server()
    server.start(uids=[10])
    idle_tag(server)
    server.say(b"+ idling", b"* 1 FETCH (FLAGS (\\Recent \\Seen))")
    assert server.events.log[-1] == ("flags", {10: frozenset({"\\Seen"})})


# -- servers whose IDLE does not push (stock Courier) -------------------------


def test_courier_plain_idle_is_reentered_every_few_seconds_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    from mirrord.watcher import NO_PUSH_RENEW

    server = Server()
    server.client.label = "courier/INBOX"
    watcher, _ = server.start()
    watcher.label = "courier/INBOX"
    tag = idle_tag(server)
    server.say(b"+ entering idle mode")
    assert watcher.pushes is False
    server.clock.advance(NO_PUSH_RENEW - 0.1)
    assert server.sent() == []
    server.clock.advance(0.1)
    assert server.sent() == [b"DONE"], "a bare re-entry: Courier looks at the mailbox at DONE and IDLE"
    # Courier reports what it held back at DONE: the new mail is announced now, not a minute later.
    server.say(b"* 4 EXISTS", tag + b" OK IDLE completed")
    assert ("new",) in server.events.log
    learn = server.sent()
    assert learn[0].endswith(b"FETCH 4:* (UID FLAGS)"), learn
    server.say(b"* 4 FETCH (UID 9 FLAGS ())", server.tag(learn[0]) + b" OK")
    tag = idle_tag(server)  # no EXAMINE: a short re-entry is not a renewal
    server.say(b"+ entering idle mode")
    server.clock.advance(NO_PUSH_RENEW)
    assert server.sent() == [b"DONE"]
    server.say(tag + b" OK IDLE completed")
    idle_tag(server)
    server.say(b"+ entering idle mode")
    warnings = [r for r in caplog.records if "does not push" in r.getMessage() and r.levelname == "WARNING"]
    assert len(warnings) == 1, "said once, not at every re-entry"
    assert "every 5 s" in warnings[0].getMessage()


def test_the_full_renewal_still_comes_on_time_between_short_reentries() -> None:
    from mirrord.watcher import NO_PUSH_RENEW

    server = Server()
    server.start(idle_renew=60.0)
    examines = 0
    for _ in range(40):
        tag = idle_tag(server)
        server.say(b"+ entering idle mode")
        server.clock.advance(NO_PUSH_RENEW)
        assert server.sent() == [b"DONE"]
        server.say(tag + b" OK IDLE completed")
        if server.transport.value().endswith(b'EXAMINE "INBOX"\r\n'):
            examines += 1
            renew_examine(server)
    # 200 s of re-entries every 5 s: the mailbox is looked at afresh every 60 s (coalesced: a little sooner).
    assert examines in (3, 4), examines


@pytest.mark.parametrize("continuation", [b"+ idling", b"+ entering ENHANCED idle mode", b"+ OK"])
def test_a_server_that_pushes_is_left_alone(continuation: bytes) -> None:
    server = Server()
    watcher, _ = server.start()
    idle_tag(server)
    server.say(continuation)
    assert watcher.pushes is True
    server.clock.advance(RENEW - 1)
    assert server.sent() == []


def test_status_says_when_idle_is_reentered_because_the_server_does_not_push() -> None:
    server = Server()
    service = WatcherService(
        connect=lambda label: defer.succeed(server.client),  # type: ignore[arg-type,return-value]
        raw_name=b"INBOX", listener=server.events, clock=server.clock, label="st/INBOX",
        idle_renew=RENEW, poll_interval=POLL,
    )
    service.start()
    server.sent()
    server.say(b"* 0 EXISTS", b"* OK [UIDVALIDITY 42] ok", b"M1 OK [READ-ONLY] done")
    idle_tag(server)
    server.say(b"+ entering idle mode")
    assert service.display_state == "idling, re-entered every 5 s (server does not push)"


def test_the_sequence_map_holds_a_few_bytes_per_message() -> None:
    """A watcher keeps its map for the daemon's life: 4 bytes a message, not an int object each (issue #15)."""
    import tracemalloc

    uids = range(1, 100_001)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        seqmap = SequenceMap(uids)
        seqmap.exists(100_010)
        seqmap.learn({100_001 + i: 200_000 + i for i in range(10)})
        seqmap.expunge(5)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        if started:
            tracemalloc.stop()
    assert held < 6 * 100_010, held
    assert len(seqmap) == 100_009 and seqmap.complete
    assert seqmap.uid(5) == 6 and seqmap.uid(100_009) == 200_009
