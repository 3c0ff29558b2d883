"""The sync engine: pure decisions about one mailbox, no I/O.

Given what the server says (a complete UID -> flags listing under a UIDVALIDITY)
and what we have locally (the state DB's rows and the files actually present in
the Maildir), decide what to fetch, what to remove and whose flags to change.
Everything that touches the network or the disk lives elsewhere; keeping the
decisions here, free of I/O, is what lets them be tested exhaustively.

The mirror is one-way: the server is the truth. A local copy is removed only
on explicit server evidence (absence from a complete listing under an
unchanged UIDVALIDITY, DESIGN invariant 2); a UIDVALIDITY change never leads
to removal here (invariant 3).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from mirrord.flags import Flags, representable


@dataclass(frozen=True)
class ServerListing:
    """A complete listing of one mailbox as the server reported it."""

    uidvalidity: int
    messages: Mapping[int, Flags]
    """Every UID in the mailbox with its flags."""


@dataclass(frozen=True)
class KnownMessage:
    """A state DB row: a message we fetched and the server flags we last applied."""

    key: str
    """The Maildir unique name of its local file (the part before ``:2,``)."""
    flags: Flags


class Known(Protocol):
    """What the engine reads of a state row (KnownMessage, or the store's own record)."""

    @property
    def key(self) -> str: ...

    @property
    def flags(self) -> Flags: ...


@dataclass(frozen=True)
class LocalSnapshot:
    """What we have for one mailbox."""

    uidvalidity: int | None
    """UIDVALIDITY the state rows belong to; None if the mailbox was never synced."""
    known: Mapping[int, Known]
    """State rows by UID."""
    files: Mapping[str, Flags] | None
    """Files present in ``new/`` and ``cur/``: unique name -> flags their name carries.

    None when the directories were not listed because they are unchanged
    since a sync found every recorded file in place with its recorded flags:
    then each row's file is taken to be there, carrying ``representable(row.flags)``."""

    def file_flags(self, row: Known) -> Flags | None:
        """The flags ``row``'s file carries, or None if it is missing."""
        if self.files is None:
            return representable(row.flags)
        return self.files.get(row.key)


@dataclass(frozen=True)
class SyncPlan:
    """What to do to make the local copy equal the server's mailbox."""

    fetch: tuple[int, ...] = ()
    """UIDs to download, ascending: new on the server, or their local file went missing."""
    remove: tuple[int, ...] = ()
    """UIDs whose local copy goes: known locally, absent from the server's complete listing."""
    set_flags: Mapping[int, Flags] = field(default_factory=dict)
    """UID -> the server's flags, for kept messages whose recorded or on-disk flags differ."""
    forget_all: bool = False
    """Drop every state row first: they belong to an old UIDVALIDITY and none
    of their files exist any more, so there is nothing local to lose or to
    duplicate, and the mailbox is mirrored afresh."""

    @property
    def is_empty(self) -> bool:
        return not (self.fetch or self.remove or self.set_flags)


class UidValidityChanged(Exception):
    """The server's UIDVALIDITY differs from the one our state rows belong to.

    Until re-matching lands, the mailbox must stop with this error: acting on
    the new UIDs would remove or duplicate local mail.
    """

    def __init__(self, old: int, new: int) -> None:
        super().__init__(f"UIDVALIDITY changed from {old} to {new}")
        self.old = old
        self.new = new


def plan_sync(server: ServerListing, local: LocalSnapshot, *, two_way: bool = False) -> SyncPlan:
    """Decide how to bring ``local`` to equal ``server``.

    ``two_way``: a row whose file is gone is not fetched again here: it is a
    reader's deletion, which the two-way round (:mod:`mirrord.sync.pushing`)
    decides (and which asks for the fetch itself under ``local_delete: keep``).

    Raises UidValidityChanged when the listing belongs to another UIDVALIDITY
    than the state rows and any of their files is still there.
    """
    if (
        local.known
        and local.uidvalidity is not None
        and local.uidvalidity != server.uidvalidity
    ):
        # The rows name UIDs of a mailbox that no longer exists as such: diffing
        # them against the new UIDs would remove and re-fetch everything.
        if any(local.file_flags(row) is not None for row in local.known.values()):
            raise UidValidityChanged(local.uidvalidity, server.uidvalidity)
        # The user moved the old copies away (what the error tells them to
        # do): start afresh.
        return SyncPlan(fetch=tuple(sorted(server.messages)), forget_all=True)

    fetch: list[int] = []
    set_flags: dict[int, Flags] = {}
    known = local.known
    unlisted = local.files is None
    for uid in sorted(server.messages):
        server_flags = frozenset(server.messages[uid])
        row = known.get(uid)
        if row is None:
            fetch.append(uid)
            continue
        if unlisted and server_flags == row.flags:
            continue  # the common case, decided without looking further: nothing changed
        file_flags = local.file_flags(row)
        if file_flags is None:
            # The row outlived its file (a reader or the user deleted it); the
            # server still has the message, so the mirror must have it too,
            # unless the deletion is to reach the server (two-way).
            if not two_way:
                fetch.append(uid)
            continue
        if not same_flags(server_flags, row.flags) or not same_flags(
            file_flags, representable(server_flags)
        ):
            set_flags[uid] = server_flags

    # The only removal rule (invariant 2): known locally, absent from a complete
    # listing under the UIDVALIDITY the rows belong to. Files no row refers to
    # never enter the plan at all, so they cannot be touched.
    remove = tuple(sorted(uid for uid in local.known if uid not in server.messages))
    return SyncPlan(fetch=tuple(fetch), remove=remove, set_flags=set_flags)


def same_flags(a: Flags, b: Flags) -> bool:
    """Whether two flag sets name the same flags.

    Servers differ in how they spell system flags (``\\Seen``, ``\\SEEN``) but
    mean the same flag, so a respelling alone must not cause a rename of every
    file. Keywords are compared as sent: which spelling a keyword has is
    exactly what a mirror should reproduce.
    """
    return _canonical(a) == _canonical(b)


@functools.lru_cache(maxsize=4096)
def _canonical(flags: Flags) -> Flags:
    # Cached: a mailbox has few distinct flag sets, compared once per message.
    # ``\\Recent`` is a session's, not a message's: state rows written before
    # it was stripped on the way in may still hold it (flags.message_flags).
    return frozenset(f.lower() if f.startswith("\\") else f for f in flags) - {"\\recent"}


representable = functools.lru_cache(maxsize=4096)(representable)


def plan_changes(
    local: LocalSnapshot,
    expunged: Iterable[int] = (),
    flags: Mapping[int, Flags] | None = None,
) -> SyncPlan:
    """Turn a watcher's events into local actions, without a listing.

    An EXPUNGE or VANISHED for a UID is explicit server evidence (invariant
    2), so its copy goes. A flag change applies to a message we have; one we
    do not have yet gets its flags from its fetch. Events for UIDs we never
    had are ignored: a message can come and go between two looks.
    """
    remove = tuple(sorted({uid for uid in expunged if uid in local.known}))
    set_flags: dict[int, Flags] = {}
    for uid, server_flags in (flags or {}).items():
        row = local.known.get(uid)
        if row is None or uid in remove:
            continue
        file_flags = local.file_flags(row)
        if file_flags is None:
            continue  # the next full sync re-fetches it, with its flags
        if not same_flags(server_flags, row.flags) or not same_flags(file_flags, representable(server_flags)):
            set_flags[uid] = frozenset(server_flags)
    return SyncPlan(remove=remove, set_flags=set_flags)


@dataclass(frozen=True)
class ServerChanges:
    """What changed on the server since the last complete sync, as QRESYNC or CONDSTORE tell it.

    ``vanished`` and ``changed`` cover every change since the HIGHESTMODSEQ
    that sync recorded (the server may name more: UIDs we never had, flags
    that changed and changed back); ``new`` is every UID on the server above
    the highest UID we have.
    """

    uidvalidity: int
    exists: int
    """Messages in the mailbox (EXAMINE's EXISTS): checks the picture adds up."""
    vanished: frozenset[int] = frozenset()
    changed: Mapping[int, Flags] = field(default_factory=dict)
    new: frozenset[int] = frozenset()


@dataclass(frozen=True)
class LocalSummary:
    """The local side of a catch-up, without reading every row when nothing changed."""

    snapshot: LocalSnapshot
    """Its ``known`` holds every row when ``files`` is a listing; otherwise at
    least the rows of the UIDs the server named (vanished or changed)."""
    count: int
    """How many rows the mailbox has in all."""
    highest: int
    """The highest UID among them (0: none)."""


def plan_catchup(server: ServerChanges, local: LocalSummary, *, two_way: bool = False) -> SyncPlan | None:
    """Decide a catch-up from the server's changes instead of a complete listing.

    Returns the plan :func:`plan_sync` would give for the complete listing,
    or None when the changes do not add up to the server's mailbox (a UID
    below our highest that we never had, a removal the server did not
    report, another UIDVALIDITY): then only a complete listing can tell, and
    the caller falls back to it.

    Removals here are explicit server evidence (VANISHED, or absence from
    the complete UID list of a CONDSTORE catch-up); the caller still applies
    :func:`check_removal`, as for a listing.
    """
    snap = local.snapshot
    if snap.uidvalidity != server.uidvalidity:
        return None
    if any(uid <= local.highest for uid in server.new):
        return None
    gone = sorted(uid for uid in server.vanished if uid in snap.known)
    # Every message we keep plus every new one must be all the server has: a
    # message below our highest UID that we never had, or one the server
    # dropped without saying so, breaks the count.
    if local.count - len(gone) + len(server.new) != server.exists:
        return None
    fetch: set[int] = set(server.new)
    set_flags: dict[int, Flags] = {}
    gone_set = set(gone)
    for uid, server_flags in server.changed.items():
        if uid > local.highest or uid in gone_set:
            continue
        row = snap.known.get(uid)
        if row is None:
            return None  # a message we should have and do not: only a listing can say more
        _reconcile(uid, frozenset(server_flags), row, snap, fetch, set_flags, two_way)
    if snap.files is not None:
        # The Maildir was listed: files deleted or renamed by hand are found
        # here, their server flags being the recorded ones (unchanged since).
        for uid, row in snap.known.items():
            if uid in gone_set or uid in server.changed:
                continue
            _reconcile(uid, row.flags, row, snap, fetch, set_flags, two_way)
    return SyncPlan(fetch=tuple(sorted(fetch)), remove=tuple(gone), set_flags=set_flags)


def _reconcile(
    uid: int, server_flags: Flags, row: Known, local: LocalSnapshot, fetch: set[int], set_flags: dict[int, Flags],
    two_way: bool = False,
) -> None:
    """plan_sync's rule for one kept message: re-fetch a missing file, fix differing flags."""
    file_flags = local.file_flags(row)
    if file_flags is None:
        if not two_way:
            fetch.add(uid)
    elif not same_flags(server_flags, row.flags) or not same_flags(file_flags, representable(server_flags)):
        set_flags[uid] = server_flags


def files_in_place(known: Mapping[int, Known], files: Mapping[str, Flags]) -> bool:
    """Whether every row's file is present and carries the row's flags.

    When it holds right after a sync, the Maildir's directory mtimes can
    stand for a listing next time (see LocalSnapshot.files).
    """
    for row in known.values():
        file_flags = files.get(row.key)
        if file_flags is None or not same_flags(file_flags, representable(row.flags)):
            return False
    return True


REMOVAL_FLOOR = 10
"""Removing this many local copies at once never needs consent, whatever share of the mailbox it is.

Deleting the one message of a folder, or the last few, is what people do
every day; the guard is for a server that suddenly shows a big mailbox
empty or shrunken. What a small removal could cost is a handful of copies,
and those wait in the trash for ``trash_days``."""

UNGUARDED_SPECIAL_USE = frozenset({"\\trash", "\\junk"})
"""LIST attributes (RFC 6154, compared in lower case) of folders that are
emptied wholesale as a matter of course ("Empty Trash"): removals there are
never held back."""


class MassRemoval(Exception):
    """A listing would remove more of a mailbox than is plausible: refuse, and say so.

    A server that briefly lists a mailbox as empty (a bug, a half-restored
    backup, the wrong mailbox behind a name) looks exactly like a user who
    deleted everything. The first costs mail, the second a confirmation.
    """

    def __init__(self, would_remove: int, of: int, why: str, what: str = "local copies") -> None:
        super().__init__(f"would remove {would_remove} of {of} {what} ({why})")
        self.would_remove = would_remove
        self.of = of


def removal_refusal(
    count: int,
    of: int,
    max_delete: float,
    *,
    floor: int = REMOVAL_FLOOR,
    attributes: frozenset[str] = frozenset(),
    whole: str = "every message of the mailbox",
) -> str | None:
    """Why removing ``count`` of ``of`` things at once needs the user's consent, or None if it does not.

    The one rule every removal path applies (a listing, a catch-up, a live
    EXPUNGE/VANISHED, folders gone from LIST): nothing to remove, or at most
    ``floor``, or a \\Trash or \\Junk folder (``attributes``), pass;
    otherwise removing all of a non-empty set, or more than ``max_delete``
    of it, is refused.
    """
    if count <= 0 or count <= floor:
        return None
    if {a.lower() for a in attributes} & UNGUARDED_SPECIAL_USE:
        return None
    if count >= of:
        return whole
    if count > max_delete * of:
        return f"more than max_delete = {max_delete:.0%}"
    return None


def check_removal(
    plan: SyncPlan, known: int, max_delete: float, *, attributes: frozenset[str] = frozenset()
) -> None:
    """Raise MassRemoval if ``plan`` removes more of the mailbox than :func:`removal_refusal` lets pass.

    ``known`` is how many messages we have locally; ``max_delete`` a share
    from 0 to 1; ``attributes`` the mailbox's LIST attributes. Listings,
    catch-ups and live events are all checked: a VANISHED names each UID,
    so it is evidence in the sense of invariant 2, but a broken server can
    send ``VANISHED 1:9999999`` as easily as it can list a mailbox empty.
    Expunges seen live one at a time stay under the floor and are applied.
    """
    count = len(plan.remove)
    why = removal_refusal(count, known, max_delete, attributes=attributes)
    if why is not None:
        raise MassRemoval(count, known, why)
