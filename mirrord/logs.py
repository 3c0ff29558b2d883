"""Logging for the person reading ``journalctl --user -u mirrord`` or a terminal.

One line per event that matters, naming account and mailbox. Under journald
(``$JOURNAL_STREAM`` set) lines carry a ``<N>`` syslog priority prefix and no
timestamp of ours, so ``journalctl -p`` filters them and times are not
doubled. ``-v`` turns on the protocol trace (logger ``mirrord.trace``), which
the protocol layer writes with credentials already redacted.
"""

from __future__ import annotations

import logging
import os
import sys

from mirrord.sync.names import visible

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _VisibleFormatter(logging.Formatter):
    """Spells control characters in the message as ``\\xNN``.

    Mailbox names come from the server: an LF in one would forge a second
    log line, an ESC would reach the terminal. Tracebacks (added after the
    message) keep their line breaks.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = visible(record.message)
        return super().formatMessage(record)


class _JournalFormatter(_VisibleFormatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


def setup_logging(verbose: bool = False, stream: object = None, *, twisted: bool = True) -> None:
    """Send our logs and Twisted's to stderr, in the form that fits where stderr goes.

    ``twisted=False`` leaves Twisted's logs to :func:`route_twisted_logs`, called
    by the commands that use it: the others then never import Twisted.
    """
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(_VisibleFormatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("mirrord.trace").setLevel(logging.DEBUG if verbose else logging.WARNING)
    if verbose:
        logging.getLogger("mirrord").setLevel(logging.DEBUG)
    # Twisted's own messages ("Starting factory ...") are noise at INFO; its
    # errors (an unhandled error in a Deferred) must still be seen.
    logging.getLogger("twisted").setLevel(logging.WARNING)
    if twisted:
        route_twisted_logs()


def route_twisted_logs() -> None:
    """Twisted's log events go to the standard logging set up above (once; later calls do nothing)."""
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    try:
        globalLogBeginner.beginLoggingTo([STDLibLogObserver(name="twisted")], redirectStandardIO=False)
    except Exception:  # noqa: BLE001 - already begun (tests call this more than once)
        pass
