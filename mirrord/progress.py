"""Progress of a long first sync, for a person watching ``mirrord run --once`` in a terminal.

A first sync of a big mailbox takes minutes; silence for minutes looks like
a hang. On a terminal one line is kept current (messages and bytes done,
rate, time left); log lines are written above it. Not on a terminal (a
timer, a pipe, the journal) nothing of this is printed: the per-mailbox log
lines are the record there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TextIO

from mirrord.units import megabytes


class Progress:
    """Counts what the syncs planned and what they did; pure bookkeeping."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started = clock()
        self.planned_messages = 0
        self.planned_bytes = 0
        self.done_messages = 0
        self.done_bytes = 0

    def planned(self, messages: int, size: int) -> None:
        self.planned_messages += messages
        self.planned_bytes += size

    def done(self, messages: int, size: int) -> None:
        self.done_messages += messages
        self.done_bytes += size

    def line(self) -> str:
        elapsed = max(self._clock() - self.started, 1e-6)
        rate = self.done_bytes / elapsed
        text = (
            f"{self.done_messages}/{self.planned_messages} messages, "
            f"{_mb(self.done_bytes)}/{_mb(self.planned_bytes)} MB, {_mb(rate)} MB/s"
        )
        left = self.planned_bytes - self.done_bytes
        if rate > 0 and self.done_messages and left > 0:
            text += f", about {_duration(left / rate)} left"
        return text


class TerminalProgress:
    """Keeps the progress line at the bottom of a terminal, under the log lines."""

    def __init__(self, progress: Progress, stream: TextIO) -> None:
        self.progress = progress
        self.stream = stream
        self._shown = False

    def render(self) -> None:
        if not self.progress.planned_messages:
            return
        self.stream.write("\r\x1b[K" + self.progress.line())
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def attach(self, handler: logging.Handler) -> None:
        """Clear the line before each log record, so records never land mid-line."""
        progress = self

        class _ClearFirst(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                progress.clear()
                return True

        handler.addFilter(_ClearFirst())


_mb = megabytes


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}:{seconds:02d}"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"
