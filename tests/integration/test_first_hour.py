"""Issue 16, "the first hour": what a newcomer meets between install and a running service.

Each test drives the public command line, as a user would, against the
private Dovecot where a server is involved.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord.testing import ImapAccount, make_message
from tests._needs import missing
from tests.integration._mirrord import DaemonProcess, mirrord, tmpfs, write_config


def _config_with_port(tmp_path: Path, account: ImapAccount, *, tls: str, port: int) -> Path:
    config = write_config(tmp_path, account, tls=tls)
    text = re.sub(r"(?m)^    port: \d+$", f"    port: {port}", config.read_text())
    config.write_text(text)
    return config


# -- 5: a TLS/plaintext mismatch says so, in seconds -----------------------------------


@pytest.mark.parametrize(
    "command", [["check"], pytest.param(["run", "--once"], marks=pytest.mark.slow)], ids=["check", "run-once"]
)
def test_starttls_against_the_tls_port_says_try_implicit_within_seconds(
    imap_account: ImapAccount, tmp_path: Path, command: list[str]
) -> None:
    config = _config_with_port(tmp_path, imap_account, tls="starttls", port=imap_account.imaps_port)
    started = time.monotonic()
    run = mirrord("-c", str(config), *command, timeout=60)
    took = time.monotonic() - started
    assert run.status == 1
    output = run.stdout + run.stderr
    assert f"no IMAP greeting from localhost:{imap_account.imaps_port} within 10 s" in output, output
    assert "try `tls: implicit`" in output
    assert "Traceback" not in output
    # One greeting deadline, not three two-minute command deadlines (was 121 s and 363 s).
    assert took < 20, f"took {took:.1f} s"


@pytest.mark.parametrize("command", [["check"], ["run", "--once"]], ids=["check", "run-once"])
def test_implicit_tls_against_the_plain_port_says_try_starttls(
    imap_account: ImapAccount, tmp_path: Path, command: list[str]
) -> None:
    config = _config_with_port(tmp_path, imap_account, tls="implicit", port=imap_account.port)
    started = time.monotonic()
    run = mirrord("-c", str(config), *command, timeout=60)
    took = time.monotonic() - started
    assert run.status == 1
    output = run.stdout + run.stderr
    assert "answered in plaintext, not TLS" in output, output
    assert "try `tls: starttls`" in output
    assert "Traceback" not in output
    assert took < 10, f"took {took:.1f} s"


# -- 3: no config yet -------------------------------------------------------------------


def test_no_config_points_at_init_which_writes_a_commented_one_that_check_reads(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    missing = mirrord("check", env=env)
    assert missing.status == 2
    assert "no such file" in missing.stderr
    assert "`mirrord init` writes a commented one" in missing.stderr, missing.stderr

    made = mirrord("init", env=env)
    assert made.status == 0, made.stderr
    config = home / ".config" / "mirrord" / "config.yaml"
    assert f"wrote {config}" in made.stdout
    assert "mirrord check" in made.stdout and "-c" not in made.stdout
    assert (config.stat().st_mode & 0o777) == 0o600
    assert (config.parent.stat().st_mode & 0o777) == 0o700
    assert config.read_text() == (Path(__file__).parents[2] / "config.example.yaml").read_text()

    # Never overwritten.
    config.write_text(config.read_text().replace("imap.example.org", "imap.mine.example"))
    again = mirrord("init", env=env)
    assert again.status == 1 and "already exists" in again.stderr
    assert "imap.mine.example" in config.read_text()


def test_init_with_c_names_that_file_in_its_advice(tmp_path: Path) -> None:
    target = tmp_path / "work.yaml"
    missing = mirrord("-c", str(target), "run", "--once")
    assert f"`mirrord -c {target} init`" in missing.stderr
    made = mirrord("-c", str(target), "init")
    assert made.status == 0
    assert f"mirrord -c {target} check" in made.stdout
    # The example is valid as written: only the password command and the server are placeholders.
    from mirrord.config import load_config

    assert [a.name for a in load_config(target).accounts] == ["personal"]


# -- 7: ~ and $HOME in command arguments ------------------------------------------------


def _password_command_config(tmp_path: Path, account: ImapAccount, command: str) -> Path:
    config = write_config(tmp_path, account)
    text = re.sub(r"(?m)^    password_file: .*$", f"    password_command: {command}", config.read_text())
    config.write_text(text)
    return config


@pytest.mark.parametrize("spelling", ["~/.mailpass", "$HOME/.mailpass", "${HOME}/.mailpass"])
def test_home_is_expanded_in_password_command(
    imap_account: ImapAccount, tmp_path: Path, spelling: str
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".mailpass").write_text(imap_account.password + "\n")
    config = _password_command_config(tmp_path, imap_account, f"[cat, '{spelling}']")
    run = mirrord("-c", str(config), "check", env={"HOME": str(home)})
    assert run.status == 0, run.stdout + run.stderr
    assert "capabilities:" in run.stdout


def test_a_password_command_that_fails_names_the_missing_file(imap_account: ImapAccount, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    config = _password_command_config(tmp_path, imap_account, "[cat, ~/.mailpass]")
    run = mirrord("-c", str(config), "run", "--once", env={"HOME": str(home)})
    assert run.status == 1
    assert f"'cat' exited with status 1; no such file: {home}/.mailpass" in run.stderr, run.stderr


# -- 6: a folder mirrord cannot write is found by check, and said as a sentence ----------


@pytest.fixture
def read_only_folder() -> Iterator[Path]:
    """A read-only file system: what root (as CI runs) cannot write either, unlike a chmod."""
    with tmpfs("ro,size=1m", "a read-only folder") as where:
        yield where


@pytest.mark.parametrize("which", ["maildir", "state_dir"])
def test_check_finds_a_folder_it_cannot_write_and_run_says_which_and_what_to_do(
    imap_account: ImapAccount, tmp_path: Path, read_only_folder: Path, which: str
) -> None:
    imap_account.client.append("INBOX", make_message(1), ())
    config = write_config(tmp_path, imap_account)
    target = read_only_folder / "mirror"
    if which == "maildir":
        config.write_text(config.read_text().replace(f"maildir: {tmp_path / 'Mail'}", f"maildir: {target}"))
    else:
        config.write_text(config.read_text().replace(f"state_dir: {tmp_path / 'state'}", f"state_dir: {target}"))

    check = mirrord("-c", str(config), "check")
    assert check.status == 1, check.stdout
    assert (f"FAILED: {which} {target}: cannot create a file in {read_only_folder}: "
            f"{read_only_folder}/.mirrord-check-") in check.stdout, check.stdout
    assert "read-only file system: remount it read-write or choose another folder" in check.stdout

    run = mirrord("-c", str(config), "run", "--once")
    assert run.status == 1
    assert "[Errno" not in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert str(read_only_folder) in run.stderr
    assert "remount it read-write or choose another folder" in run.stderr, run.stderr


def test_check_still_writes_nothing_where_it_can_write(imap_account: ImapAccount, tmp_path: Path) -> None:
    (tmp_path / "Mail").mkdir()
    config = write_config(tmp_path, imap_account)
    check = mirrord("-c", str(config), "check")
    assert check.status == 0, check.stdout
    assert f"maildir {tmp_path / 'Mail'}: can create and rename files there" in check.stdout
    assert list((tmp_path / "Mail").iterdir()) == []
    assert not (tmp_path / "state").exists()


# -- 8: status without a daemon shows how the last run ended ----------------------------


def test_status_shows_the_last_runs_failure_first_until_a_sync_succeeds(
    imap_account: ImapAccount, tmp_path: Path
) -> None:
    client = imap_account.client
    client.create("Work")
    uids = [client.append("Work", make_message(i), ()) for i in range(20)]
    client.append("INBOX", make_message(100), ())
    config = write_config(tmp_path, imap_account)
    assert mirrord("-c", str(config), "run", "--once").status == 0
    client.expunge("Work", uids[:16])
    assert mirrord("-c", str(config), "run", "--once").status == 1  # the removal guard stops Work

    out = mirrord("-c", str(config), "status").stdout
    assert "the last run left 1 failure" in out, out
    table = [line.split() for line in out.splitlines() if line.startswith("  ") and not line.startswith("  mailbox")]
    assert table[0][:2] == ["Work", "20"] and "FAILED:" in table[0], out
    assert table[1][0] == "INBOX" and table[1][-1] == "ok"
    assert "--allow-delete test/Work" in out, "the whole error, with its way out, is shown"

    import json

    doc = json.loads(mirrord("-c", str(config), "status", "--json").stdout)
    work = next(m for m in doc["mailboxes"] if m["mailbox"] == "Work")
    assert "would remove 16 of 20" in work["last_error"]
    assert doc["mailboxes"][0]["mailbox"] == "Work"

    assert mirrord("-c", str(config), "run", "--once", "--allow-delete", "test/Work").status == 0
    out = mirrord("-c", str(config), "status").stdout
    assert "FAILED" not in out and "showing what the last sync left" in out


def test_status_shows_an_account_that_failed_before_any_mailbox(imap_account: ImapAccount, tmp_path: Path) -> None:
    config = write_config(tmp_path, imap_account, password="not-it")
    assert mirrord("-c", str(config), "run", "--once").status == 1
    out = mirrord("-c", str(config), "status").stdout
    assert "the last run left 1 failure" in out, out
    assert "last run FAILED" in out and "refused the login" in out


# -- 9: plurals agree, and one unit of size ---------------------------------------------


def test_one_of_each_is_singular_and_sizes_are_decimal(imap_account: ImapAccount, tmp_path: Path) -> None:
    message = make_message(1, size=2500)
    uid = imap_account.client.append("INBOX", message, ())
    config = write_config(tmp_path, imap_account)
    first = mirrord("-c", str(config), "run", "--once")
    assert first.status == 0
    assert "test: 1 mailbox to mirror" in first.stderr, first.stderr
    fetched = len(message)
    assert f"INBOX: 1 fetched ({fetched / 1000:.1f} kB); 1 message" in first.stderr, first.stderr

    imap_account.client.add_flags("INBOX", uid, ["\\Flagged"])
    second = mirrord("-c", str(config), "run", "--once")
    assert "INBOX: 1 flag change; 1 message" in second.stderr, second.stderr
    assert "1 flag changes" not in second.stderr and "1 messages" not in second.stderr


# -- 10: the hook's output is prefixed with the account ---------------------------------


def test_the_hooks_output_is_logged_with_the_account(imap_account: ImapAccount, tmp_path: Path) -> None:
    script = tmp_path / "hook.sh"
    script.write_text('#!/bin/sh\necho "indexed $MIRRORD_NEW"\necho "a warning" >&2\nprintf "no newline"\n')
    script.chmod(0o755)
    config = write_config(tmp_path, imap_account, extra=f"    on_new_mail: [{script}]\n")
    with DaemonProcess(config) as daemon:
        imap_account.client.append("INBOX", make_message(1), ())
        daemon.wait_for_log("no newline", 30)
        daemon.wait_for_log("a warning", 5)
    ours = [line for line in daemon.lines if "indexed 1" in line or "a warning" in line or "no newline" in line]
    assert len(ours) == 3, daemon.log
    assert all(f"test: on_new_mail {script}: " in line for line in ours), ours
    assert any("WARNING" in line and "a warning" in line for line in ours)


# -- 11: a held lock names its holder ---------------------------------------------------


def test_a_second_mirrord_names_the_pid_that_holds_the_lock(imap_account: ImapAccount, tmp_path: Path) -> None:
    config = write_config(tmp_path, imap_account)
    with DaemonProcess(config) as daemon:
        assert daemon.process is not None
        second = mirrord("-c", str(config), "run", "--once")
        other_daemon = mirrord("-c", str(config), "run", timeout=60)
    for run in (second, other_daemon):
        assert run.status == 1
        assert f"test: another mirrord (PID {daemon.process.pid}) is already mirroring this account" in run.stderr, \
            run.stderr
        assert "stop it first" in run.stderr


# -- 12: the command line explains itself -----------------------------------------------


def _subcommands() -> list[str]:
    import argparse

    from mirrord.cli import build_parser

    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(action.choices)


def test_help_says_what_each_command_does_with_an_example_and_where_the_config_is() -> None:
    top = mirrord("--help")
    assert top.status == 0
    assert "config file (default: ~/.config/mirrord/config.yaml)" in top.stdout
    for name in _subcommands():
        line = next((line for line in top.stdout.splitlines() if line.split()[:1] == [name]), None)
        assert line is not None and len(line.split()) > 3, f"{name}: no line saying what it does\n{top.stdout}"
        own = mirrord(name, "--help")
        assert own.status == 0
        examples = own.stdout.split("examples:\n", 1)[1]
        assert examples.startswith(f"  mirrord {name}") or f"\n  mirrord {name}" in examples, own.stdout
        assert "(default: ~/.config/mirrord/config.yaml)" in own.stdout or name == "demo"


def test_demo_takes_no_config() -> None:
    assert "-c FILE" not in mirrord("demo", "--help").stdout
    for argv in (["-c", "x.yaml", "demo"], ["demo", "-c", "x.yaml"]):
        run = mirrord(*argv)
        assert run.status == 2 and "-c" in run.stderr, run.stderr


# -- 13: sync one mailbox ---------------------------------------------------------------


def test_run_once_syncs_only_the_named_mailboxes(imap_account: ImapAccount, tmp_path: Path) -> None:
    client = imap_account.client
    for folder in ("Work", "Lists/dev", "Lists/ops"):
        client.create(folder)
        client.append(folder, make_message(len(folder)), ())
    client.append("INBOX", make_message(99), ())
    config = write_config(tmp_path, imap_account)
    mail = tmp_path / "Mail"

    run = mirrord("-c", str(config), "run", "--once", "test/Work")
    assert run.status == 0, run.stderr
    assert sorted(p.name for p in mail.iterdir()) == ["Work"], "nothing but Work was touched"

    run = mirrord("-c", str(config), "run", "--once", "test/Lists/*")
    assert run.status == 0, run.stderr
    assert sorted(p.name for p in (mail / "Lists").iterdir()) == ["dev", "ops"]
    assert not (mail / "INBOX").exists()

    run = mirrord("-c", str(config), "run", "--once", "test")
    assert run.status == 0 and (mail / "INBOX").exists()


def test_run_once_with_a_name_that_matches_nothing_says_so(imap_account: ImapAccount, tmp_path: Path) -> None:
    config = write_config(tmp_path, imap_account, extra="    exclude: [Junk]\n")
    imap_account.client.create("Junk")
    nothing = mirrord("-c", str(config), "run", "--once", "test/Nope")
    assert nothing.status == 1
    assert "test/Nope: no such mailbox among those the config mirrors" in nothing.stderr, nothing.stderr
    excluded = mirrord("-c", str(config), "run", "--once", "test/Junk")
    assert excluded.status == 1 and not (tmp_path / "Mail" / "Junk").exists(), "naming it does not override exclude"

    typo = mirrord("-c", str(config), "run", "--once", "tset/INBOX")
    assert typo.status == 2 and "no account 'tset'" in typo.stderr and "did you mean 'test'?" in typo.stderr
    daemon = mirrord("-c", str(config), "run", "test/INBOX")
    assert daemon.status == 2 and "goes with --once" in daemon.stderr


# -- 1 and 2: install-service writes units that systemd accepts as installed ------------


def _user_env(home: Path) -> dict[str, str]:
    """A user's login environment: own HOME, a private XDG_RUNTIME_DIR, no XDG_CONFIG_HOME."""
    runtime = home.parent / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "SYSTEMD_"))}
    env.update(HOME=str(home), XDG_RUNTIME_DIR=str(runtime), SYSTEMD_LOG_LEVEL="info", SYSTEMD_LOG_COLOR="0")
    return env


def _verify(units: list[Path], env: dict[str, str]) -> str:
    import shutil

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        missing("systemd-analyze not found; run `apt-get install systemd`")
    result = subprocess.run([analyze, "--user", "--man=no", "verify", *map(str, units)], capture_output=True,
                            text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and output == "", f"systemd-analyze verify said:\n{output}"
    return output


def test_install_service_writes_units_that_verify_as_installed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = _user_env(home)
    assert mirrord("init", env=env).status == 0
    run = mirrord("install-service", env=env)
    assert run.status == 0, run.stderr
    units = home / ".config" / "systemd" / "user"
    service, template = units / "mirrord.service", units / "mirrord@.service"
    (start,) = [line for line in service.read_text().splitlines() if line.startswith("ExecStart=")]
    argv = start.removeprefix("ExecStart=").split()
    assert Path(argv[0]).is_absolute() and os.access(argv[0], os.X_OK), start
    assert argv[-1] == "run"
    assert "systemctl --user enable --now mirrord" in run.stdout
    assert "does not exist yet" not in run.stdout
    (units / "mirrord@work.service").symlink_to("mirrord@.service")
    _verify([service, template, units / "mirrord@work.service"], env)

    # The command it names runs this mirrord.
    version = subprocess.run([*argv[:-1], "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert version.stdout.startswith("mirrord "), version

    # Again: rewritten; over a unit of the user's own: refused without --force.
    assert mirrord("install-service", env=env).status == 0
    service.write_text("[Service]\nExecStart=/bin/true\n")
    refused = mirrord("install-service", env=env)
    assert refused.status == 1 and "not written by `mirrord install-service`" in refused.stderr
    assert service.read_text() == "[Service]\nExecStart=/bin/true\n"
    assert mirrord("install-service", "--force", env=env).status == 0


def test_install_service_with_c_runs_that_config(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = _user_env(home)
    config = tmp_path / "my mail" / "work%1.yaml"  # a space and a %: both must survive systemd's parsing
    run = mirrord("-c", str(config), "install-service", env=env)
    assert run.status == 0, run.stderr
    assert f"`mirrord -c '{config}' init`" in run.stdout, run.stdout
    service = home / ".config" / "systemd" / "user" / "mirrord.service"
    assert f' -c "{str(config).replace("%", "%%")}" run' in service.read_text()
    _verify([service], env)


# -- the README's install section, line by line -----------------------------------------

REPO = Path(__file__).resolve().parents[2]


def readme_install_lines() -> list[str]:
    """The commands of the README's "Install for everyday use" block, comments dropped."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Install for everyday use", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_the_readme_install_section_is_the_one_this_test_runs() -> None:
    """Kept in the default run: the README cannot drift from what the slow test below runs."""
    assert readme_install_lines() == [
        "pipx install .",
        "pipx ensurepath",
        "mirrord init",
        "mirrord check",
        "mirrord run --once",
        "mirrord install-service",
        "systemctl --user enable --now mirrord",
    ]


def test_the_readme_install_section_works_line_by_line(imap_account: ImapAccount, tmp_path: Path) -> None:
    """On a fresh HOME, as a user types it; about 25 s (pipx builds a virtualenv).

    Each line runs in a login shell (``bash -lc``), so ``mirrord`` is found
    the way the user's next shell finds it, through what ``pipx ensurepath``
    wrote. Two lines need what a test cannot have and are stood in for:
    "edit what it says" after ``init`` writes a config for the private
    Dovecot, and the ``systemctl`` line (no user manager runs here) becomes
    ``systemd-analyze --user verify`` of the unit as installed.
    """
    import shutil

    if shutil.which("pipx") is None:
        missing("pipx is not installed; run `apt-get install pipx`")
    home = tmp_path / "home"
    home.mkdir()
    env = _user_env(home)
    env = {k: v for k, v in env.items() if not k.startswith(("PIPX_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    def sh(line: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["bash", "-lc", line], cwd=REPO, env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)
        assert done.returncode == 0, f"$ {line}\n{done.stdout}{done.stderr}"
        return done

    for line in readme_install_lines():
        if line.startswith("systemctl"):
            _verify([home / ".config" / "systemd" / "user" / "mirrord.service"], env)
            continue
        done = sh(line)
        if line == "mirrord init":
            # The user's edit: this account, on the private Dovecot.
            config = home / ".config" / "mirrord" / "config.yaml"
            written = write_config(tmp_path, imap_account)
            config.write_text(written.read_text())
        if line == "mirrord check":
            assert "INBOX" in done.stdout

    assert sh("command -v mirrord").stdout.strip() == str(home / ".local" / "bin" / "mirrord")
    service = (home / ".config" / "systemd" / "user" / "mirrord.service").read_text()
    assert f"ExecStart={home}/.local/bin/mirrord run" in service
    assert (tmp_path / "Mail" / "INBOX" / "cur").is_dir()
