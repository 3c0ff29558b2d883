"""The IDLE watcher: one connection per mailbox that only listens.

A watcher logs in, EXAMINEs its mailbox, learns which UID sits at which
sequence number, and IDLEs. Every untagged response the server sends while
it listens becomes a :class:`~mirrord.interfaces.MailboxEvents` call, in
order. It never fetches a message body (the workers do that), so the
connection is either in IDLE or briefly out of it for a small command, and
nobody has to guess which.

Sequence numbers shift with every expunge; ``* 3 EXPUNGE`` only names a UID
through a map of the mailbox that is kept current across EXISTS (new
messages appended with UIDs still unknown, then learned) and EXPUNGE. With
QRESYNC the server names expunged UIDs itself (VANISHED). A (re-)EXAMINE
voids the map the moment it is sent: until a UID listing known to be current
stands in its place, no sequence number is translated at all (see
``IdleWatcher._build_map``).

:class:`WatcherService` keeps a watcher connected: reconnecting with
exponential backoff and jitter, and telling the listener ``watching()``
after every (re)connect once IDLE has been requested, which is when a
catch-up sync can start without missing anything.
"""

from __future__ import annotations

import logging
import random
import time
from array import array
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from mirrord.clockset import ClockSetAlarm
from mirrord.flags import Flags, message_flags
from mirrord.interfaces import MailboxEvents
from mirrord.protocol._parser import Untagged, as_flags, as_int, fetch_items
from mirrord.protocol.client import MirrordIMAP4Client, parse_uid_set
from mirrord.protocol.errors import (
    CommandFailed,
    ConnectFailed,
    LoginFailed,
    ProtocolError,
    TooManyConnections,
    describe_failure,
)
from mirrord.timers import coalesced_delay

log = logging.getLogger("mirrord.watcher")

DONE_TIMEOUT = 30.0
"""Seconds to wait for the tagged OK after DONE before calling the connection dead."""

NO_PUSH_RENEW = 5.0
"""Seconds between IDLE re-entries on a server whose IDLE does not push.

Stock Courier-IMAP looks at the mailbox when IDLE starts (and when it
ends), then only once a minute: measured, mail reached the mirror 1.6 to
58.6 s late (median 30.5 s). Leaving and re-entering IDLE makes it look
now, so changes arrive at most this long (plus a round trip and the fetch)
after they happen; each re-entry is one small round trip (DONE, OK, IDLE,
+) and a look at the mailbox by the server."""


def idle_pushes(continuation: str) -> bool:
    """Whether a server's IDLE pushes changes, as far as its ``+`` line says.

    Courier tells: ``+ entering idle mode`` is its plain IDLE, which polls
    once a minute; ``+ entering ENHANCED idle mode`` (IMAP_ENHANCEDIDLE)
    pushes. Other servers (Dovecot, Cyrus: ``+ idling``) are taken at
    their word that they push. Cyrus without its ``idled`` also polls and
    says the same ``+ idling``: that cannot be told from here.
    """
    return continuation.strip().lower() != "entering idle mode"


_told_no_push: set[str] = set()
"""Accounts whose log already says their server's IDLE does not push (said once per account)."""

class SequenceMapError(Exception):
    """The server's sequence numbers no longer agree with our map."""


_UID_TYPECODE = "I" if array("I").itemsize >= 4 else "L"


class SequenceMap:
    """Sequence number -> UID for one selected mailbox; ``None`` where not yet known.

    Pure bookkeeping, kept separate so that its arithmetic (the part that is
    easy to get subtly wrong) is tested on its own.

    Held as a flat array of 32-bit UIDs (0 where not known yet: UIDs start at
    1), 4 bytes a message: a watcher of a 100,000-message mailbox held 3.6 MB
    as a list of int objects, for the life of the daemon (issue #15).
    """

    def __init__(self, uids: Iterable[int] | None = None) -> None:
        self._uids = _uid_array(uids or ())

    def __len__(self) -> int:
        return len(self._uids)

    def uid(self, seq: int) -> int | None:
        if not 1 <= seq <= len(self._uids):
            raise SequenceMapError(f"sequence number {seq} outside 1..{len(self._uids)}")
        return self._uids[seq - 1] or None

    def exists(self, count: int) -> bool:
        """The server now counts ``count`` messages; True if that is more than we knew."""
        if count < len(self._uids):
            raise SequenceMapError(f"EXISTS {count} is below the {len(self._uids)} messages we know")
        grew = count > len(self._uids)
        if grew:
            self._uids.extend(array(_UID_TYPECODE, bytes(self._uids.itemsize * (count - len(self._uids)))))
        return grew

    def expunge(self, seq: int) -> int | None:
        """Remove the message at ``seq``; its UID, or None if it was never learned."""
        uid = self.uid(seq)
        del self._uids[seq - 1]
        return uid

    def vanished(self, uids: set[int]) -> bool:
        """Remove these UIDs; False if some could not be found (they may be unlearned ones)."""
        before = len(self._uids)
        self._uids = array(_UID_TYPECODE, (u for u in self._uids if not u or u not in uids))
        return before - len(self._uids) == len(uids)

    @property
    def complete(self) -> bool:
        return 0 not in self._uids

    def first_unknown(self) -> int | None:
        try:
            return self._uids.index(0) + 1
        except ValueError:
            return None

    def uids(self) -> list[int | None]:
        return [u or None for u in self._uids]

    def learn(self, found: dict[int, int]) -> None:
        for seq, uid in found.items():
            if 1 <= seq <= len(self._uids):
                self._uids[seq - 1] = _check_uid(uid)


def _check_uid(uid: int) -> int:
    if not 1 <= uid <= 0xFFFFFFFF:
        raise SequenceMapError(f"UID {uid} is not a 32-bit UID")
    return uid


def _uid_array(uids: Iterable[int]) -> array[int]:
    try:
        made = array(_UID_TYPECODE, uids)
    except OverflowError:
        raise SequenceMapError("a UID beyond 32 bits") from None
    if 0 in made:
        raise SequenceMapError("UID 0")
    return made


class Backoff:
    """Exponential backoff with full jitter, so many clients do not retry in step."""

    def __init__(self, first: float = 1.0, cap: float = 300.0, rng: random.Random | None = None) -> None:
        self.first = first
        self.cap = cap
        self._rng = rng or random.Random()
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next(self, floor: float = 0.0) -> float:
        """The next delay: half fixed, half random, doubling up to the cap."""
        ceiling = min(self.cap, self.first * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 32)
        return max(floor, ceiling / 2 + self._rng.uniform(0, ceiling / 2))


class IdleWatcher:
    """One watching session on a logged-in connection; returns or raises when it ends."""

    def __init__(
        self,
        client: MirrordIMAP4Client,
        raw_name: bytes,
        listener: MailboxEvents,
        *,
        clock: IReactorTime,
        label: str,
        idle_renew: float,
        poll_interval: float,
        done_timeout: float = DONE_TIMEOUT,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.raw_name = raw_name
        self.listener = listener
        self.clock = clock
        self.label = label
        self.idle_renew = idle_renew
        self.poll_interval = poll_interval
        self.map = SequenceMap()
        self.uidvalidity: int | None = None
        self.on_change: Callable[[], None] = on_change or (lambda: None)
        self._state = "starting"
        self._session: Any = None
        self._renewal: IDelayedCall | None = None
        self._stopping = False
        self._poll_wait: defer.Deferred[None] | None = None
        self._rebuild = False
        self._reexamine = False
        self._building: _MapBuild | None = None
        self._expunge_epoch = 0
        self.pushes: bool | None = None
        """Whether the server's IDLE pushes changes (None until IDLE started); see :func:`idle_pushes`."""
        self._full_renewal_at: float | None = None
        client.command_timeout = done_timeout

    @property
    def state(self) -> str:
        """starting, idling, renewing, polling, or stopped: what `mirrord status` shows."""
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        if value != self._state:
            self._state = value
            self.on_change()

    # -- running ------------------------------------------------------------

    async def run(self) -> None:
        client = self.client
        client.on_unsolicited = self._event
        if "QRESYNC" in client.capabilities:
            await client.enable("QRESYNC")
        # Nothing is announced yet: the full sync ``watching()`` starts covers it all.
        await self._examine(announce=False)
        use_idle = "IDLE" in client.capabilities
        if not use_idle:
            log.warning("%s: server has no IDLE; polling every %g s", self.label, self.poll_interval)
        announced = False
        while not self._stopping:
            if use_idle:
                session = client.idle()
                self._session = session
                if not announced:
                    # IDLE is requested: every change from here on reaches us.
                    announced = True
                    self.listener.watching()
                if not await session.idling:
                    refused = session.refused
                    self._session = None
                    if refused is not None and refused.check(CommandFailed):
                        log.warning("%s: server refused IDLE (%s); polling every %g s",
                                    self.label, refused.value.text, self.poll_interval)
                        use_idle = False
                        continue
                    if refused is not None:
                        refused.raiseException()
                    continue
                self._note_push(session.text)
                self.state = "idling"
                self._schedule_renewal()
                try:
                    await session.finished
                finally:
                    self._cancel_renewal()
                    self._session = None
                self.state = "renewing"
            else:
                self.state = "polling"
                if not announced:
                    announced = True
                    self.listener.watching()
                await client.noop()
            await self._learn_new_uids()
            if not use_idle and not self._stopping:
                self._poll_wait = task.deferLater(self.clock, self.poll_interval, lambda: None)
                try:
                    await self._poll_wait
                except defer.CancelledError:
                    pass
                self._poll_wait = None
        self.state = "stopped"

    def _note_push(self, continuation: str) -> None:
        pushes = idle_pushes(continuation)
        if pushes == self.pushes:
            return
        self.pushes = pushes
        self.on_change()
        if pushes:
            return
        account = self.label.split("/", 1)[0]
        level = logging.DEBUG if account in _told_no_push else logging.WARNING
        _told_no_push.add(account)
        log.log(
            level,
            "%s: the server's IDLE does not push changes (it says %r: it looks at the mailbox only now and"
            " then); re-entering IDLE every %g s, so changes arrive within about %g s",
            self.label, continuation.strip(), self.no_push_renew, self.no_push_renew,
        )

    @property
    def no_push_renew(self) -> float:
        return min(NO_PUSH_RENEW, self.idle_renew)

    def _schedule_renewal(self) -> None:
        """Renew IDLE every ``idle_renew``; on a server that does not push, re-enter it every few seconds too.

        The full renewal (re-EXAMINE, as in :meth:`_renew`) keeps its own
        deadline across the short re-entries, which are a bare DONE and IDLE.
        """
        now = self.clock.seconds()
        if self.pushes is not False or self._full_renewal_at is None or self._full_renewal_at <= now:
            self._full_renewal_at = now + coalesced_delay(now, self.idle_renew)
        full = self._full_renewal_at - now
        if self.pushes is False and self.no_push_renew < full:
            self._renewal = self.clock.callLater(self.no_push_renew, self._reenter)
        else:
            self._renewal = self.clock.callLater(full, self._renew)

    def _reenter(self) -> None:
        """Leave and re-enter IDLE, so that a server that does not push looks at the mailbox now."""
        self._renewal = None
        self._end_idle()

    def _renew(self) -> None:
        """Leave and re-enter IDLE before a server or NAT box gives up on us."""
        self._renewal = None
        self._reexamine = True
        self._full_renewal_at = None
        log.debug("%s: renewing IDLE", self.label)
        self._end_idle()

    async def _examine_again(self) -> None:
        """Look at the mailbox afresh, as a renewal does.

        A server may say nothing when the selected mailbox is deleted and
        created anew (Dovecot does not): our session would idle on the old
        one forever. A new UIDVALIDITY shows it; the listener then syncs.
        """
        self._reexamine = False
        await self._examine(announce=True)

    async def _examine(self, *, announce: bool) -> None:
        """(Re-)EXAMINE the mailbox and build its sequence map anew.

        The old map is void from the moment EXAMINE is sent: the server
        numbers its messages afresh, and what it dropped silently since is
        gone from that numbering. Nothing that arrives until the new map
        stands is translated through the old one (see :meth:`_build_map`).
        With ``announce``, what the old and new maps disagree on reaches the
        listener: a UID of the old map absent from the new complete listing
        (same UIDVALIDITY) was expunged.
        """
        old = self.map
        build = self._building = _MapBuild(announce=announce)
        try:
            status = await self.client.examine(self.raw_name)
        finally:
            self._building = None
        build.count = status.exists
        await self._build_map(build)
        if status.uidvalidity != self.uidvalidity:
            known = self.uidvalidity is not None
            self.uidvalidity = status.uidvalidity
            if known:
                self.listener.resync_needed("the mailbox was recreated on the server (new UIDVALIDITY)")
            return
        if not announce:
            return
        present = set(self.map.uids())
        gone = sorted(uid for uid in old.uids() if uid is not None and uid not in present)
        if gone:
            self.listener.expunged(gone)
        if build.expunges > len(gone):
            self.listener.resync_needed("messages were expunged while the watcher re-read the mailbox")
        elif build.flags_lost:
            self.listener.resync_needed("flags changed while the watcher re-read the mailbox")

    async def _build_map(self, build: _MapBuild) -> None:
        """List the mailbox's UIDs until one listing is known to be current; install it.

        A listing is current when no EXISTS, EXPUNGE or VANISHED arrived
        while its UID SEARCH ran (RFC 3501 allows EXPUNGE during UID
        commands) and it counts at least the messages the session was told
        of. Until then ``self._building`` catches those responses, so none
        is translated through a map the server has invalidated.
        """
        self._building = build
        try:
            for _ in range(MAP_ATTEMPTS):
                build.changed = False
                uids = await self.client.uid_search(b"ALL") if build.count != 0 else []
                if build.changed or (build.count is not None and len(uids) < build.count):
                    continue
                self.map = SequenceMap(uids)
                if build.count is not None and len(uids) > build.count and build.announce:
                    # The listing saw mail whose EXISTS has not come (yet): fetch it now.
                    self.listener.new_messages()
                return
        finally:
            self._building = None
        raise ProtocolError("the mailbox kept changing while the watcher listed it")

    def _end_idle(self) -> None:
        """Send DONE; a renewal still pending is moot and cancelled."""
        self._cancel_renewal()
        if self._session is not None:
            self._session.done()

    def _cancel_renewal(self) -> None:
        if self._renewal is not None and self._renewal.active():
            self._renewal.cancel()
        self._renewal = None

    async def _learn_new_uids(self) -> None:
        if self._reexamine and not self._stopping:
            await self._examine_again()
        if self._rebuild and not self._stopping:
            # A VANISHED named a message whose UID we had not learned yet:
            # which position it held is unknowable, so list the mailbox anew.
            self._rebuild = False
            # How many messages the session has is not known either.
            await self._build_map(_MapBuild(announce=True))
            self.listener.new_messages()
        while (first := self.map.first_unknown()) is not None and not self._stopping:
            epoch = self._expunge_epoch
            found = await self.client.fetch_uids(first)
            if self._expunge_epoch != epoch:
                # Its sequence numbers are from before an expunge: ask again.
                continue
            self.map.learn(found)
            if self.map.first_unknown() == first:
                raise ProtocolError(f"server gave no UID for message {first}")

    def check_now(self) -> None:
        """Prove the connection is alive: leave IDLE now; the DONE deadline catches a dead one."""
        if self._session is not None:
            log.info("%s: checking the connection", self.label)
            self._end_idle()
        elif self.state == "polling" and self._poll_wait is not None:
            self._poll_wait.cancel()  # poll now

    async def stop(self) -> None:
        """Leave IDLE and log out, politely but promptly."""
        self._stopping = True
        self._end_idle()
        if self._poll_wait is not None:
            self._poll_wait.cancel()

    # -- events -------------------------------------------------------------

    def _event(self, response: Untagged) -> None:
        try:
            self._dispatch(response)
        except SequenceMapError as e:
            # Our picture of the mailbox is wrong: start over on a new connection.
            self.listener.resync_needed(str(e))
            self.client.drop(f"lost track of sequence numbers: {e}")

    def _dispatch(self, response: Untagged) -> None:
        if self._building is not None:
            self._dispatch_building(self._building, response)
            return
        kind = response.kind
        if kind == "EXISTS" and response.number is not None:
            if self.map.exists(response.number):
                self.listener.new_messages()
                # Learn the new UIDs now, so a later EXPUNGE can be named.
                self._end_idle()
        elif kind == "EXPUNGE" and response.number is not None:
            self._expunge_epoch += 1
            uid = self.map.expunge(response.number)
            if uid is None:
                self.listener.resync_needed("a message was expunged before its UID was known")
            else:
                self.listener.expunged([uid])
        elif kind == "VANISHED":
            data = response.data
            if data and isinstance(data[0], list):  # (EARLIER): old news, handled by resync
                data = data[1:]
            if not data or not isinstance(data[0], bytes):
                raise ProtocolError("malformed VANISHED response")
            uids = parse_uid_set(data[0])
            self._expunge_epoch += 1
            if not self.map.vanished(uids) and not self.map.complete:
                self._rebuild = True
                self._end_idle()
            self.listener.expunged(sorted(uids))
        elif kind == "FETCH" and response.number is not None:
            items = fetch_items(response)
            if "FLAGS" not in items:
                return
            flags: Flags = message_flags(as_flags(items["FLAGS"]))
            uid = as_int(items["UID"], "UID") if "UID" in items else self.map.uid(response.number)
            if uid is None:
                # A brand-new message; its fetch takes the flags it has then,
                # but this change may come after: compare listings to be sure.
                self.listener.resync_needed("flags changed on a message whose UID is not known yet")
            else:
                self.listener.flags_changed({uid: flags})
        else:
            self._dispatch_plain(response)

    def _dispatch_building(self, build: _MapBuild, response: Untagged) -> None:
        """A response that came while no valid map exists: never translate its numbers.

        EXISTS and expunges make the listing in flight suspect (it is
        repeated); expunged sequence numbers are counted, for the old and
        new maps' difference to account for; UIDs (VANISHED, FETCH with UID)
        are passed on as they are.
        """
        kind = response.kind
        if kind == "EXISTS" and response.number is not None:
            build.changed = True
            grew = build.count is not None and response.number > build.count
            build.count = response.number
            if grew and build.announce:
                self.listener.new_messages()
        elif kind == "EXPUNGE" and response.number is not None:
            build.changed = True
            build.expunges += 1
            self._expunge_epoch += 1
            if build.count is not None:
                build.count = max(0, build.count - 1)
        elif kind == "VANISHED":
            data = response.data
            if data and isinstance(data[0], list):  # (EARLIER): old news, handled by resync
                return
            if not data or not isinstance(data[0], bytes):
                raise ProtocolError("malformed VANISHED response")
            uids = parse_uid_set(data[0])
            build.changed = True
            self._expunge_epoch += 1
            if build.count is not None:
                build.count = max(0, build.count - len(uids))
            if build.announce:
                self.listener.expunged(sorted(uids))
        elif kind == "FETCH" and response.number is not None:
            items = fetch_items(response)
            if "FLAGS" not in items:
                return
            if "UID" in items:
                if build.announce:
                    self.listener.flags_changed({as_int(items["UID"], "UID"): message_flags(as_flags(items["FLAGS"]))})
            else:
                build.flags_lost = True
        else:
            self._dispatch_plain(response)

    def _dispatch_plain(self, response: Untagged) -> None:
        kind = response.kind
        if kind == "BYE":
            log.info("%s: server is closing the connection: %s", self.label, response.text)
        elif kind in ("OK", "NO", "BAD") and response.text:
            log.debug("%s: server says %s %s", self.label, kind, response.text)


MAP_ATTEMPTS = 5
"""UID listings tried while the mailbox keeps changing under them, before reconnecting."""


class _MapBuild:
    """What arrived while a sequence map was being built (and so could not be translated)."""

    def __init__(self, *, announce: bool, count: int | None = None) -> None:
        self.announce = announce
        """Tell the listener (not before the first ``watching()``: its full sync covers it)."""
        self.count = count
        """The message count the session was last told; None where not known."""
        self.changed = False
        self.expunges = 0
        self.flags_lost = False


class ClockJumpDetector:
    """Notices a suspend and resume: the wall clock jumps ahead of the monotonic one.

    A laptop that slept for an hour comes back with connections its NAT box
    or the server dropped long ago, and nothing on the wire says so; without
    this, the first sign would be the next IDLE renewal, many minutes later.
    Linux's monotonic clock does not count time asleep, the wall clock does.

    The clocks are compared when the kernel says the wall clock was set
    (resume counts as a set: :mod:`mirrord.clockset`), so an idle daemon is
    not woken every few seconds to look. Where that alarm is not available
    (not Linux, or a reactor without file descriptors such as ``task.Clock``)
    the clocks are compared every ``interval`` seconds instead.
    """

    def __init__(
        self,
        on_jump: Callable[[float], None],
        clock: IReactorTime,
        *,
        interval: float = 5.0,
        threshold: float = 30.0,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        alarm_factory: Callable[[Callable[[], None]], Any] = ClockSetAlarm.create,
    ) -> None:
        self.on_jump = on_jump
        self.threshold = threshold
        self._wall = wall
        self._monotonic = monotonic
        self._last = (wall(), monotonic())
        self._clock = clock
        self._alarm_factory = alarm_factory
        self._alarm: Any = None
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = clock
        self.interval = interval

    @property
    def polling(self) -> bool:
        """True when falling back to looking at the clocks every ``interval``."""
        return self._loop.running

    def start(self) -> None:
        self._last = (self._wall(), self._monotonic())
        add_reader = getattr(self._clock, "addReader", None)
        if add_reader is not None:
            self._alarm = self._alarm_factory(self.check)
        if self._alarm is not None:
            add_reader(self._alarm)
        else:
            log.debug("no clock-set alarm here; comparing the clocks every %g s", self.interval)
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._alarm is not None:
            self._clock.removeReader(self._alarm)  # type: ignore[attr-defined]
            self._alarm.close()
            self._alarm = None

    def check(self) -> None:
        """Compare the clocks now; call ``on_jump`` if the wall clock ran ahead by more than the threshold."""
        wall, mono = self._wall(), self._monotonic()
        jump = (wall - self._last[0]) - (mono - self._last[1])
        self._last = (wall, mono)
        if jump > self.threshold:
            log.info("the clock jumped %.0f s ahead (suspend and resume?): checking every connection", jump)
            self.on_jump(jump)


Connect = Callable[[str], Awaitable[MirrordIMAP4Client]]


class WatcherService:
    """Keeps one mailbox watched: connects, watches, and reconnects with backoff."""

    LOGIN_RETRY_FLOOR = 600.0
    """After a refused login, wait at least this long: hammering gets accounts locked."""
    STABLE_AFTER = 60.0
    """A session that lasted this long resets the backoff."""

    def __init__(
        self,
        *,
        connect: Connect,
        raw_name: bytes,
        listener: MailboxEvents,
        clock: IReactorTime,
        label: str,
        idle_renew: float,
        poll_interval: float,
        backoff: Backoff | None = None,
        on_change: Callable[[], None] | None = None,
        on_too_many: Callable[[str], None] | None = None,
    ) -> None:
        self._connect = connect
        self.on_too_many = on_too_many
        """Called (and the service stops) when the server refuses the connection as one too many;
        without it such a refusal is retried like any failed connect."""
        self.raw_name = raw_name
        self.listener = listener
        self.clock = clock
        self.label = label
        self.idle_renew = idle_renew
        self.poll_interval = poll_interval
        self.backoff = backoff or Backoff()
        self.on_change: Callable[[], None] = on_change or (lambda: None)
        """Called when ``display_state`` may have changed (for `mirrord status`)."""
        self.watcher: IdleWatcher | None = None
        self._state = "stopped"
        self.since: float = clock.seconds()
        """When ``state`` last changed: `mirrord status` shows "reconnecting since ..."."""
        self.last_error: str | None = None
        self._running = False
        self._loop: defer.Deferred[None] | None = None
        self._sleep: defer.Deferred[None] | None = None

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        if value != self._state:
            self._state = value
            self.since = self.clock.seconds()
            self.on_change()

    @property
    def display_state(self) -> str:
        """idling, polling, reconnecting, connecting or stopped.

        "idling" says how often IDLE is re-entered on a server whose IDLE does not push.

        A watcher renewing its IDLE (or learning new UIDs between two IDLEs)
        is still watching: it shows as idling, not as connecting.
        """
        if self._state == "watching" and self.watcher is not None:
            shown = {"idling": "idling", "renewing": "idling", "polling": "polling"}
            state = shown.get(self.watcher.state, "connecting")
            if state == "idling" and self.watcher.pushes is False:
                # Said in the table too: "idling" alone hid up to a minute's lag.
                return f"idling, re-entered every {self.watcher.no_push_renew:g} s (server does not push)"
            return state
        return self._state

    def check_now(self) -> None:
        """After a suspend: test the connection now, or reconnect now if waiting to."""
        if self.watcher is not None:
            self.watcher.check_now()
        elif self._sleep is not None:
            self._sleep.cancel()

    def start(self) -> None:
        self._running = True
        self._loop = defer.Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: log.error("%s: watcher stopped: %s", self.label, describe_failure(f)))

    async def stop(self) -> None:
        self._running = False
        if self._sleep is not None:
            self._sleep.cancel()
        watcher = self.watcher
        if watcher is not None:
            await watcher.stop()
        if self._loop is not None:
            try:
                await self._loop
            except Exception:  # noqa: BLE001 - stopping anyway
                pass

    async def _run(self) -> None:
        while self._running:
            started = self.clock.seconds()
            floor = 0.0
            client: MirrordIMAP4Client | None = None
            self.state = "connecting"
            try:
                client = await self._connect(self.label)
                if not self._running:
                    await client.logout()
                    return
                self.watcher = IdleWatcher(
                    client,
                    self.raw_name,
                    self.listener,
                    clock=self.clock,
                    label=self.label,
                    idle_renew=self.idle_renew,
                    poll_interval=self.poll_interval,
                    on_change=self.on_change,
                )
                self.state = "watching"
                await self.watcher.run()
                self.state = "stopped"
                await client.logout()
                return
            except LoginFailed as e:
                reason = str(e)
                floor = self.LOGIN_RETRY_FLOOR
            except TooManyConnections as e:
                if self.on_too_many is None:
                    reason = describe_failure(e)
                else:
                    # Reconnecting would be refused again: whoever owns the
                    # budget decides what this mailbox gets instead.
                    self._running = False
                    self.state = "stopped"
                    self.last_error = str(e)
                    self.on_too_many(str(e))
                    return
            except (ConnectFailed, ConnectionLost, ConnectionDone, ProtocolError, CommandFailed) as e:
                reason = describe_failure(e)
            except Exception as e:  # noqa: BLE001 - never let one mailbox's watcher die
                log.exception("%s: watcher failed", self.label)
                reason = repr(e)
            finally:
                self.watcher = None
                if client is not None and not client.connected_transport_lost and not self._running:
                    client.transport.loseConnection()
            if not self._running:
                return
            if self.clock.seconds() - started >= self.STABLE_AFTER:
                self.backoff.reset()
            delay = self.backoff.next(floor)
            self.state = "reconnecting"
            self.last_error = reason
            log.warning("%s: watcher disconnected (%s); reconnecting in %.0f s", self.label, reason, delay)
            self.listener.disconnected(reason)
            self._sleep = task.deferLater(self.clock, delay, lambda: None)
            try:
                await self._sleep
            except defer.CancelledError:
                if not self._running:
                    return
            finally:
                self._sleep = None
