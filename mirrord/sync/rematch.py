"""Re-matching local copies after the server renumbered a mailbox (UIDVALIDITY changed).

A server that recreates a mailbox (a migration, a restore, a repair) gives
every message a new UID under a new UIDVALIDITY; our state rows then name
UIDs that mean nothing. Re-downloading everything would be slow, deleting
the old copies would risk mail. Instead each local copy is matched to a
server message by Message-ID and size (RFC822.SIZE, which we recorded when
we fetched it), and keeps its file under its new UID. Pure functions here;
the I/O is in :mod:`mirrord.sync.renumber`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass



@dataclass(frozen=True)
class Identity:
    """What identifies a message across renumbering."""

    message_id: str | None
    size: int | None


@dataclass(frozen=True)
class Rematch:
    matched: dict[int, int]
    """Old UID -> new UID."""
    unmatched_local: list[int]
    """Old UIDs no server message matched: set aside, never silently dropped."""
    unmatched_server: list[int]
    """New UIDs no local copy matched: to fetch."""


def rematch(local: Mapping[int, Identity], server: Mapping[int, Identity]) -> Rematch:
    """Pair old and new UIDs whose messages have the same Message-ID and size.

    Messages without a Message-ID cannot be told apart safely and are not
    matched (they are set aside and fetched again). Duplicates (same ID and
    size) pair up in UID order, which keeps their relative order.
    """
    by_identity: dict[Identity, list[int]] = defaultdict(list)
    for uid in sorted(server):
        identity = server[uid]
        if identity.message_id is not None:
            by_identity[identity].append(uid)
    matched: dict[int, int] = {}
    unmatched_local: list[int] = []
    for uid in sorted(local):
        identity = local[uid]
        candidates = by_identity.get(identity) if identity.message_id is not None else None
        if candidates:
            matched[uid] = candidates.pop(0)
        else:
            unmatched_local.append(uid)
    taken = set(matched.values())
    unmatched_server = [uid for uid in sorted(server) if uid not in taken]
    return Rematch(matched, unmatched_local, unmatched_server)
