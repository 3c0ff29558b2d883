"""The Maildir-stamp shortcut: skip listing new/ and cur/ while their mtimes say nothing moved.

A stamp is the pair of mtimes (ns) of a Maildir's ``new/`` and ``cur/``; any
file added, removed or renamed there changes one of them. A sync records the
stamp when it has seen every recorded file in place with its recorded flags;
the next sync, finding the same stamp, trusts the state instead of listing
the directories. The catch: mtimes only tell apart changes that fall in
different clock ticks, hence the margin below, and the check at the end of a
sync that the files are really where the rows say.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime

from mirrord.flags import maildir_info

STAMP_MARGIN_NS = 20_000_000
"""A Maildir stamp is trusted only once its mtimes are this much older than
the moment we read them: longer than a kernel clock tick (1-10 ms), so a
later change cannot carry the same mtime. Where the tick is known (Linux),
:data:`FINE_MARGIN_NS` is used instead."""


def _tick_margin() -> int:
    """One tick of the clock Linux takes file times from, plus a millisecond; else :data:`STAMP_MARGIN_NS`.

    The kernel stamps a file change with ``CLOCK_REALTIME_COARSE``, which
    lags the time we read by less than its resolution (one tick: 4 ms at
    HZ=250). So once a stamp is one tick older than the moment we read it,
    the coarse clock has moved past it and any later change gets a later
    mtime, which is all the margin is for. At the end of a sync that
    fetched new mail the margin is waited out: 20 ms of a ~100 ms catch-up
    (issue #15), where 5 ms do.
    """
    if not sys.platform.startswith("linux"):
        return STAMP_MARGIN_NS
    try:
        tick = time.clock_getres(_CLOCK_REALTIME_COARSE)
    except (OSError, ValueError):
        return STAMP_MARGIN_NS
    if not 0 < tick <= 0.010:
        return STAMP_MARGIN_NS
    return min(STAMP_MARGIN_NS, int(tick * 1e9) + 1_000_000)


_CLOCK_REALTIME_COARSE = 5
"""Linux's clock id (``time`` has no name for it)."""

FINE_MARGIN_NS = _tick_margin()
"""The margin for file systems with sub-second times (see :func:`_tick_margin`)."""


def maildir_stamp(path: Path) -> tuple[int, int] | None:
    """The mtimes (ns) of ``new/`` and ``cur/``: any file added, removed or renamed changes one."""
    try:
        return os.stat(path / "new").st_mtime_ns, os.stat(path / "cur").st_mtime_ns
    except OSError:
        return None


def _margin(stamp: tuple[int, int]) -> int:
    """How old (ns) a stamp must be to be trusted: file systems with whole-second times need more."""
    fine = any(t % 1_000_000_000 for t in stamp)
    return STAMP_MARGIN_NS if fine else 2_000_000_000


def _past(stamp: tuple[int, int]) -> bool:
    """Whether a change made from now on is sure to get an mtime other than ``stamp``'s.

    The margin (:func:`_margin`) has passed; or, on Linux, the stamp is at
    least :data:`FINE_MARGIN_NS` old and the coarse clock the kernel stamps
    changes with is already past it. That clock lags ours by about a tick,
    more when a virtual machine's ticks come late (5.9 ms at HZ=250 was
    seen), hence asking it rather than trusting a fixed margin.
    """
    newest = max(stamp)
    age = time.time_ns() - newest
    if age >= _margin(stamp):
        return True
    if FINE_MARGIN_NS >= STAMP_MARGIN_NS or age < FINE_MARGIN_NS or not any(t % 1_000_000_000 for t in stamp):
        return False
    try:
        return time.clock_gettime_ns(_CLOCK_REALTIME_COARSE) > newest
    except OSError:
        return False


async def settled_stamp(
    path: Path,
    keys: Callable[[], Iterable[tuple[str, str]]],
    reactor: IReactorTime,
    listed_after: tuple[int, int] | None,
    read_at: int,
    *,
    exact: bool = False,
    prefetch: bool = True,
) -> tuple[tuple[int, int] | None, bool]:
    """The Maildir stamp to record at the end of a sync (None if none can be
    trusted), and whether it is exact.

    A recorded stamp stands for "every recorded file is in place, with its
    recorded flags", so that the next sync may skip listing the Maildir
    while new/ and cur/ keep their mtimes. Directory mtimes only tell
    apart changes that fall in different clock ticks, so a stamp counts
    only if it was already a margin old when read (:func:`_tick_margin`; 2 s on
    file systems with whole-second times): a change made after the read
    then gets another mtime.

    ``listed_after``: the stamp read (at ``read_at``) just before this
    sync listed the Maildir and found everything in place, and then
    changed nothing; if the directories still carry it, it holds. Else
    (this sync changed files, or the stamp was too fresh), wait out the
    margin, read the stamp, list and check the Maildir, and keep the
    stamp if nothing moved meanwhile.

    ``exact`` (two-way accounts): also find out whether new/ and cur/ hold
    nothing but the recorded files, which the caller's listing cannot
    tell, so ``listed_after`` is not taken; an exact stamp lets the next
    two-way round skip the folder (see ``MailboxRecord.maildir_exact``).

    ``prefetch``: read the rows (``keys()``) while the margin passes, not
    after; for a small mailbox, where holding them all costs little. A large
    one's rows are read one at a time after the wait (at 100,000 rows the
    list held 17 MB).
    """
    current = maildir_stamp(path)
    if current is None:
        return None, False
    if (not exact and listed_after is not None and current == listed_after
            and read_at - max(current) >= _margin(current)):
        return current, False
    rows: list[tuple[str, str]] | None = None
    for _ in range(20):  # each turn waits 1-5 ms (at most the margin)
        if _past(current):
            break
        margin = _margin(current)
        if margin > STAMP_MARGIN_NS:
            return None, False  # coarse times: not worth seconds of waiting; the next sync lists
        if rows is None and prefetch:
            # Read the rows while the margin passes rather than after it: the
            # caller's sync is the only writer of this mailbox's rows meanwhile
            # (and rows read too early could only make the check fail).
            rows = list(keys())
            if _past(current):
                break
        age = time.time_ns() - max(current)
        wait = min(margin - age, max(FINE_MARGIN_NS - age, 1_000_000))
        await task.deferLater(reactor, max(wait, 0) / 1e9, lambda: None)
        current = maildir_stamp(path)
        if current is None:
            return None, False
    else:
        return None, False
    in_place = files_in_place(path, keys() if rows is None else rows)
    if not in_place or maildir_stamp(path) != current:
        return None, False
    return current, bool(in_place == _EXACT)


_EXACT = 2
"""What :func:`files_in_place` returns when new/ and cur/ hold the recorded files and nothing else."""

def files_in_place(path: Path, keys: Iterable[tuple[str, str]]) -> int:
    """Whether every row's file is where and as we would have put it: 0 if not,
    else 1, or :data:`_EXACT` (2) if new/ and cur/ hold nothing else.

    A quick, strict form of :func:`~mirrord.sync.engine.files_in_place`:
    names are compared as strings, so a file a reader renamed (other
    letter order, letters of its own) counts as not in place, which only
    costs a listing next time.

    ``keys`` may be a cursor: the rows are looked at one at a time and only
    the directory listing is held (a name leaves it as its row claims it),
    so at 100,000 messages this holds the names once, not the rows too.
    """
    try:
        new = set(os.listdir(path / "new"))
        cur = set(os.listdir(path / "cur"))
    except OSError:
        return 0
    letters: dict[str, str] = {}
    for key, flags in keys:
        info = letters.get(flags)
        if info is None:
            info = letters[flags] = maildir_info(frozenset(flags.split()))
        name = f"{key}:2,{info}"
        if name in cur:
            cur.remove(name)
            continue
        if not info:
            name = key
        if name in new:
            new.remove(name)
            continue
        # Claimed already by a row of the same key, or made since the listing
        # (which the caller's second look at the stamp catches): it is there.
        if not (os.path.lexists(path / "cur" / f"{key}:2,{info}") or os.path.lexists(path / "new" / name)):
            return 0
    # Any other entry (a reader's new file, a dot file) makes it inexact: the
    # two-way round then lists the folder, which is where such entries are judged.
    return _EXACT if not new and not cur else 1

# -- live changes, from a watcher's events ---------------------------------
