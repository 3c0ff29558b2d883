"""Getting started: ``mirrord init`` (a commented config to edit) and ``mirrord install-service``.

A newcomer's first command, before any config exists, should not end at
"no such file". ``init`` writes the example config that ships inside the
package (the repository's ``config.example.yaml``) where mirrord will look,
and says which keys to edit and what to run next.

``install-service`` writes the systemd user units that ship inside the
package into ``~/.config/systemd/user/``, with ``ExecStart=`` naming the
absolute path of the ``mirrord`` being run. A bare ``ExecStart=mirrord``
could not find a virtualenv's or pipx's copy (the user manager's PATH has
neither), and systemd 252's ``systemd-analyze --user verify`` refuses a
bare name outright; whichever way mirrord was installed, the command that
installs the unit knows where it is.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
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
        f"  mirrord {c}install-service  runs it as a systemd user service\n"
    )


UNITS = ("mirrord.service", "mirrord@.service")
MARK = "# Written by `mirrord install-service`"
"""First line of an installed unit: a unit that starts with it may be rewritten."""


def mirrord_command() -> list[str]:
    """The absolute command line that runs this mirrord: its script, or this Python with ``-m mirrord``."""
    script = sys.argv[0] if sys.argv else ""
    if os.path.basename(script) == "mirrord" and os.access(script, os.X_OK):
        # Not resolved: pipx's ~/.local/bin/mirrord is a link that survives upgrades.
        return [os.path.abspath(script)]
    return [os.path.abspath(sys.executable), "-m", "mirrord"]


def systemd_word(word: str) -> str:
    """One ExecStart= argument, escaped for systemd: ``%`` and ``$`` doubled, quoted if needed."""
    escaped = word.replace("%", "%%").replace("$", "$$")
    if re.search(r'[\s"\'\\;]', escaped) or not escaped:
        escaped = '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped


def unit_dir() -> Path:
    """Where systemd looks for a user's own units: $XDG_CONFIG_HOME/systemd/user."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "systemd" / "user"


def render_unit(name: str, command: list[str], config: Path | None) -> str:
    """The shipped unit ``name`` with an absolute ExecStart=; ``config`` adds ``-c`` (mirrord.service only)."""
    text = resources.files("mirrord").joinpath(name).read_text(encoding="utf-8")
    start = " ".join(systemd_word(w) for w in command)
    if config is not None and name == "mirrord.service":
        start += " -c " + systemd_word(str(config))
    text, count = re.subn(r"(?m)^ExecStart=mirrord ", lambda _: f"ExecStart={start} ", text)
    if count != 1:
        raise InitError(f"the shipped {name} has no `ExecStart=mirrord ...` line to fill in")
    header = (
        f"{MARK} from the unit shipped with mirrord;\n"
        "# running it again rewrites this file. To change a setting, use a drop-in\n"
        f"# (`systemctl --user edit {name.replace('.service', '')}`) rather than editing it.\n"
    )
    return header + text


def install_service(config: Path | None, *, force: bool = False) -> str:
    """Write both units into :func:`unit_dir`; returns what to tell the user.

    ``config``: the file ``-c`` named, if any, made absolute into
    mirrord.service's command line; without it the service reads the
    default config, as ``mirrord`` does. A unit there that this command did
    not write is left alone unless ``force``.
    """
    directory = unit_dir()
    command = mirrord_command()
    absolute = Path(config).expanduser().absolute() if config is not None else None
    rendered = {name: render_unit(name, command, absolute) for name in UNITS}
    for name in UNITS:
        target = directory / name
        try:
            first = target.read_text(encoding="utf-8", errors="replace").partition("\n")[0]
        except FileNotFoundError:
            continue
        except OSError as e:
            raise InitError(f"cannot read {target}: {e.strerror or e}") from None
        if not first.startswith(MARK) and not force:
            raise InitError(f"{target} exists and was not written by `mirrord install-service`; "
                            "move it away, or give --force to replace it")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in rendered.items():
            temporary = directory / f".{name}.tmp"
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, directory / name)
    except OSError as e:
        raise InitError(f"cannot write {e.filename or directory}: {e.strerror or e}") from None
    c = config_option(config) if config is not None else ""
    lines = [
        f"wrote {directory / 'mirrord.service'}",
        f"  ExecStart={' '.join(systemd_word(w) for w in command)}"
        + (f" -c {systemd_word(str(absolute))}" if absolute else "") + " run",
        f"wrote {directory / 'mirrord@.service'} (one instance per config file: mirrord@work reads "
        "~/.config/mirrord/work.yaml)",
    ]
    wanted = absolute or default_config_path()
    if not wanted.exists():
        lines.append(f"note: {wanted} does not exist yet: `mirrord {c}init` writes one; "
                     "the service cannot start without it")
    lines += [
        "Now:",
        "  systemctl --user daemon-reload",
        "  systemctl --user enable --now mirrord",
        "  journalctl --user -u mirrord -f",
        "To keep it running while you are logged out: loginctl enable-linger \"$USER\"",
    ]
    return "\n".join(lines) + "\n"
