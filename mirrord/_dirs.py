"""Private directories, in a module of their own: ``status``, ``init`` and the
state DB need them without importing Twisted (see :mod:`mirrord.cli`)."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_DIR_MODE = 0o700


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents 0700; leave existing ones alone.

    An existing parent may be ``$XDG_RUNTIME_DIR`` or the user's home, whose
    modes are not ours to change. The chmod is needed because mkdir's mode
    is filtered by the umask.
    """
    missing: list[Path] = []
    p = Path(path)
    while not p.exists() and p.parent != p:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(d, PRIVATE_DIR_MODE)
