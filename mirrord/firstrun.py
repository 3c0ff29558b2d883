"""Getting started: ``mirrord init`` (a commented config to edit).

A newcomer's first command, before any config exists, should not end at
"no such file". ``init`` writes the example config that ships inside the
package (the repository's ``config.example.yaml``) where mirrord will look,
and says which keys to edit and what to run next.
"""

from __future__ import annotations

import os
import shlex
from importlib import resources
from pathlib import Path

from mirrord.config import default_config_path


class InitError(Exception):
    """``init`` refused or failed; the message says why and what to do."""


def example_config() -> str:
    """The commented example config, as shipped in the package."""
    return resources.files("mirrord").joinpath("config.example.yaml").read_text(encoding="utf-8")


def config_option(path: Path) -> str:
    """``-c PATH `` when ``path`` is not where mirrord looks by default, else nothing.

    Used to spell the next command a user should type: the one that names the
    file they just made.
    """
    if Path(path).expanduser() == default_config_path():
        return ""
    return f"-c {shlex.quote(str(path))} "


def init_config(path: Path) -> str:
    """Write the example config to ``path`` (0600, its folder 0700); never overwrite.

    Returns what to tell the user: where the file is, what to edit, what next.
    """
    target = Path(path).expanduser()
    if target.exists() or target.is_symlink():
        raise InitError(f"{target} already exists; edit it, or move it away to start afresh")
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_EXCL: a file that appeared since the check is not overwritten.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(example_config())
    except OSError as e:
        raise InitError(f"cannot write {e.filename or target}: {e.strerror or e}") from None
    c = config_option(path)
    return (
        f"wrote {target}, a commented example.\n"
        "Edit it: under accounts, rename 'personal' if you like and set host, username,\n"
        "password_command (or password_file) and maildir; every key is explained there.\n"
        "Then:\n"
        f"  mirrord {c}check       connects, logs in and lists what would be mirrored\n"
        f"  mirrord {c}run --once  makes the first copy, with progress\n"
    )
