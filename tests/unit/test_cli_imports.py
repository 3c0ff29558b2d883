"""Commands that do not talk to a server start without Twisted (issue #15).

Importing Twisted's reactor and TLS stack (pyOpenSSL, cryptography,
service_identity) is most of a Python start-up's cost; ``mirrord status``,
``--version``, ``--help``, ``init`` and a config error need none of it. Each
case runs in a fresh interpreter, as a user's command does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import contextlib, io, json, sys
import mirrord.cli
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = mirrord.cli.main(sys.argv[1:])
except SystemExit as e:
    status = e.code
print(json.dumps({"status": status, "output": out.getvalue(),
                  "modules": sorted(m for m, module in sys.modules.items() if module is not None
                                    and m.split(".")[0] in ("twisted", "OpenSSL", "service_identity", "cryptography"))}))
"""

GOOD = """\
state_dir: {root}/state
accounts:
  home:
    host: 127.0.0.1
    port: 1
    tls: none
    username: me
    password_command: [echo, secret]
    maildir: {root}/Mail
"""


def probe(*argv: str) -> dict:
    run = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "argv, status",
    [
        (["--version"], 0),
        (["--help"], 0),
        (["run", "--help"], 0),
        (["-c", "{root}/good.yaml", "status"], 0),
        (["-c", "{root}/good.yaml", "status", "--json"], 0),
        (["-c", "{root}/bad.yaml", "run", "--once"], 2),
        (["-c", "{root}/missing.yaml", "status"], 2),
        (["-c", "{root}/new.yaml", "init"], 0),
    ],
)
def test_commands_that_do_not_talk_to_a_server_import_neither_the_reactor_nor_tls(
    tmp_path: Path, argv: list[str], status: int
) -> None:
    (tmp_path / "good.yaml").write_text(GOOD.format(root=tmp_path))
    (tmp_path / "bad.yaml").write_text("accounts: 3\n")
    result = probe(*(a.format(root=tmp_path) for a in argv))
    assert result["status"] == status, result["output"]
    assert "twisted.internet.reactor" not in result["modules"]
    assert not [m for m in result["modules"] if m.split(".")[0] in ("OpenSSL", "service_identity")]
    assert result["modules"] == [], "no Twisted at all: " + ", ".join(result["modules"][:8])


def test_a_status_with_a_state_db_imports_no_twisted(tmp_path: Path) -> None:
    from mirrord.store.state import StateDB

    (tmp_path / "good.yaml").write_text(GOOD.format(root=tmp_path))
    with StateDB(tmp_path / "state" / "state.sqlite3") as db:
        db.set_mailbox("home", "INBOX", 7, 3, 1.0)
    result = probe("-c", str(tmp_path / "good.yaml"), "status")
    assert result["status"] == 0, result["output"]
    assert "INBOX" in result["output"], result["output"]
    assert result["modules"] == [], ", ".join(result["modules"][:8])


QUICK = """
import atexit, sys
class Torn:
    def __del__(self):
        print("torn down", flush=True)
kept = Torn()
atexit.register(lambda: print("atexit ran"))
print("before", end="")  # unflushed: the quick exit must flush it
from mirrord.cli import entry
entry()
"""


def test_the_command_exits_without_tearing_the_interpreter_down(tmp_path: Path) -> None:
    """``entry`` runs atexit handlers and flushes, then skips the ~45 ms teardown (issue #15)."""
    (tmp_path / "good.yaml").write_text(GOOD.format(root=tmp_path))
    run = subprocess.run([sys.executable, "-c", QUICK, "-c", str(tmp_path / "good.yaml"), "status"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("before") and "atexit ran" in run.stdout, run.stdout
    assert "torn down" not in run.stdout
    missing = subprocess.run([sys.executable, "-c", QUICK, "-c", str(tmp_path / "missing.yaml"), "status"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no such file" in missing.stderr, missing.stderr


@pytest.mark.parametrize("tls", ["none", "implicit"])
def test_a_one_shot_run_on_plaintext_loopback_loads_no_tls(tmp_path: Path, tls: str) -> None:
    """``run --once`` whose accounts all use ``tls: none`` keeps pyOpenSSL out (35 ms of start-up, issue #15);
    any other account gets it as always."""
    (tmp_path / "good.yaml").write_text(GOOD.format(root=tmp_path).replace("tls: none", f"tls: {tls}"))
    result = probe("-c", str(tmp_path / "good.yaml"), "run", "--once")  # port 1: refused
    assert result["status"] == 1, result["output"]
    assert "twisted.internet.reactor" in result["modules"]
    tls_stack = [m for m in result["modules"] if m.split(".")[0] in ("OpenSSL", "service_identity", "cryptography")]
    if tls == "none":
        assert tls_stack == [], ", ".join(tls_stack[:8])
    else:
        assert "OpenSSL.SSL" in tls_stack
