"""Log lines show control characters from server names as visible escapes."""

from __future__ import annotations

import io
import logging

import pytest

from mirrord.logs import setup_logging


@pytest.mark.parametrize("journal", [False, True])
def test_control_characters_in_a_message_are_escaped(monkeypatch: pytest.MonkeyPatch, journal: bool) -> None:
    if journal:
        monkeypatch.setenv("JOURNAL_STREAM", "8:1")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(stream=out)
        logging.getLogger("mirrord.test").warning("%s: FAILED", "acct/evil\x1b[2J\n<3>forged")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = [line for line in out.getvalue().splitlines() if "acct/" in line or "forged" in line]
    assert len(lines) == 1 and "\x1b" not in lines[0]  # Twisted may warn about a second beginLoggingTo
    assert lines[0].endswith("acct/evil\\x1b[2J\\x0a<3>forged: FAILED")


def test_tracebacks_keep_their_lines() -> None:
    from mirrord.logs import _VisibleFormatter

    try:
        raise ValueError("x")
    except ValueError:
        record = logging.LogRecord("m", logging.ERROR, __file__, 1, "boom", (), __import__("sys").exc_info())
    text = _VisibleFormatter("%(message)s").format(record)
    assert text.startswith("boom\nTraceback")
