"""Pure helpers of the sync: local names for server mailboxes, and fetch batches."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirrord.sync.mailbox import BATCH_BYTES, BATCH_MESSAGES, batches
from mirrord.sync.names import UnmappableName, local_name, maildir_path


@pytest.mark.parametrize(
    ("server", "delimiter", "prefix", "local"),
    [
        ("INBOX", "/", "", "INBOX"),
        ("inbox", ".", "INBOX.", "INBOX"),
        ("Archive/2024", "/", "", "Archive/2024"),
        ("INBOX.Archive.2024", ".", "INBOX.", "Archive/2024"),  # Cyrus, Courier
        ("Entwürfe", "/", "", "Entwürfe"),
        ("Flat", None, "", "Flat"),
    ],
)
def test_local_names(server: str, delimiter: str | None, prefix: str, local: str) -> None:
    assert local_name(server, delimiter, prefix) == local


@pytest.mark.parametrize(
    ("server", "delimiter"),
    [("a/../b", "/"), ("a//b", "/"), ("INBOX.a/b", "."), ("..", "/"), ("x/.", "/")],
)
def test_names_that_would_escape_or_merge_are_refused(server: str, delimiter: str) -> None:
    with pytest.raises(UnmappableName):
        local_name(server, delimiter, "INBOX." if delimiter == "." else "")


def test_maildir_subfolder_names_are_refused() -> None:
    root = Path("/m")
    assert maildir_path(root, "Archive/2024") == Path("/m/Archive/2024")
    assert maildir_path(root, "new") == Path("/m/new")  # a top-level "new" has no parent Maildir
    for bad in ("INBOX/cur", "Archive/tmp/x", "new/x"):
        with pytest.raises(UnmappableName):
            maildir_path(root, bad)


@given(
    st.lists(st.integers(1, 10**6), unique=True, max_size=800).map(sorted),
    st.integers(1, 8),
    st.randoms(use_true_random=False),
)
def test_batches_cover_every_uid_once_within_bounds(uids: list[int], workers: int, rng: object) -> None:
    sizes = {uid: rng.choice([None, 100, 50_000, 3 * 1024 * 1024, 40 * 1024 * 1024]) for uid in uids}  # type: ignore[attr-defined]
    out = batches(uids, sizes, workers)
    assert [uid for batch in out for uid in batch] == uids
    for batch in out:
        assert 1 <= len(batch) <= BATCH_MESSAGES
        if len(batch) > 1:
            assert sum(sizes[u] or 0 for u in batch) <= BATCH_BYTES
    if uids and len(uids) >= workers and all(s is None for s in sizes.values()):
        assert len(out) >= workers, "a small mailbox is still spread over every worker"


def test_a_catch_up_of_a_hundred_messages_is_fetched_on_the_selected_connection() -> None:
    """100 new messages go in one command on the worker that has the mailbox selected,
    not over new connections that each log in and EXAMINE (issue #15); a big catch-up
    still spreads over the workers."""
    from mirrord.protocol.client import ListingEntry
    from mirrord.sync.fetching import few

    listing = {uid: ListingEntry(frozenset(), 20_000) for uid in range(1, 2001)}
    assert few(list(range(1, 101)), listing)
    assert few(list(range(1, BATCH_MESSAGES + 1)), listing)
    assert not few(list(range(1, BATCH_MESSAGES + 2)), listing)
    big = {uid: ListingEntry(frozenset(), BATCH_BYTES // 50) for uid in range(1, 101)}
    assert not few(list(big), big)
