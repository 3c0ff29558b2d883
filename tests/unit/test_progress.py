"""The progress line of a long first sync."""

from __future__ import annotations

import io
import logging

from mirrord.progress import Progress, TerminalProgress


def test_line_counts_rate_and_time_left() -> None:
    now = [100.0]
    progress = Progress(clock=lambda: now[0])
    progress.planned(1000, 400_000_000)
    now[0] += 10
    progress.done(250, 100_000_000)
    assert progress.line() == "250/1000 messages, 100.0/400.0 MB, 10.0 MB/s, about 30 s left"


def test_terminal_line_is_cleared_before_log_records() -> None:
    stream = io.StringIO()
    progress = Progress()
    progress.planned(10, 1000)
    terminal = TerminalProgress(progress, stream)
    handler = logging.StreamHandler(stream)
    terminal.attach(handler)
    logger = logging.getLogger("test.progress")
    logger.addHandler(handler)
    try:
        terminal.render()
        logger.warning("a log line")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert out.startswith("\r\x1b[K0/10 messages")
    assert out.endswith("\r\x1b[Ka log line\n"), repr(out)


def test_nothing_shown_before_anything_is_planned() -> None:
    stream = io.StringIO()
    TerminalProgress(Progress(), stream).render()
    assert stream.getvalue() == ""
