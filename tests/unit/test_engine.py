"""Tests for the sync engine's decisions.

The example tests pin each rule down on a small case. The property tests drive
a simulated server and a simulated local store (applying plans the way the
real store does, including crashes part-way) through random histories, and
demand that every complete sync leaves the mirror equal to the server while
never removing what the server still lists and never touching files that are
not ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mirrord.flags import Flags, representable
from mirrord.sync.engine import (
    KnownMessage,
    LocalSnapshot,
    ServerListing,
    SyncPlan,
    UidValidityChanged,
    plan_sync,
    same_flags,
)

SEEN = "\\Seen"
FLAGGED = "\\Flagged"
ANSWERED = "\\Answered"


def fs(*flags: str) -> Flags:
    return frozenset(flags)


def canonical(flags: Flags) -> Flags:
    """The test's own reading of flag equality, independent of the engine's:
    system flags case-insensitive, keywords exactly as sent, and ``\\Recent``
    not a message's flag (rows written before it was stripped may hold it)."""
    return frozenset(f.lower() if f.startswith("\\") else f for f in flags) - {"\\recent"}


def listing(uidvalidity: int, messages: dict[int, Flags]) -> ServerListing:
    return ServerListing(uidvalidity=uidvalidity, messages=messages)


def snapshot(
    uidvalidity: int | None,
    known: dict[int, tuple[str, Flags]],
    files: dict[str, Flags],
) -> LocalSnapshot:
    return LocalSnapshot(
        uidvalidity=uidvalidity,
        known={uid: KnownMessage(key=key, flags=flags) for uid, (key, flags) in known.items()},
        files=files,
    )


# --------------------------------------------------------------------------
# Example tests, one or more per rule
# --------------------------------------------------------------------------


def test_empty_server_and_fresh_local_plan_nothing() -> None:
    plan = plan_sync(listing(7, {}), snapshot(None, {}, {}))
    assert plan.is_empty


def test_fresh_mailbox_fetches_everything_ascending() -> None:
    plan = plan_sync(listing(7, {3: fs(), 1: fs(SEEN), 2: fs()}), snapshot(None, {}, {}))
    assert plan == SyncPlan(fetch=(1, 2, 3))


def test_new_uid_on_server_is_fetched() -> None:
    local = snapshot(7, {1: ("a", fs(SEEN))}, {"a": fs(SEEN)})
    plan = plan_sync(listing(7, {1: fs(SEEN), 2: fs()}), local)
    assert plan == SyncPlan(fetch=(2,))


def test_in_sync_mailbox_plans_nothing() -> None:
    local = snapshot(7, {1: ("a", fs(SEEN, "$Junk")), 2: ("b", fs())}, {"a": fs(SEEN), "b": fs()})
    plan = plan_sync(listing(7, {1: fs(SEEN, "$Junk"), 2: fs()}), local)
    assert plan.is_empty


def test_uidvalidity_change_with_known_rows_raises() -> None:
    local = snapshot(7, {1: ("a", fs())}, {"a": fs()})
    with pytest.raises(UidValidityChanged) as caught:
        plan_sync(listing(8, {}), local)
    assert (caught.value.old, caught.value.new) == (7, 8)


def test_uidvalidity_change_raises_even_if_uids_overlap() -> None:
    """Same UID numbers under a new UIDVALIDITY are other messages; no diffing."""
    local = snapshot(7, {1: ("a", fs())}, {"a": fs()})
    with pytest.raises(UidValidityChanged):
        plan_sync(listing(8, {1: fs()}), local)


def test_uidvalidity_change_after_the_old_copies_were_moved_away_starts_afresh() -> None:
    local = snapshot(7, {1: ("a", fs()), 2: ("b", fs(SEEN))}, {"stray": fs()})
    plan = plan_sync(listing(8, {1: fs(), 3: fs(SEEN)}), local)
    assert plan == SyncPlan(fetch=(1, 3), forget_all=True)


def test_uidvalidity_change_raises_while_any_old_copy_is_there() -> None:
    local = snapshot(7, {1: ("a", fs()), 2: ("b", fs(SEEN))}, {"b": fs(SEEN)})
    with pytest.raises(UidValidityChanged):
        plan_sync(listing(8, {1: fs()}), local)


def test_new_uidvalidity_is_adopted_when_nothing_is_known() -> None:
    local = snapshot(7, {}, {"stray": fs(SEEN)})
    plan = plan_sync(listing(8, {1: fs(), 5: fs(SEEN)}), local)
    assert plan == SyncPlan(fetch=(1, 5))


def test_known_uid_whose_file_vanished_is_fetched_again() -> None:
    local = snapshot(7, {1: ("a", fs()), 2: ("b", fs(SEEN))}, {"a": fs()})
    plan = plan_sync(listing(7, {1: fs(), 2: fs(SEEN)}), local)
    assert plan == SyncPlan(fetch=(2,))


def test_refetch_is_not_also_a_flag_change() -> None:
    local = snapshot(7, {2: ("b", fs())}, {})
    plan = plan_sync(listing(7, {2: fs(SEEN, FLAGGED)}), local)
    assert plan == SyncPlan(fetch=(2,))


def test_known_uid_absent_from_listing_is_removed() -> None:
    local = snapshot(7, {1: ("a", fs()), 2: ("b", fs()), 3: ("c", fs())}, {"a": fs(), "b": fs(), "c": fs()})
    plan = plan_sync(listing(7, {2: fs()}), local)
    assert plan == SyncPlan(remove=(1, 3))


def test_known_uid_absent_from_listing_and_without_file_is_removed() -> None:
    """The row must go too, or it would linger forever."""
    local = snapshot(7, {1: ("a", fs())}, {})
    plan = plan_sync(listing(7, {}), local)
    assert plan == SyncPlan(remove=(1,))


def test_server_flag_change_sets_flags() -> None:
    local = snapshot(7, {1: ("a", fs())}, {"a": fs()})
    plan = plan_sync(listing(7, {1: fs(SEEN)}), local)
    assert plan == SyncPlan(set_flags={1: fs(SEEN)})


def test_keyword_only_change_sets_flags() -> None:
    """The file name cannot show it, but the state row must record it."""
    local = snapshot(7, {1: ("a", fs(SEEN))}, {"a": fs(SEEN)})
    plan = plan_sync(listing(7, {1: fs(SEEN, "$Forwarded")}), local)
    assert plan == SyncPlan(set_flags={1: fs(SEEN, "$Forwarded")})


def test_keyword_removal_sets_flags() -> None:
    local = snapshot(7, {1: ("a", fs("$Forwarded"))}, {"a": fs()})
    plan = plan_sync(listing(7, {1: fs()}), local)
    assert plan == SyncPlan(set_flags={1: fs()})


def test_local_flag_change_is_reverted_to_the_servers() -> None:
    """A reader marking a file read is undone: the mirror is one-way."""
    local = snapshot(7, {1: ("a", fs())}, {"a": fs(SEEN)})
    plan = plan_sync(listing(7, {1: fs()}), local)
    assert plan == SyncPlan(set_flags={1: fs()})


def test_system_flags_compare_case_insensitively() -> None:
    local = snapshot(7, {1: ("a", fs(SEEN, ANSWERED))}, {"a": fs(SEEN, ANSWERED)})
    plan = plan_sync(listing(7, {1: fs("\\SEEN", "\\answered")}), local)
    assert plan.is_empty


def test_keywords_compare_case_sensitively() -> None:
    local = snapshot(7, {1: ("a", fs("Junk"))}, {"a": fs()})
    plan = plan_sync(listing(7, {1: fs("junk")}), local)
    assert plan == SyncPlan(set_flags={1: fs("junk")})


def test_recent_is_no_flag_change() -> None:
    """``\\Recent`` is a session's (issue #11 item 7): its coming or going changes nothing."""
    local = snapshot(7, {1: ("a", fs("\\Recent", SEEN))}, {"a": fs(SEEN)})
    assert plan_sync(listing(7, {1: fs("\\Recent", SEEN)}), local).is_empty
    assert plan_sync(listing(7, {1: fs(SEEN)}), local).is_empty


def test_set_flags_carries_the_servers_spelling() -> None:
    local = snapshot(7, {1: ("a", fs())}, {"a": fs()})
    plan = plan_sync(listing(7, {1: fs("\\SEEN", "$Label1")}), local)
    assert plan.set_flags == {1: fs("\\SEEN", "$Label1")}


def test_unknown_files_are_never_planned_for() -> None:
    """A file no row refers to is the user's; it never shows up in a plan."""
    local = snapshot(7, {1: ("a", fs())}, {"a": fs(), "theirs": fs(SEEN), "other": fs()})
    plan = plan_sync(listing(7, {1: fs()}), local)
    assert plan.is_empty


def test_all_rules_together() -> None:
    local = snapshot(
        7,
        {
            1: ("gone", fs()),  # expunged on server
            2: ("same", fs(SEEN)),  # untouched
            3: ("lost", fs()),  # file deleted locally
            4: ("flag", fs()),  # flagged on server
        },
        {"same": fs(SEEN), "flag": fs(), "gone": fs(), "mine": fs(FLAGGED)},
    )
    server = listing(7, {2: fs(SEEN), 3: fs(), 4: fs(FLAGGED), 9: fs()})
    assert plan_sync(server, local) == SyncPlan(
        fetch=(3, 9), remove=(1,), set_flags={4: fs(FLAGGED)}
    )


def test_same_flags() -> None:
    assert same_flags(fs("\\Seen", "$X"), fs("\\seen", "$X"))
    assert not same_flags(fs("$X"), fs("$x"))
    assert not same_flags(fs("\\Seen"), fs("Seen"))


# --------------------------------------------------------------------------
# Simulation: a server mailbox and a local store that applies plans
# --------------------------------------------------------------------------


@dataclass
class SimServer:
    uidvalidity: int = 1000
    next_uid: int = 1
    messages: dict[int, Flags] = field(default_factory=dict)

    def listing(self) -> ServerListing:
        return ServerListing(uidvalidity=self.uidvalidity, messages=dict(self.messages))

    def append(self, flags: Flags) -> int:
        uid = self.next_uid
        self.next_uid += 1
        self.messages[uid] = flags
        return uid

    def recreate(self) -> None:
        """The mailbox is rebuilt (e.g. restored from backup): new UIDVALIDITY, renumbered."""
        old = [self.messages[uid] for uid in sorted(self.messages)]
        self.uidvalidity += 1
        self.messages = {}
        self.next_uid = 1
        for flags in old:
            self.append(flags)


class SimStore:
    """The local side as the real store keeps it: state rows plus Maildir files.

    ``foreign`` is a record, kept beside the store, of files that were never
    ours (or were set aside); they must stay exactly as they are.
    """

    def __init__(self) -> None:
        self.uidvalidity: int | None = None
        self.known: dict[int, KnownMessage] = {}
        self.files: dict[str, Flags] = {}
        self.foreign: dict[str, Flags] = {}
        self._serial = 0

    def snapshot(self) -> LocalSnapshot:
        return LocalSnapshot(
            uidvalidity=self.uidvalidity, known=dict(self.known), files=dict(self.files)
        )

    def new_key(self, prefix: str = "m") -> str:
        self._serial += 1
        return f"{prefix}{self._serial}.host"

    def add_foreign(self, flags: Flags) -> None:
        key = self.new_key("foreign")
        self.files[key] = flags
        self.foreign[key] = flags

    def apply(
        self,
        plan: SyncPlan,
        planned_uidvalidity: int,
        server: SimServer,
        limits: tuple[int, int, int] | None = None,
    ) -> None:
        """Apply ``plan`` (or, given ``limits``, only a prefix of each part, as a crash would).

        The server is read at apply time, as a worker would: it may have moved
        on since the plan was made.
        """
        if server.uidvalidity != planned_uidvalidity:
            # A worker checks UIDVALIDITY on SELECT and drops a plan made for
            # another one: its UIDs name other messages now.
            return
        self.uidvalidity = planned_uidvalidity
        if plan.forget_all:
            assert not any(row.key in self.files for row in self.known.values()), "forgot rows with files"
            self.known.clear()
        n_fetch, n_flags, n_remove = limits or (len(plan.fetch), len(plan.set_flags), len(plan.remove))

        for uid in plan.fetch[:n_fetch]:
            if uid not in server.messages:
                continue  # expunged since: the FETCH returns nothing
            row = self.known.get(uid)
            assert row is None or row.key not in self.files, f"fetch of present UID {uid}"
            flags = server.messages[uid]
            key = self.new_key()
            self.files[key] = representable(flags)  # tmp/, fsync, rename ...
            self.known[uid] = KnownMessage(key=key, flags=flags)  # ... then the row

        for uid, flags in list(plan.set_flags.items())[:n_flags]:
            row = self.known[uid]
            if row.key in self.files:
                self.files[row.key] = representable(flags)
            self.known[uid] = KnownMessage(key=row.key, flags=flags)

        for uid in plan.remove[:n_remove]:
            assert uid not in server.messages, f"removed UID {uid} the server still has"
            row = self.known.pop(uid)
            assert row.key not in self.foreign
            self.files.pop(row.key, None)

    def set_aside(self) -> None:
        """What resolving a UIDVALIDITY change does at the least: keep every copy, forget the rows."""
        for row in self.known.values():
            if row.key in self.files:
                self.foreign[row.key] = self.files[row.key]
        self.known = {}

    # -- checks ------------------------------------------------------------

    def assert_foreign_untouched(self) -> None:
        for key, flags in self.foreign.items():
            assert self.files.get(key) == flags, f"foreign file {key} was touched"

    def assert_mirrors(self, server: SimServer) -> None:
        assert self.uidvalidity == server.uidvalidity
        assert set(self.known) == set(server.messages)
        keys = [row.key for row in self.known.values()]
        assert len(keys) == len(set(keys)), "two UIDs share a file"
        for uid, row in self.known.items():
            assert canonical(row.flags) == canonical(server.messages[uid]), uid
            assert self.files.get(row.key) == representable(server.messages[uid]), uid
        ours = set(self.files) - set(self.foreign)
        assert ours == set(keys), "a file of ours without a row, or a row without its file"
        self.assert_foreign_untouched()


def sync_until_converged(store: SimStore, server: SimServer) -> None:
    """One full sync must converge; a second plan must then be empty."""
    listed = server.listing()
    store.apply(plan_sync(listed, store.snapshot()), listed.uidvalidity, server)
    again = plan_sync(server.listing(), store.snapshot())
    assert again.is_empty, again
    store.assert_mirrors(server)


# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------

SYSTEM_FLAGS = ["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft", "\\Recent"]
KEYWORDS = ["$Forwarded", "Junk", "junk", "$Label1"]


@st.composite
def system_flag(draw: st.DrawFn) -> str:
    """A system flag, now and then spelled in another case, as some servers do."""
    flag = draw(st.sampled_from(SYSTEM_FLAGS))
    spelling = draw(st.sampled_from(["as-is", "as-is", "as-is", "lower", "upper"]))
    if spelling == "lower":
        return flag.lower()
    if spelling == "upper":
        return "\\" + flag[1:].upper()
    return flag


flag_sets: st.SearchStrategy[Flags] = st.frozensets(
    st.one_of(system_flag(), st.sampled_from(KEYWORDS)), max_size=4
)
file_flag_sets: st.SearchStrategy[Flags] = flag_sets.map(representable)
uids = st.integers(min_value=1, max_value=40)


def respelled(flags: Flags) -> Flags:
    """The same flags as another server (or the same one, another day) spells them."""
    return frozenset(f.upper() if f.startswith("\\") else f for f in flags)


@st.composite
def world(draw: st.DrawFn) -> tuple[ServerListing, LocalSnapshot, dict[str, Flags]]:
    """An arbitrary (server, local) pair, including untidy local states.

    Returns the listing, the snapshot and the foreign files (those no row refers to).
    """
    server_uv = draw(st.sampled_from([1, 2]))
    local_uv = draw(st.sampled_from([None, 1, 2]))
    server = ServerListing(server_uv, draw(st.dictionaries(uids, flag_sets, max_size=15)))
    known: dict[int, KnownMessage] = {}
    files: dict[str, Flags] = {}
    # Known UIDs lean towards ones the server has, so all rules get exercised.
    candidates = sorted(server.messages) + list(range(1, 41))
    for uid in draw(st.lists(st.sampled_from(candidates), max_size=15, unique=True)):
        on_server = server.messages.get(uid, frozenset())
        flags = draw(st.sampled_from([on_server, respelled(on_server)]) | flag_sets)
        known[uid] = KnownMessage(key=f"k{uid}", flags=flags)
        if draw(st.integers(0, 4)):  # mostly the file is there
            files[f"k{uid}"] = draw(
                st.one_of(st.just(representable(flags)), file_flag_sets)
            )
    foreign = draw(
        st.dictionaries(st.from_regex(r"f[0-9]{1,3}", fullmatch=True), file_flag_sets, max_size=4)
    )
    files.update(foreign)
    return server, LocalSnapshot(local_uv, known, files), foreign


def store_from(local: LocalSnapshot, foreign: dict[str, Flags]) -> SimStore:
    store = SimStore()
    store.uidvalidity = local.uidvalidity
    store.known = dict(local.known)
    store.files = dict(local.files)
    store.foreign = dict(foreign)
    return store


def server_from(listed: ServerListing) -> SimServer:
    return SimServer(
        uidvalidity=listed.uidvalidity,
        next_uid=max(listed.messages, default=0) + 1,
        messages=dict(listed.messages),
    )


def uidvalidity_conflict(server: ServerListing, local: LocalSnapshot) -> bool:
    """Whether planning must refuse: rows of another UIDVALIDITY with a file still there."""
    return (
        bool(local.known)
        and local.uidvalidity not in (None, server.uidvalidity)
        and any(row.key in local.files for row in local.known.values())
    )


# --------------------------------------------------------------------------
# Properties of a single plan
# --------------------------------------------------------------------------

FAST = settings(max_examples=80, deadline=None)


@FAST
@given(world())
def test_plan_is_well_formed_and_safe(case: tuple[ServerListing, LocalSnapshot, dict[str, Flags]]) -> None:
    server, local, _ = case
    if uidvalidity_conflict(server, local):
        with pytest.raises(UidValidityChanged):
            plan_sync(server, local)
        return
    plan = plan_sync(server, local)
    fetch, remove, flagged = set(plan.fetch), set(plan.remove), set(plan.set_flags)

    assert list(plan.fetch) == sorted(fetch) and len(fetch) == len(plan.fetch)
    assert list(plan.remove) == sorted(remove) and len(remove) == len(plan.remove)
    assert not (fetch & remove or fetch & flagged or remove & flagged)

    # Never remove what the server lists; remove only what we know.
    assert not remove & set(server.messages)
    assert remove <= set(local.known)
    # Never fetch a UID we already hold with its file.
    present = {uid for uid, row in local.known.items() if row.key in local.files}
    assert not fetch & present
    assert fetch <= set(server.messages)
    # Flag changes only for held messages, always to the server's flags, and only when needed.
    assert flagged <= present & set(server.messages)
    for uid, flags in plan.set_flags.items():
        assert flags == server.messages[uid]
        row = local.known[uid]
        assert (
            canonical(row.flags) != canonical(flags)
            or local.files[row.key] != representable(flags)
        )


@FAST
@given(world())
def test_one_plan_converges_and_is_idempotent(
    case: tuple[ServerListing, LocalSnapshot, dict[str, Flags]],
) -> None:
    listed, local, foreign = case
    if uidvalidity_conflict(listed, local):
        return
    store, server = store_from(local, foreign), server_from(listed)
    sync_until_converged(store, server)


@FAST
@given(world())
def test_uidvalidity_change_never_removes(
    case: tuple[ServerListing, LocalSnapshot, dict[str, Flags]],
) -> None:
    server, local, _ = case
    if not local.known or local.uidvalidity is None:
        return
    moved = ServerListing(local.uidvalidity + 1, server.messages)
    if not uidvalidity_conflict(moved, local):
        # Every old copy is gone already: nothing local to lose, start afresh.
        plan = plan_sync(moved, local)
        assert plan.forget_all and not plan.remove and not plan.set_flags
        assert plan.fetch == tuple(sorted(moved.messages))
        return
    with pytest.raises(UidValidityChanged) as caught:
        plan_sync(moved, local)
    assert (caught.value.old, caught.value.new) == (local.uidvalidity, local.uidvalidity + 1)


@FAST
@given(world())
def test_unknown_files_are_never_touched(
    case: tuple[ServerListing, LocalSnapshot, dict[str, Flags]],
) -> None:
    listed, local, foreign = case
    store, server = store_from(local, foreign), server_from(listed)
    try:
        plan = plan_sync(listed, local)
    except UidValidityChanged:
        return
    store.apply(plan, listed.uidvalidity, server)
    store.assert_foreign_untouched()
    # And the plan names no UID whose row points at a foreign file.
    for uid in (*plan.remove, *plan.set_flags):
        assert local.known[uid].key not in foreign


# --------------------------------------------------------------------------
# Model-based convergence over random histories
# --------------------------------------------------------------------------


class MirrorMachine(RuleBasedStateMachine):
    """A server and our mirror of it, through appends, expunges, flag changes,
    user meddling, crashes mid-sync and stale plans."""

    def __init__(self) -> None:
        super().__init__()
        self.server = SimServer()
        self.store = SimStore()
        self.pending: tuple[SyncPlan, int] | None = None

    # -- server side -------------------------------------------------------

    @rule(flags=flag_sets)
    def append(self, flags: Flags) -> None:
        self.server.append(flags)

    @rule(flags=flag_sets, count=st.integers(1, 5))
    def append_many(self, flags: Flags, count: int) -> None:
        for _ in range(count):
            self.server.append(flags)

    @precondition(lambda self: self.server.messages)
    @rule(data=st.data())
    def expunge(self, data: st.DataObject) -> None:
        doomed = data.draw(
            st.lists(st.sampled_from(sorted(self.server.messages)), min_size=1, unique=True)
        )
        for uid in doomed:
            del self.server.messages[uid]

    @precondition(lambda self: self.server.messages)
    @rule(data=st.data(), flags=flag_sets)
    def server_sets_flags(self, data: st.DataObject, flags: Flags) -> None:
        uid = data.draw(st.sampled_from(sorted(self.server.messages)))
        self.server.messages[uid] = flags

    @precondition(lambda self: self.server.messages)
    @rule(data=st.data())
    def server_respells_flags(self, data: st.DataObject) -> None:
        """Same flags, system flags in another case: nothing should need doing."""
        uid = data.draw(st.sampled_from(sorted(self.server.messages)))
        self.server.messages[uid] = respelled(self.server.messages[uid])

    @rule(rare=st.integers(0, 3))
    def server_recreates_mailbox(self, rare: int) -> None:
        # Rare on purpose: it ends the history as far as the old rows go, and
        # the other rules need time to build up a mailbox worth checking.
        if rare == 0:
            self.server.recreate()

    # -- local user --------------------------------------------------------

    def _our_present_keys(self) -> list[str]:
        return sorted(row.key for row in self.store.known.values() if row.key in self.store.files)

    @precondition(lambda self: self._our_present_keys())
    @rule(data=st.data())
    def user_deletes_file(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self._our_present_keys()))
        del self.store.files[key]

    @precondition(lambda self: self._our_present_keys())
    @rule(data=st.data(), flags=file_flag_sets)
    def user_changes_file_flags(self, data: st.DataObject, flags: Flags) -> None:
        key = data.draw(st.sampled_from(self._our_present_keys()))
        self.store.files[key] = flags

    @rule(flags=file_flag_sets)
    def user_drops_in_a_file(self, flags: Flags) -> None:
        self.store.add_foreign(flags)

    # -- syncing -----------------------------------------------------------

    def _plan(self) -> tuple[SyncPlan, int] | None:
        # One plan in flight per mailbox: a new plan supersedes one not yet applied.
        self.pending = None
        listed = self.server.listing()
        before = self.store.snapshot()
        try:
            plan = plan_sync(listed, before)
        except UidValidityChanged as e:
            assert self.store.known and self.store.uidvalidity == e.old
            assert e.new == listed.uidvalidity
            return None
        if self.store.uidvalidity is not None and self.store.known and not plan.forget_all:
            assert self.store.uidvalidity == listed.uidvalidity
        return plan, listed.uidvalidity

    @rule()
    def sync(self) -> None:
        planned = self._plan()
        if planned is None:
            return
        self.store.apply(*planned, self.server)
        again = self._plan()
        assert again is not None and again[0].is_empty, again
        self.store.assert_mirrors(self.server)

    @rule(data=st.data())
    def interrupted_sync(self, data: st.DataObject) -> None:
        planned = self._plan()
        if planned is None:
            return
        plan, uv = planned
        limits = (
            data.draw(st.integers(0, len(plan.fetch)), label="fetched"),
            data.draw(st.integers(0, len(plan.set_flags)), label="flagged"),
            data.draw(st.integers(0, len(plan.remove)), label="removed"),
        )
        self.store.apply(plan, uv, self.server, limits)

    @rule()
    def plan_now(self) -> None:
        """Plan, but apply later: the server (and the user) may act in between."""
        planned = self._plan()
        self.pending = planned

    @precondition(lambda self: self.pending is not None)
    @rule()
    def apply_stale_plan(self) -> None:
        assert self.pending is not None
        self.store.apply(*self.pending, self.server)
        self.pending = None

    @precondition(
        lambda self: self.store.known
        and self.store.uidvalidity is not None
        and self.store.uidvalidity != self.server.uidvalidity
    )
    @rule()
    def resolve_uidvalidity_change(self) -> None:
        self.store.set_aside()

    # -- checks ------------------------------------------------------------

    @invariant()
    def foreign_files_untouched(self) -> None:
        self.store.assert_foreign_untouched()

    @invariant()
    def rows_point_at_distinct_files(self) -> None:
        keys = [row.key for row in self.store.known.values()]
        assert len(keys) == len(set(keys))

    def teardown(self) -> None:
        if self.store.known and self.store.uidvalidity != self.server.uidvalidity:
            self.store.set_aside()
        sync_until_converged(self.store, self.server)


def _run_machine(max_examples: int, steps: int) -> None:
    run_state_machine_as_test(
        MirrorMachine,
        settings=settings(
            max_examples=max_examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_mirror_converges_over_random_histories() -> None:
    _run_machine(max_examples=80, steps=40)


@pytest.mark.slow
def test_mirror_converges_over_random_histories_slow() -> None:
    _run_machine(max_examples=3000, steps=80)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None)
@given(world())
def test_one_plan_converges_and_is_idempotent_slow(
    case: tuple[ServerListing, LocalSnapshot, dict[str, Flags]],
) -> None:
    listed, local, foreign = case
    if uidvalidity_conflict(listed, local):
        with pytest.raises(UidValidityChanged):
            plan_sync(listed, local)
        return
    sync_until_converged(store_from(local, foreign), server_from(listed))


# -- the mass-removal guard ----------------------------------------------------

from mirrord.sync.engine import REMOVAL_FLOOR, MassRemoval, check_removal, removal_refusal  # noqa: E402


def test_guard_allows_up_to_the_share() -> None:
    check_removal(SyncPlan(remove=tuple(range(20))), known=40, max_delete=0.5)
    check_removal(SyncPlan(), known=0, max_delete=0.0)


def test_guard_refuses_more_than_the_share() -> None:
    with pytest.raises(MassRemoval, match="would remove 30 of 40 local copies"):
        check_removal(SyncPlan(remove=tuple(range(30))), known=40, max_delete=0.5)


def test_guard_refuses_a_whole_non_empty_mailbox_whatever_the_share() -> None:
    with pytest.raises(MassRemoval, match="every message"):
        check_removal(SyncPlan(remove=tuple(range(11))), known=11, max_delete=1.0)


def test_emptying_a_folder_of_a_few_messages_passes() -> None:
    """Deleting the one message of a folder, or its last few, is everyday use (issue #11 item 5)."""
    check_removal(SyncPlan(remove=(1,)), known=1, max_delete=0.5)
    check_removal(SyncPlan(remove=tuple(range(REMOVAL_FLOOR))), known=REMOVAL_FLOOR, max_delete=0.0)


@pytest.mark.parametrize("attribute", ["\\Trash", "\\Junk", "\\TRASH"])
def test_emptying_trash_or_junk_passes_whatever_its_size(attribute: str) -> None:
    check_removal(SyncPlan(remove=tuple(range(5000))), known=5000, max_delete=0.5,
                  attributes=frozenset({"\\HasNoChildren", attribute}))


def test_other_special_use_folders_are_guarded() -> None:
    with pytest.raises(MassRemoval):
        check_removal(SyncPlan(remove=tuple(range(500))), known=500, max_delete=0.5,
                      attributes=frozenset({"\\Sent"}))


@given(
    count=st.integers(0, 10_000),
    extra=st.integers(0, 10_000),
    max_delete=st.floats(0, 1),
    attributes=st.sets(st.sampled_from(["\\Trash", "\\Junk", "\\Sent", "\\Archive", "\\HasChildren"])),
)
def test_removal_refusal_is_the_documented_rule(
    count: int, extra: int, max_delete: float, attributes: set[str]
) -> None:
    of = count + extra
    why = removal_refusal(count, of, max_delete, attributes=frozenset(attributes))
    exempt = count <= REMOVAL_FLOOR or bool({"\\Trash", "\\Junk"} & attributes)
    if exempt:
        assert why is None
    elif count == of:
        assert why == "every message of the mailbox"
    else:
        assert (why is not None) == (count > max_delete * of)
    # Monotone: removing more of the same mailbox is never easier to allow.
    if why is not None and count < of:
        assert removal_refusal(count + 1, of, max_delete, attributes=frozenset(attributes)) is not None


# -- re-matching after a UIDVALIDITY change ------------------------------------

from mirrord.headers import message_id  # noqa: E402
from mirrord.sync.rematch import Identity, rematch  # noqa: E402


def test_message_id_is_found_unfolded_in_either_line_ending() -> None:
    assert message_id(b"Subject: x\r\nMessage-ID:\r\n <a@b>\r\n\r\n") == "<a@b>"
    assert message_id(b"message-id: <c@d>\nX: y\n\nMessage-ID: <not@body>\n") == "<c@d>"
    assert message_id(b"Subject: none\r\n\r\n") is None


def test_rematch_pairs_by_id_and_size_and_keeps_the_rest_apart() -> None:
    local = {
        1: Identity("<a>", 100),
        2: Identity("<b>", 200),
        3: Identity("<dup>", 50),
        4: Identity("<dup>", 50),
        5: Identity(None, 10),  # no Message-ID: cannot be told apart safely
        6: Identity("<a>", 999),  # same ID, other size: another message
    }
    server = {10: Identity("<dup>", 50), 11: Identity("<a>", 100), 12: Identity("<dup>", 50),
              13: Identity(None, 10), 14: Identity("<new>", 1)}
    result = rematch(local, server)
    assert result.matched == {1: 11, 3: 10, 4: 12}
    assert result.unmatched_local == [2, 5, 6]
    assert result.unmatched_server == [13, 14]


@given(st.lists(st.tuples(st.sampled_from(["<a>", "<b>", "<c>", None]), st.integers(1, 3)), max_size=12),
       st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_rematch_is_a_partial_bijection(items: list[tuple[str | None, int]], rng: object) -> None:
    local = {i + 1: Identity(m, s) for i, (m, s) in enumerate(items)}
    shuffled = list(items)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    server = {100 + i: Identity(m, s) for i, (m, s) in enumerate(shuffled[: len(shuffled) // 2 + 1])}
    result = rematch(local, server)
    assert len(set(result.matched.values())) == len(result.matched)
    assert all(local[o] == server[n] and local[o].message_id for o, n in result.matched.items())
    assert sorted([*result.matched, *result.unmatched_local]) == sorted(local)
    assert sorted([*result.matched.values(), *result.unmatched_server]) == sorted(server)
