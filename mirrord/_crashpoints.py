"""Named points where the crash tests kill mirrord, to prove each step is safe to die in.

``MIRRORD_TEST_CRASH_AT=NAME`` makes the process SIGKILL itself the first
time it reaches :func:`crash_point` ``(NAME)``: no cleanup, no flush, as a
power cut or the OOM killer would. Random kills (tests/integration/test_crashes.py)
find what nobody thought of; these hit the moments that matter for
sure, e.g. right after the server accepted an APPEND and before its row
was recorded. Unset (always, outside the tests), a call is one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "MIRRORD_TEST_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
