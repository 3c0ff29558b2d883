"""Counts and sizes (issue 16 item 9): the progress line and the log use the same unit."""

from __future__ import annotations

from mirrord.progress import Progress
from mirrord.units import plural, size


def test_plural_agrees_with_the_count() -> None:
    assert plural(1, "account") == "1 account"
    assert plural(0, "account") == "0 accounts"
    assert plural(2, "mailbox", "mailboxes") == "2 mailboxes"
    assert plural(1, "mailbox", "mailboxes") == "1 mailbox"


def test_sizes_are_decimal_like_the_progress_line() -> None:
    assert size(999) == "999 B"
    assert size(2_500) == "2.5 kB"
    assert size(12_345_678) == "12.3 MB"
    assert size(1_500_000_000) == "1.5 GB"
    progress = Progress(clock=lambda: 0.0)
    progress.planned(1, 12_345_678)
    progress.done(1, 12_345_678)
    assert "12.3/12.3 MB" in progress.line()  # the same figure as size() gives the log
