"""The shipped systemd user units: the settings mirrord relies on, and systemd's own verdict.

The static checks pin what the daemon depends on (Type=notify for READY=1,
the watchdog, exit status 2 meaning "bad config, do not retry") and keep the
hardening to what works in an unprivileged user manager. The last tests hand
the files to ``systemd-analyze --user verify``; they skip on a machine
without systemd but fail under CI, which installs it (Debian's ``systemd``
for systemd-analyze, ``procps`` for the ``kill`` that ExecReload= runs), so
a broken unit cannot slip through as a skip.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mirrord.cli import EXIT_USAGE
from tests._needs import missing

UNITS = Path(__file__).resolve().parents[2] / "systemd"
SERVICE = UNITS / "mirrord.service"
TEMPLATE = UNITS / "mirrord@.service"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Sections -> key -> every value, in order (systemd keys may repeat).

    Enough of systemd's syntax for our files: comments, sections, ``Key=value``
    and backslash continuations; an empty assignment resets the list, as in
    systemd.
    """
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path}:{number}: setting outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}:{number}: not Key=value: {line!r}"
        values = section.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= should be set once, is {values}"
    return values[0]


def seconds(span: str) -> float:
    """A systemd time span such as ``30s``, ``2min`` or ``1min 30s``, in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit]
    return total


@pytest.fixture(scope="module", params=[SERVICE, TEMPLATE], ids=["mirrord.service", "mirrord@.service"])
def unit(request: pytest.FixtureRequest) -> Unit:
    return parse_unit(request.param)


# -- what the daemon relies on --------------------------------------------------------


def test_type_notify_with_a_watchdog(unit: Unit) -> None:
    assert one(unit, "Service", "Type") == "notify"
    watchdog = seconds(one(unit, "Service", "WatchdogSec"))
    # mirrord pings every half period from its reactor: long enough for a slow
    # disk to be no false alarm, short enough that a hang is ended soon.
    assert 30 <= watchdog <= 600


def test_runs_the_daemon_in_the_foreground(unit: Unit) -> None:
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert argv[0] == "mirrord" and argv[-1] == "run"
    assert "--once" not in argv


def test_template_instance_picks_the_config_file() -> None:
    argv = shlex.split(one(parse_unit(TEMPLATE), "Service", "ExecStart"))
    assert argv == ["mirrord", "-c", "%E/mirrord/%i.yaml", "run"]


def test_mirrord_is_found_where_pip_and_pipx_put_it(unit: Unit) -> None:
    path = one(unit, "Service", "ExecSearchPath").split(":")
    assert path[0] == "%h/.local/bin"  # pip install --user, pipx: ahead of system copies, as in a shell
    assert {"/usr/local/bin", "/usr/bin", "/bin"} <= set(path)


def test_restarts_on_failure_but_not_on_a_bad_config(unit: Unit) -> None:
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "RestartPreventExitStatus") == str(EXIT_USAGE)
    assert seconds(one(unit, "Service", "RestartSec")) >= 10  # no login storm in a crash loop


def test_stops_in_bounded_time(unit: Unit) -> None:
    assert 5 <= seconds(one(unit, "Service", "TimeoutStopSec")) <= 90


def test_reload_sends_sighup_to_the_main_process(unit: Unit) -> None:
    assert shlex.split(one(unit, "Service", "ExecReload")) == ["kill", "-HUP", "$MAINPID"]


def test_a_watchdog_kill_leaves_a_traceback_and_no_core(unit: Unit) -> None:
    assert "PYTHONFAULTHANDLER=1" in unit["Service"]["Environment"]
    assert one(unit, "Service", "LimitCORE") == "0"  # a core would hold the passwords


def test_started_with_the_user_session(unit: Unit) -> None:
    assert one(unit, "Install", "WantedBy") == "default.target"


# -- hardening that works in a user manager ---------------------------------------------


def test_hardening(unit: Unit) -> None:
    service = unit["Service"]
    assert one(unit, "Service", "UMask") == "0077"
    for key in (
        "NoNewPrivileges",
        "RestrictSUIDSGID",
        "RestrictRealtime",
        "LockPersonality",
        "RestrictNamespaces",
    ):
        assert one(unit, "Service", key) == "yes", key
    assert one(unit, "Service", "SystemCallArchitectures") == "native"
    assert one(unit, "Service", "SystemCallFilter") == "@system-service"
    assert set(one(unit, "Service", "RestrictAddressFamilies").split()) >= {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "User" not in service and "Group" not in service  # a user unit runs as its user


# Each of these needs a mount or user namespace, which an unprivileged user
# manager can only get where unprivileged user namespaces are allowed;
# elsewhere the service would not start at all.
NEEDS_NAMESPACES = {
    "PrivateTmp", "PrivateDevices", "PrivateUsers", "PrivateMounts", "PrivateIPC",
    "ProtectSystem", "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules",
    "ProtectKernelLogs", "ProtectControlGroups", "ProtectHostname", "ProtectClock", "ProtectProc",
    "ProcSubset", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem",
    "BindPaths", "BindReadOnlyPaths",
}  # fmt: skip
# Newer than Debian 12's systemd 252, which would warn and ignore them.
NEWER_THAN_252 = {"RestartSteps", "RestartMaxDelaySec", "OpenFile", "MemoryKSM", "ReloadSignal"}


def test_nothing_that_breaks_an_unprivileged_user_manager(unit: Unit) -> None:
    service = unit["Service"]
    assert NEEDS_NAMESPACES.isdisjoint(service), NEEDS_NAMESPACES & service.keys()
    assert NEWER_THAN_252.isdisjoint(service), NEWER_THAN_252 & service.keys()
    # Breaks pyOpenSSL's verify callback (a cffi callback needs W+X memory).
    assert "MemoryDenyWriteExecute" not in service
    assert "notify-reload" not in service["Type"]  # systemd 253+


def test_template_and_service_agree() -> None:
    """The template repeats mirrord.service (a unit cannot include another); keep them in step."""
    service, template = parse_unit(SERVICE), parse_unit(TEMPLATE)
    for section in (service, template):
        section["Service"].pop("ExecStart")
        section["Unit"].pop("Description")
    assert service == template


# -- systemd's verdict -------------------------------------------------------------------


def _need(what: str, found: str | None, hint: str) -> str:
    if found:
        return found
    missing(f"{what} not found; {hint}")


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    """``systemd-analyze --user verify`` on both units: no error and no warning.

    What it takes as root in a container, with no systemd running: a
    private $XDG_RUNTIME_DIR (the user manager it simulates wants one), and
    an ExecStart= it can resolve. systemd 252's verify looks a bare command
    name up in its built-in directories only, ignoring ExecSearchPath= and
    $PATH, so the copies verified here name the installed ``mirrord`` by
    its absolute path; ``kill`` (procps) must be in /usr/bin or /bin. Nothing
    is started: verify loads the units into a test instance of the manager.
    """
    analyze = _need("systemd-analyze", shutil.which("systemd-analyze"), "apt-get install systemd")
    mirrord = shutil.which("mirrord") or shutil.which("mirrord", path=os.path.dirname(sys.executable))
    mirrord = _need("the mirrord command", mirrord, "install mirrord (pip install -e .)")

    units = tmp_path / "units"
    units.mkdir()
    for source in (SERVICE, TEMPLATE):
        text = source.read_text()
        text, count = re.subn(r"(?m)^ExecStart=mirrord ", f"ExecStart={mirrord} ", text)
        assert count == 1
        (units / source.name).write_text(text)
    # An instance as `systemctl --user enable mirrord@work` makes it: %i resolved.
    (units / "mirrord@work.service").symlink_to("mirrord@.service")

    home, runtime = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "SYSTEMD_"))}
    env.update(HOME=str(home), XDG_RUNTIME_DIR=str(runtime), SYSTEMD_LOG_LEVEL="info", SYSTEMD_LOG_COLOR="0")
    result = subprocess.run(
        [analyze, "--user", "--man=no", "verify",
         *(str(units / name) for name in ("mirrord.service", "mirrord@.service", "mirrord@work.service"))],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60,
    )  # fmt: skip
    output = (result.stdout + result.stderr).strip()
    hint = ""
    if "kill is not executable" in output:
        hint = "\n(ExecReload= runs kill from procps: apt-get install procps)"
    assert result.returncode == 0 and output == "", f"systemd-analyze verify said:\n{output}{hint}"
