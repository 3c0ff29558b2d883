"""Tools the tests need from the machine: skipped on a developer's, a failure under CI.

CI installs every one of them (.ci/run), so a missing one there means a
broken setup that a skip would hide: the tests needing it would silently
stop running.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(message: str) -> NoReturn:
    """Skip the test for want of ``message``'s tool, or fail it when CI is set."""
    if under_ci():
        pytest.fail(f"{message}. CI is set, so this is an error, not a skip.", pytrace=False)
    pytest.skip(message)
