"""The incremental catch-up plan (QRESYNC / CONDSTORE) against the full-listing plan.

The catch-up never sees a complete listing: only what the server says changed
since the last complete sync, plus the messages above our highest UID. The
property that makes it safe: whenever the server's report is complete (every
expunge and flag change since, perhaps more), ``plan_catchup`` gives exactly
the plan ``plan_sync`` would give from the complete listing; and when the
report and the local rows do not add up (a message we never had below our
highest UID, an expunge the server did not report) it gives no plan at all,
so the caller lists the mailbox in full.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord.flags import Flags, representable
from mirrord.sync.engine import (
    KnownMessage,
    LocalSnapshot,
    LocalSummary,
    ServerChanges,
    ServerListing,
    SyncPlan,
    check_removal,
    files_in_place,
    plan_catchup,
    plan_sync,
    same_flags,
)

SEEN = "\\Seen"
FLAGGED = "\\Flagged"
UV = 7


def fs(*flags: str) -> Flags:
    return frozenset(flags)


def rows(known: dict[int, Flags]) -> dict[int, KnownMessage]:
    return {uid: KnownMessage(f"k{uid}", flags) for uid, flags in known.items()}


def summary(known: dict[int, Flags], files: dict[str, Flags] | None = None, partial: set[int] | None = None) -> LocalSummary:
    every = rows(known)
    shown = every if partial is None else {uid: row for uid, row in every.items() if uid in partial}
    return LocalSummary(LocalSnapshot(UV, shown, files), len(every), max(known, default=0))


# --------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------


def test_nothing_changed_plans_nothing_without_reading_rows() -> None:
    known = {1: fs(SEEN), 2: fs()}
    plan = plan_catchup(ServerChanges(UV, exists=2), summary(known, partial=set()))
    assert plan == SyncPlan()


def test_new_vanished_and_changed_give_exactly_those_actions() -> None:
    known = {1: fs(SEEN), 2: fs(), 3: fs(), 4: fs(SEEN)}
    changes = ServerChanges(
        UV, exists=5, vanished=frozenset({3}), changed={2: fs(SEEN), 1: fs(SEEN)}, new=frozenset({5, 6})
    )
    plan = plan_catchup(changes, summary(known, partial={1, 2, 3}))
    assert plan == SyncPlan(fetch=(5, 6), remove=(3,), set_flags={2: fs(SEEN)})


def test_vanished_uids_we_never_had_are_ignored() -> None:
    known = {1: fs(), 2: fs()}
    changes = ServerChanges(UV, exists=2, vanished=frozenset({3, 4, 90}))
    assert plan_catchup(changes, summary(known, partial=set())) == SyncPlan()


def test_a_message_below_our_highest_that_we_never_had_forces_a_listing() -> None:
    # The server has 1, 2, 3; we have 1 and 3 (a batch failed once): only a
    # complete listing can name 2.
    assert plan_catchup(ServerChanges(UV, exists=3), summary({1: fs(), 3: fs()}, partial=set())) is None


def test_an_unreported_expunge_forces_a_listing() -> None:
    assert plan_catchup(ServerChanges(UV, exists=1), summary({1: fs(), 2: fs()}, partial=set())) is None


def test_a_changed_message_we_never_had_forces_a_listing() -> None:
    changes = ServerChanges(UV, exists=2, changed={2: fs(SEEN)})
    # Counts happen to agree (2 rows, 2 messages) but 2 is not ours: 3 is gone unreported.
    assert plan_catchup(changes, summary({1: fs(), 3: fs()})) is None


def test_another_uidvalidity_forces_a_listing() -> None:
    assert plan_catchup(ServerChanges(UV + 1, exists=1), summary({1: fs()})) is None


def test_new_uids_must_lie_above_our_highest() -> None:
    assert plan_catchup(ServerChanges(UV, exists=2, new=frozenset({1})), summary({2: fs()})) is None


def test_listed_maildir_refetches_missing_files_and_fixes_renamed_ones() -> None:
    known = {1: fs(SEEN), 2: fs(), 3: fs(FLAGGED)}
    files = {"k1": fs(), "k3": fs(FLAGGED), "foreign": fs(SEEN)}
    plan = plan_catchup(ServerChanges(UV, exists=3), summary(known, files))
    assert plan == SyncPlan(fetch=(2,), set_flags={1: fs(SEEN)})


def test_vanished_removals_are_still_checked_against_max_delete() -> None:
    known = {uid: fs() for uid in range(1, 31)}
    changes = ServerChanges(UV, exists=6, vanished=frozenset(range(1, 25)))
    plan = plan_catchup(changes, summary(known))
    assert plan is not None and plan.remove == tuple(range(1, 25))
    try:
        check_removal(plan, 30, 0.5)
    except Exception as e:  # noqa: BLE001
        assert "would remove 24 of 30" in str(e)
    else:
        raise AssertionError("a catch-up removing 80 % must stop")


def test_files_in_place() -> None:
    known = rows({1: fs(SEEN, "$Junk"), 2: fs()})
    assert files_in_place(known, {"k1": fs(SEEN), "k2": fs(), "other": fs()})
    assert not files_in_place(known, {"k1": fs(), "k2": fs()})
    assert not files_in_place(known, {"k1": fs(SEEN)})


# --------------------------------------------------------------------------
# Property: a complete report gives the full listing's plan
# --------------------------------------------------------------------------

FLAGS = st.frozensets(st.sampled_from([SEEN, FLAGGED, "\\Answered", "\\Draft", "$Junk", "Work"]), max_size=3)


@dataclass
class History:
    before: dict[int, Flags]
    """The server at the last complete sync; our rows then equal it."""
    after: dict[int, Flags]
    """The server now."""
    changes: ServerChanges
    files: dict[str, Flags] | None
    gap: frozenset[int]
    """Messages below our highest UID the server has and we never got (a fault)."""
    unreported: frozenset[int]
    """Expunges the report leaves out (a fault)."""


@st.composite
def histories(draw: st.DrawFn, faults: bool = False) -> History:
    before = draw(st.dictionaries(st.integers(1, 30), FLAGS, min_size=0, max_size=20))
    highest = max(before, default=0)
    after = dict(before)
    expunged = draw(st.sets(st.sampled_from(sorted(before)), max_size=len(before))) if before else set()
    for uid in expunged:
        del after[uid]
    changed: dict[int, Flags] = {}
    for uid in draw(st.sets(st.sampled_from(sorted(after)), max_size=len(after))) if after else set():
        after[uid] = changed[uid] = draw(FLAGS)
    # Servers may report more than changed: a message whose flags went and came back.
    for uid in draw(st.sets(st.sampled_from(sorted(after)), max_size=3)) if after else set():
        changed.setdefault(uid, after[uid])
    new = draw(st.sets(st.integers(highest + 1, highest + 10), max_size=6))
    for uid in new:
        after[uid] = draw(FLAGS)
        if draw(st.booleans()):
            changed[uid] = after[uid]  # QRESYNC reports new messages' flags too
    # New messages that came and went before we looked, and UIDs we never heard of.
    ghosts = draw(st.sets(st.integers(highest + 11, highest + 20), max_size=3))
    vanished = set(expunged) | ghosts
    gap: set[int] = set()
    unreported: set[int] = set()
    if faults:
        kind = draw(st.sampled_from(["gap", "unreported"]))
        if kind == "gap" and after and any(uid <= highest for uid in after):
            gap = {draw(st.sampled_from(sorted(uid for uid in after if uid <= highest)))}
        elif kind == "unreported" and expunged:
            unreported = {draw(st.sampled_from(sorted(expunged)))}
            vanished -= unreported
    files: dict[str, Flags] | None = None
    if draw(st.booleans()):
        # The Maildir was listed: some files went missing or were renamed by hand.
        files = {}
        for uid, flags in before.items():
            if uid in gap:
                continue
            how = draw(st.sampled_from(["kept", "kept", "kept", "missing", "renamed"]))
            if how == "kept":
                files[f"k{uid}"] = representable(flags)
            elif how == "renamed":
                files[f"k{uid}"] = representable(draw(FLAGS))
        files["foreign"] = fs(SEEN)
    changes = ServerChanges(
        UV,
        exists=len(after),
        vanished=frozenset(vanished),
        changed={uid: flags for uid, flags in changed.items() if uid not in expunged},
        new=frozenset(new),
    )
    return History(before, after, changes, files, frozenset(gap), frozenset(unreported))


def local_of(history: History, partial: bool) -> LocalSummary:
    """Our side after that last complete sync (minus the gap, if any)."""
    known = {uid: flags for uid, flags in history.before.items() if uid not in history.gap}
    named = set(history.changes.vanished) | set(history.changes.changed)
    return summary(known, history.files, named if partial and history.files is None else None)


def full_plan(history: History) -> SyncPlan:
    local = local_of(history, partial=False).snapshot
    files = history.files
    if files is None:
        files = {row.key: representable(row.flags) for row in local.known.values()}
    return plan_sync(ServerListing(UV, history.after), LocalSnapshot(UV, local.known, files))


def same_plan(a: SyncPlan, b: SyncPlan) -> bool:
    return (
        a.fetch == b.fetch
        and a.remove == b.remove
        and a.set_flags.keys() == b.set_flags.keys()
        and all(same_flags(a.set_flags[uid], b.set_flags[uid]) for uid in a.set_flags)
        and a.forget_all == b.forget_all
    )


@settings(max_examples=300, deadline=None)
@given(histories(), st.booleans())
def test_complete_report_gives_the_full_listing_plan(history: History, partial: bool) -> None:
    plan = plan_catchup(history.changes, local_of(history, partial))
    assert plan is not None
    assert same_plan(plan, full_plan(history)), (plan, full_plan(history))


@settings(max_examples=300, deadline=None)
@given(histories(faults=True), st.booleans())
def test_a_report_that_does_not_add_up_gives_no_plan(history: History, partial: bool) -> None:
    plan = plan_catchup(history.changes, local_of(history, partial))
    broken = bool(history.unreported) or any(uid in history.after for uid in history.gap)
    if broken:
        assert plan is None
    else:
        assert plan is not None and same_plan(plan, full_plan(history))


@settings(max_examples=200, deadline=None)
@given(histories())
def test_unlisted_maildir_is_taken_as_recorded(history: History) -> None:
    """files=None stands for a Maildir in which every row's file carries its recorded flags."""
    local = local_of(history, partial=False).snapshot
    materialised = {row.key: representable(row.flags) for row in local.known.values()}
    listing = ServerListing(UV, history.after)
    assert same_plan(
        plan_sync(listing, LocalSnapshot(UV, local.known, None)),
        plan_sync(listing, LocalSnapshot(UV, local.known, materialised)),
    )
