"""Which mailboxes get a dedicated IDLE watcher: a pure decision.

There are ``room`` watchers (the connection budget minus the workers) and
possibly hundreds of mailboxes. The watchers go, in this order, to

1. the mailboxes ``watch:`` names (the user said so),
2. INBOX (where most mail lands),
3. those with the most recent activity (mail arrived, flags changed),
4. the rest by name (a stable order, so that restarts choose alike).

The others are polled (:mod:`mirrord.poller`). The choice is made again as
activity changes, but a watcher is costly to move (a connection closed, one
opened, an EXAMINE and a UID listing), so :func:`rechoose` moves one only
when a polled mailbox was active more recently than a watched one that has
been quiet for ``quiet`` seconds; mailboxes of ranks 1 and 2 are never given
up for activity elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

QUIET = 600.0
"""Seconds without activity before a watched mailbox may yield its watcher to a busier polled one."""


@dataclass(frozen=True)
class Candidate:
    name: str
    named: bool
    """``watch:`` names it."""
    last_activity: float | None = None


def rank(candidate: Candidate) -> tuple[int, float, str]:
    """Sort key: lower is watched first (see the module docstring)."""
    if candidate.named:
        tier = 0
    elif candidate.name == "INBOX":
        tier = 1
    elif candidate.last_activity is not None:
        tier = 2
    else:
        tier = 3
    return tier, -(candidate.last_activity or 0.0), candidate.name


def pinned(candidate: Candidate) -> bool:
    """Named by ``watch:``, or INBOX: keeps its watcher whatever happens elsewhere."""
    return rank(candidate)[0] < 2


def candidates(
    names: Iterable[str], named: Callable[[str], bool], activity: Mapping[str, float | None]
) -> list[Candidate]:
    return [Candidate(n, named(n), activity.get(n)) for n in names]


def choose(pool: Iterable[Candidate], room: int) -> list[str]:
    """The names of the ``room`` mailboxes to watch, best first."""
    ordered = sorted(pool, key=rank)
    return [c.name for c in ordered[: max(0, room)]]


def rechoose(
    pool: Iterable[Candidate], watched: Iterable[str], room: int, now: float, quiet: float = QUIET
) -> tuple[list[str], list[str]]:
    """(start, stop): watchers to start and to stop so the watched set fits ``room`` and follows activity.

    Over ``room`` (the budget shrank): the lowest-ranked watched ones stop.
    Under it: the best polled ones start. At ``room``: a polled mailbox
    active more recently than a watched, unpinned one that has been quiet
    for ``quiet`` seconds takes its place, one swap per polled mailbox.
    """
    by_name = {c.name: c for c in pool}
    current = [by_name[n] for n in watched if n in by_name]
    current.sort(key=rank)
    room = max(0, room)
    stop = [c.name for c in current[room:]]
    kept = current[:room]
    kept_names = {c.name for c in kept}
    outside = sorted((c for c in by_name.values() if c.name not in kept_names and c.name not in stop), key=rank)
    start: list[str] = []
    free = room - len(kept)
    while free > 0 and outside:
        start.append(outside.pop(0).name)
        free -= 1
    # Swaps: the busiest polled mailboxes against the quietest unpinned watched ones.
    yielding = sorted(
        (c for c in kept if not pinned(c) and (c.last_activity is None or now - c.last_activity >= quiet)),
        key=lambda c: c.last_activity or 0.0,
    )
    unpinned = sorted((c for c in kept if not pinned(c)), key=rank, reverse=True)
    for challenger in outside:
        if pinned(challenger):
            # Named by watch: or INBOX, yet polled: it displaces the lowest-ranked unpinned one.
            victim = unpinned[0] if unpinned else None
        elif challenger.last_activity is not None and yielding:
            victim = yielding[0]
            if challenger.last_activity <= (victim.last_activity or 0.0):
                break
        else:
            break
        if victim is None:
            continue
        unpinned = [c for c in unpinned if c is not victim]
        yielding = [c for c in yielding if c is not victim]
        stop.append(victim.name)
        start.append(challenger.name)
    return start, stop
