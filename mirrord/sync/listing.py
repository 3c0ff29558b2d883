"""The three ways of looking at a server mailbox: QRESYNC, CONDSTORE, plain.

:func:`look` returns a :class:`ServerView`: the EXAMINE's status and either
the complete ``UID FLAGS RFC822.SIZE`` listing, or (resuming from a recorded
HIGHESTMODSEQ) only what changed since plus the messages above our highest
UID. Nothing here reads or writes local state beyond the callable it is given.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from twisted.internet import defer

from mirrord.flags import Flags
from mirrord.pool import Worker
from mirrord.protocol.client import ListingEntry, MailboxStatus, MirrordIMAP4Client
from mirrord.protocol.errors import CommandFailed
from mirrord.store.state import MailboxRecord
from mirrord.sync.engine import ServerChanges


class CompactListing(Mapping[int, ListingEntry]):
    """A complete listing as three flat arrays: UIDs (ascending), sizes and flag sets.

    A listing lives through the whole fetch that follows it; as a dict of
    :class:`ListingEntry` it held about 170 bytes a message (17 MB at 100,000),
    alive beside everything the fetch builds. Here it is 16 bytes a message
    plus one ``frozenset`` per distinct flag set. Read as the dict was
    (``listing[uid].size``, ``uid in listing``, iteration in UID order); an
    entry is made when asked for.
    """

    __slots__ = ("_flag_index", "_flag_sets", "_next", "_sizes", "_uids")

    def __init__(self, listing: Mapping[int, ListingEntry]) -> None:
        uids = sorted(listing)
        self._uids = array("I", uids) if array("I").itemsize >= 4 else array("L", uids)
        self._sizes = array("q", (-1 if (size := listing[uid].size) is None else size for uid in uids))
        index: dict[Flags, int] = {}
        self._flag_index = array("I", (index.setdefault(listing[uid].flags, len(index)) for uid in uids))
        self._flag_sets: list[Flags] = list(index)
        self._next = 0
        """Where the UID after the last one found sits: callers mostly go in UID order."""

    def _position(self, uid: object) -> int:
        uids = self._uids
        i = self._next
        try:
            if i < len(uids) and uids[i] == uid:
                self._next = i + 1
                return i
            if i and uids[i - 1] == uid:  # asked twice in a row (``in``, then ``[]``)
                return i - 1
            i = bisect_left(uids, uid)  # type: ignore[call-overload]
        except TypeError:
            return -1
        if i < len(uids) and uids[i] == uid:
            self._next = i + 1
            return i
        return -1

    def __getitem__(self, uid: int) -> ListingEntry:
        i = self._position(uid)
        if i < 0:
            raise KeyError(uid)
        size = self._sizes[i]
        return ListingEntry(self._flag_sets[self._flag_index[i]], None if size < 0 else size)

    def flags(self, uid: int) -> Flags:
        """``self[uid].flags`` without making the entry."""
        i = self._position(uid)
        if i < 0:
            raise KeyError(uid)
        return self._flag_sets[self._flag_index[i]]

    def __contains__(self, uid: object) -> bool:
        return self._position(uid) >= 0

    def __iter__(self) -> Iterator[int]:
        return iter(self._uids)

    def __len__(self) -> int:
        return len(self._uids)


@dataclass(frozen=True)
class ServerView:
    """What one look at the server's mailbox gave."""

    worker: Worker
    """The worker that looked: it has the mailbox selected."""
    status: MailboxStatus
    listing: Mapping[int, ListingEntry]
    """Complete (a :class:`CompactListing`) when ``changes`` is None; else only the messages above our highest UID."""
    changes: ServerChanges | None = None


async def listing_after_examine(
    client: MirrordIMAP4Client, uids: bytes = b"1:*"
) -> dict[int, ListingEntry] | None:
    """The listing pipelined behind an EXAMINE, or None if the server refused it.

    Sent before EXISTS is known, so it may meet an empty mailbox, where some
    servers refuse ``1:*``; the caller, which by then has the EXAMINE's
    answer, decides whether to ask again.
    """
    try:
        return await client.uid_fetch_listing(uids)
    except CommandFailed:
        return None


async def look(
    worker: Worker,
    raw: bytes,
    record: MailboxRecord | None,
    highest: int,
    recorded_uids: Callable[[], set[int]],
) -> ServerView:
    """Look at the server's mailbox: what changed since the last complete sync, or all of it.

    With QRESYNC on, the EXAMINE itself brings the expunges and flag
    changes since the recorded HIGHESTMODSEQ, and only messages above
    our highest UID are listed. With CONDSTORE alone, a compact UID list
    (for expunges and new mail) and the flags changed since. Otherwise,
    or when the server cannot answer from that modseq (a new UIDVALIDITY,
    NOMODSEQ), the complete ``UID FETCH 1:* (UID FLAGS RFC822.SIZE)``.
    """
    client = await worker.connection()
    since = record.highestmodseq if record is not None else None
    if since is not None and record is not None and "QRESYNC" in client.enabled:
        # The messages above our highest UID are listed in the same round
        # trip as the EXAMINE; ``n:*`` also returns the highest message
        # when its UID is below n, hence the filter.
        above = b"%d:*" % (highest + 1)
        status, listing = await worker.examine_then(
            raw, lambda c: listing_after_examine(c, above), qresync=(record.uidvalidity, since)
        )
        if status.resynced and status.highestmodseq is not None:
            if listing is None:
                listing = await client.uid_fetch_listing(above) if status.exists else {}
            new = {uid: entry for uid, entry in listing.items() if uid > highest}
            changes = ServerChanges(
                status.uidvalidity, status.exists, status.vanished, status.changed, frozenset(new)
            )
            return ServerView(worker, status, new, changes)
        # Renumbered, or no modseq to resume from: the complete listing.
        listing = await client.uid_fetch_listing() if status.exists else {}
        return ServerView(worker, status, CompactListing(listing), None)
    elif since is not None and record is not None and "CONDSTORE" in client.capabilities:
        status = await worker.examine(raw, condstore="CONDSTORE" not in client.enabled)
        if status.uidvalidity == record.uidvalidity and status.highestmodseq is not None:
            # Both in flight at once: one round trip.
            d_uids = defer.Deferred.fromCoroutine(client.uid_search_all())
            d_changed = (
                defer.Deferred.fromCoroutine(client.uid_fetch_changed(since))
                if status.highestmodseq != since
                else defer.succeed({})
            )
            try:
                uids, changed = await defer.gatherResults([d_uids, d_changed], consumeErrors=True)
            except defer.FirstError as e:
                e.subFailure.raiseException()  # the connection error itself, for the pool's retry
            new = {uid: ListingEntry(frozenset(), None) for uid in uids if uid > highest}
            mine = recorded_uids()
            changes = ServerChanges(
                status.uidvalidity, status.exists, frozenset(mine - uids), changed, frozenset(new)
            )
            return ServerView(worker, status, new, changes)
    else:
        status, listing = await worker.examine_then(raw, listing_after_examine)
        if listing is None:
            listing = await client.uid_fetch_listing() if status.exists else {}
        return ServerView(worker, status, CompactListing(listing), None)
    listing = await client.uid_fetch_listing() if status.exists else {}
    return ServerView(worker, status, CompactListing(listing), None)
