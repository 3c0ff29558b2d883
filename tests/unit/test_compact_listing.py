"""A complete listing held as flat arrays: read exactly as the dict it replaces, at a few bytes a message."""

from __future__ import annotations

import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord.protocol.client import ListingEntry
from mirrord.sync.engine import LocalSnapshot, ServerListing, plan_sync
from mirrord.sync.listing import CompactListing
from mirrord.sync.mailbox import _ServerFlags

_FLAGS = st.sampled_from([frozenset(), frozenset({"\\Seen"}), frozenset({"\\Seen", "\\Flagged"}), frozenset({"$Junk"})])
_LISTINGS = st.dictionaries(
    st.integers(1, 2**32 - 1),
    st.builds(ListingEntry, _FLAGS, st.one_of(st.none(), st.integers(0, 2**40))),
    max_size=40,
)


@given(_LISTINGS, st.lists(st.integers(-3, 2**32 + 3), max_size=20))
@settings(max_examples=200, deadline=None)
def test_reads_as_the_dict(listing: dict[int, ListingEntry], probes: list[int]) -> None:
    compact = CompactListing(listing)
    assert len(compact) == len(listing)
    assert list(compact) == sorted(listing)
    assert dict(compact.items()) == listing
    for uid in [*probes, *listing, *reversed(list(listing))]:
        assert (uid in compact) == (uid in listing)
        assert compact.get(uid) == listing.get(uid)
    assert "7" not in compact and None not in compact


@given(_LISTINGS, st.dictionaries(st.integers(1, 2**32 - 1), _FLAGS, max_size=20))
@settings(max_examples=100, deadline=None)
def test_the_engine_plans_the_same_from_it(listing: dict[int, ListingEntry], rows: dict[int, frozenset[str]]) -> None:
    from mirrord.sync.engine import KnownMessage

    known = {uid: KnownMessage(f"k{uid}", flags) for uid, flags in rows.items()}
    local = LocalSnapshot(1, known, None)
    expected = plan_sync(ServerListing(1, {uid: e.flags for uid, e in listing.items()}), local)
    assert plan_sync(ServerListing(1, _ServerFlags(CompactListing(listing))), local) == expected


def test_a_few_bytes_a_message() -> None:
    """It lives through the whole fetch: 170 bytes a message as a dict (17 MB at 100,000), not again (issue #15)."""
    seen = frozenset({"\\Seen"})
    listing = {uid: ListingEntry(seen if uid % 3 else frozenset(), 2000 + uid) for uid in range(1, 50_001)}
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        compact = CompactListing(listing)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        if started:
            tracemalloc.stop()
    assert held < 24 * len(listing), held
    assert compact[50_000] == listing[50_000]
