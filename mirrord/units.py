"""Counts and sizes as people read them: ``1 account``, ``2 accounts``, ``3.4 MB``.

One place for both, so the progress line, the log and ``status`` agree:
sizes are decimal (1 MB = 10^6 bytes, as disks, links and mbsync count),
never 2^20 in one place and 10^6 in another for the same data.
"""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 account``, ``2 accounts``, ``0 accounts``; ``nouns`` for irregular plurals."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


def size(n: float) -> str:
    """Bytes in decimal units: ``512 B``, ``3.4 kB``, ``12.0 MB``, ``1.2 GB``."""
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def megabytes(n: float) -> str:
    """A number of MB (10^6 bytes) with one decimal, for the progress line's ``x/y MB``."""
    return f"{n / 1e6:.1f}"
