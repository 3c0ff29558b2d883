"""Fixtures shared by mirrord's tests: a real Dovecot, and a fresh account on it per test.

One server serves the whole run, because starting and stopping one costs
about a second and a half; each test gets its own user instead, which costs
a one-line file and a directory, so tests never see each other's mail.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as _hypothesis_settings

from mirrord import testing
from mirrord.testing import ImapAccount, PrivateDovecot
from tests._needs import missing, under_ci

# Property tests explore new examples on every developer run (that is how they
# find bugs), but CI replays a fixed set: a landing must not depend on the luck
# of the draw. Anything a developer run finds becomes an explicit test.
_hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if under_ci():
    _hypothesis_settings.load_profile("ci")


def _require_dovecot() -> None:
    """Skip when Dovecot is missing on a developer's machine; fail under CI.

    CI installs Dovecot, so its absence there means a broken setup that a
    skip would hide: the integration tests would silently stop running.
    """
    if PrivateDovecot.available():
        return
    missing(f"Dovecot is not installed ({testing.DOVECOT}); run `apt-get install dovecot-imapd`")


class _Roots:
    """Hands out directories for private servers.

    Run by an ordinary user, they go under pytest's tmp_path_factory and
    stay for inspection like any test's files. Run by root (as CI is), the
    server's mail processes run as ``nobody``, who cannot pass through
    pytest's mode-0700 ``/tmp/pytest-of-root``; loosening that directory
    would not last, since every pytest run starting concurrently resets it.
    So root's servers live in directories of their own under the system temp
    dir, removed at the end of the session (kept if MIRRORD_KEEP_DOVECOT is set).
    """

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._made: list[Path] = []

    def new(self, name: str) -> Path:
        if os.geteuid() != 0:
            return self._factory.mktemp(name)
        path = Path(tempfile.mkdtemp(prefix=f"mirrord-{name}-"))
        self._made.append(path)
        return path

    def cleanup(self) -> None:
        if os.environ.get("MIRRORD_KEEP_DOVECOT"):
            return
        for path in self._made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot_roots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Roots]:
    roots = _Roots(tmp_path_factory)
    yield roots
    roots.cleanup()


@pytest.fixture(scope="session")
def dovecot(dovecot_roots: _Roots) -> Iterator[PrivateDovecot]:
    """The run's shared Dovecot. Tests must not stop it; use ``dovecot_factory`` for that."""
    _require_dovecot()
    server = PrivateDovecot(dovecot_roots.new("dovecot"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def imap_account(dovecot: PrivateDovecot, request: pytest.FixtureRequest) -> Iterator[ImapAccount]:
    """A fresh user on the shared server: empty mailboxes, and a client logged in as it."""
    account = dovecot.new_account(request.node.name)
    try:
        yield account
    finally:
        account.close()


@pytest.fixture
def dovecot_factory(dovecot_roots: _Roots) -> Iterator[Callable[..., PrivateDovecot]]:
    """Start extra servers with their own settings (hidden capabilities, low limits...).

    ``dovecot_factory(imap_capability="IMAP4rev1 UIDPLUS")`` returns a started
    server; every one still running is stopped when the test ends. Each costs
    about 1.5 s, so use the shared ``dovecot`` where the defaults will do.
    """
    _require_dovecot()
    started: list[PrivateDovecot] = []

    def start(**options: Any) -> PrivateDovecot:
        server = PrivateDovecot(dovecot_roots.new("dovecot"), **options)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
