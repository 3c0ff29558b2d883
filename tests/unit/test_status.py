"""The published daemon status and ``render_status``, on real files in tmp_path.

The runtime dir is pointed at tmp_path through XDG_RUNTIME_DIR, so nothing
here reads or writes the real one of whoever runs the tests.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import platformdirs
import pytest

from mirrord import status as status_mod
from mirrord.config import Config, load_config
from mirrord.status import (
    AccountStatus,
    DaemonStatus,
    MailboxStatus,
    StatusFile,
    find_status,
    format_duration,
    render_status,
    status_path,
)
from mirrord.store.state import MessageRecord, StateDB

NOW = 1_700_000_000.0


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    run.chmod(0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    return run


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def make_config(tmp_path: Path, name: str = "config", accounts: tuple[str, ...] = ("personal", "work")) -> Config:
    lines = [f"state_dir: {tmp_path / 'state'}", "accounts:"]
    for account in accounts:
        lines += [
            f"  {account}:",
            "    host: 127.0.0.1",
            "    tls: none",
            "    username: me",
            "    password: secret",
            f"    maildir: {tmp_path / 'mail' / account}",
        ]
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return load_config(path)


def snapshot(pid: int | None = None, **kw: object) -> DaemonStatus:
    status = DaemonStatus(
        pid=os.getpid() if pid is None else pid,
        started=NOW - (3 * 3600 + 12 * 60),
        updated=NOW - 1,
        config="/abs/config.yaml",
        accounts=[
            AccountStatus(
                "personal",
                "running",
                None,
                [
                    MailboxStatus("INBOX", "idling", NOW - 600, NOW - 120, None),
                    MailboxStatus("Lists/dev", "reconnecting", NOW - 300, None, "connection lost\nreset by peer"),
                    MailboxStatus("New", "syncing", NOW - 5, None, None),
                ],
            ),
            AccountStatus("work", "error", "LOGIN refused: [AUTHENTICATIONFAILED] bad password", []),
        ],
    )
    for key, value in kw.items():
        setattr(status, key, value)
    return status


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def fill_state(config: Config) -> None:
    with StateDB(config.state_dir / "state.sqlite3") as db:
        db.set_mailbox("personal", "INBOX", 7, last_sync=NOW - 3600)
        db.add_messages("personal", "INBOX", [MessageRecord(u, f"k{u}", frozenset(), 10) for u in (1, 2, 3)])
        db.set_mailbox("personal", "Archive", 9, last_sync=NOW - 2 * 86400)
        db.add_messages("personal", "Archive", [MessageRecord(5, "k5", frozenset({"\\Seen"}), 10)])
        db.set_mailbox("personal", "Lists/dev", 3, last_sync=None)


# -- the snapshot -------------------------------------------------------------------


def test_round_trip_through_json() -> None:
    original = snapshot(process="boot/123")
    text = json.dumps(original.to_json())
    assert DaemonStatus.from_json(json.loads(text)) == original
    data = json.loads(text)
    assert data["version"] == 1
    assert set(data["accounts"][0]["mailboxes"][0]) == {"name", "state", "since", "last_change", "last_error",
                                                                   "watched_by"}


def test_from_json_tolerates_other_versions() -> None:
    data = {
        "version": 7,
        "pid": 42,
        "future": {"x": 1},
        "accounts": [
            {"name": "a", "mailboxes": [{"name": "INBOX", "state": "teleporting", "since": "soon", "extra": 1}]},
            {"name": "b", "mailboxes": "not a list"},
        ],
    }
    status = DaemonStatus.from_json(data)
    assert status.pid == 42 and status.version == 7 and status.started == 0.0 and status.process is None
    box = status.accounts[0].mailboxes[0]
    assert box == MailboxStatus("INBOX", "teleporting", None, None, None)
    assert status.accounts[0].state == "starting" and status.accounts[1].mailboxes == []


@pytest.mark.parametrize("pid", [None, 0, -1, True, "12", 1.5])
def test_from_json_needs_a_pid(pid: object) -> None:
    with pytest.raises(ValueError):
        DaemonStatus.from_json({"pid": pid})


def test_for_this_process() -> None:
    status = DaemonStatus.for_this_process(Path("rel/config.yaml"), started=5.0)
    assert status.pid == os.getpid() and status.started == 5.0
    assert Path(status.config).is_absolute()


# -- the file -----------------------------------------------------------------------


def test_write_is_atomic_and_private(tmp_path: Path, umask0: None) -> None:
    path = tmp_path / "run" / "mirrord" / "status-x.json"
    f = StatusFile(path)
    for i in range(3):
        assert f.write(snapshot(updated=NOW + i))
    assert os.listdir(path.parent) == [path.name]  # no temp file left over
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700 and mode(path.parent.parent) == 0o700
    read = StatusFile.read(path)
    assert read is not None and read.updated == NOW + 2


def test_write_recreates_a_removed_dir(tmp_path: Path) -> None:
    path = tmp_path / "run" / "status.json"
    f = StatusFile(path)
    assert f.write(snapshot())
    path.unlink()
    path.parent.rmdir()  # as systemd does with the runtime dir at logout
    assert f.write(snapshot())
    assert StatusFile.read(path) is not None


def test_write_failure_is_reported_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert StatusFile(blocker / "status.json").write(snapshot()) is False


def test_remove(tmp_path: Path) -> None:
    f = StatusFile(tmp_path / "status.json")
    f.write(snapshot())
    f.remove()
    assert not f.path.exists()
    f.remove()  # twice is fine
    assert StatusFile.read(f.path) is None


def test_own_pid_reads_as_running(tmp_path: Path) -> None:
    f = StatusFile(tmp_path / "status.json")
    f.write(DaemonStatus.for_this_process(tmp_path / "c.yaml"))
    assert StatusFile.read(f.path) is not None
    f.write(snapshot())  # no process identity: the pid alone decides
    assert StatusFile.read(f.path) is not None


def test_stale_pid_reads_as_not_running(tmp_path: Path) -> None:
    f = StatusFile(tmp_path / "status.json")
    f.write(snapshot(pid=dead_pid()))
    assert StatusFile.read(f.path) is None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_reused_pid_reads_as_not_running(tmp_path: Path) -> None:
    """A live pid with another process identity: the daemon died, the pid was reused."""
    f = StatusFile(tmp_path / "status.json")
    f.write(snapshot(process="another-boot/1"))
    assert StatusFile.read(f.path) is None


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"pid": "x"}', b"\xff\xfe", b"null"])
def test_unparsable_reads_as_not_running(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "status.json"
    path.write_bytes(content)
    assert StatusFile.read(path) is None
    assert StatusFile.read(tmp_path / "missing.json") is None


# -- where it lives -----------------------------------------------------------------


def test_status_path_in_runtime_dir(tmp_path: Path, runtime: Path) -> None:
    a = tmp_path / "config.yaml"
    b = tmp_path / "other" / "config.yaml"
    pa, pb = status_path(a), status_path(b)
    assert pa != pb
    assert pa.parent == pb.parent == runtime / "mirrord"
    assert pa.name.startswith("status-config-") and pa.suffix == ".json"
    assert status_path(tmp_path / "work.yaml").name.startswith("status-work-")
    assert not (runtime / "mirrord").exists()  # computing the path creates nothing


def test_status_path_is_stable_across_spellings(
    tmp_path: Path, runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("")
    link = tmp_path / "link.yaml"
    link.symlink_to(config)
    monkeypatch.chdir(tmp_path)
    assert status_path(config) == status_path(config) == status_path(Path("config.yaml")) == status_path(link)


def test_status_path_falls_back_to_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    config = tmp_path / "config.yaml"

    def missing(*a: object, **k: object) -> str:
        return str(tmp_path / "no-such-runtime" / "mirrord")

    def unsafe(*a: object, **k: object) -> str:
        raise PermissionError("runtime directory owned by someone else")

    def temp(*a: object, **k: object) -> str:
        return str(Path(tempfile.gettempdir()) / f"runtime-{os.geteuid()}" / "mirrord")

    for fake in (missing, unsafe, temp):
        monkeypatch.setattr(platformdirs, "user_runtime_dir", fake)
        assert status_path(config, state) == state / status_mod.status_file_name(config)


def test_group_writable_runtime_dir_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setattr(platformdirs, "user_runtime_dir", lambda *a, **k: str(shared / "mirrord"))
    assert status_path(tmp_path / "c.yaml", tmp_path / "state").parent == tmp_path / "state"


def test_reader_finds_a_daemon_that_used_the_state_dir(tmp_path: Path, runtime: Path) -> None:
    """The daemon had no runtime dir, the shell has one: the reader still finds it."""
    config = tmp_path / "c.yaml"
    state = tmp_path / "state"
    StatusFile(state / status_mod.status_file_name(config)).write(snapshot())
    found = find_status(config, state)
    assert found is not None and found.pid == os.getpid()


# -- render_status ------------------------------------------------------------------


def render(config: Config, *, as_json: bool = False) -> tuple[int, str]:
    out = io.StringIO()
    code = render_status(config, as_json=as_json, out=out, now=NOW)
    return code, out.getvalue()


def test_nothing_mirrored_creates_nothing(tmp_path: Path, runtime: Path) -> None:
    config = make_config(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, text = render(config)
    assert code == 0
    assert "not running" in text and "nothing mirrored yet: run `mirrord run --once`" in text
    code, text = render(config, as_json=True)
    assert code == 0 and json.loads(text) == {"daemon": None, "mailboxes": []}
    assert not config.state_dir.exists()
    assert not (runtime / "mirrord").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_render_without_daemon(tmp_path: Path, runtime: Path) -> None:
    config = make_config(tmp_path)
    fill_state(config)
    files = sorted(os.listdir(config.state_dir))
    code, text = render(config)
    assert code == 0
    lines = text.splitlines()
    assert lines[0] == "mirrord is not running; showing what the last sync left"
    assert "personal" in lines and "work" in lines
    inbox = next(line for line in lines if line.split()[:1] == ["INBOX"])
    assert inbox.split() == ["INBOX", "3", "1h", "ago"]
    archive = next(line for line in lines if line.split()[:1] == ["Archive"])
    assert archive.split() == ["Archive", "1", "2d", "ago"]
    lists = next(line for line in lines if line.split()[:1] == ["Lists/dev"])
    assert lists.split() == ["Lists/dev", "0", "never"]
    # INBOX first, then by name.
    assert lines.index(inbox) < lines.index(archive) < lines.index(lists)
    assert "nothing mirrored yet" in text.split("\nwork\n")[1]
    # Read-only: no -wal or -shm appears beside the DB.
    assert sorted(os.listdir(config.state_dir)) == files


def test_render_with_daemon(tmp_path: Path, runtime: Path) -> None:
    config = make_config(tmp_path)
    fill_state(config)
    assert StatusFile.for_config(config).write(snapshot())
    code, text = render(config)
    assert code == 0
    lines = text.splitlines()
    assert lines[0] == f"mirrord is running (pid {os.getpid()}, up 3h 12m)"
    header = next(line for line in lines if "last change" in line)
    assert header.split() == ["mailbox", "messages", "last", "change", "state", "last", "error"]
    row = {line.split()[0]: line for line in lines if line.startswith("  ") and line.split()}
    assert row["INBOX"].split() == ["INBOX", "3", "2m", "ago", "idling"]
    assert row["Archive"].split() == ["Archive", "1", "2d", "ago", "-"]  # in the DB, not watched now
    since = time.strftime("%H:%M", time.localtime(NOW - 300))
    assert f"reconnecting since {since}" in row["Lists/dev"]
    assert "connection lost reset by peer" in row["Lists/dev"]  # one line
    assert row["New"].split()[:4] == ["New", "0", "never", "syncing"]
    assert "work (error: LOGIN refused: [AUTHENTICATIONFAILED] bad password)" in lines


def test_long_error_is_truncated_in_table_not_in_json(tmp_path: Path, runtime: Path) -> None:
    config = make_config(tmp_path)
    long = "server said: " + "x" * 300
    status = snapshot()
    status.accounts[0].mailboxes[0].last_error = long
    StatusFile.for_config(config).write(status)
    _, text = render(config)
    assert long not in text and "server said: xxx" in text and "…" in text
    _, text = render(config, as_json=True)
    rows = json.loads(text)["mailboxes"]
    assert next(r for r in rows if r["mailbox"] == "INBOX")["last_error"] == long


def test_render_json(tmp_path: Path, runtime: Path) -> None:
    config = make_config(tmp_path)
    fill_state(config)
    StatusFile.for_config(config).write(snapshot())
    code, text = render(config, as_json=True)
    assert code == 0
    doc = json.loads(text)
    assert doc["daemon"]["pid"] == os.getpid() and doc["daemon"]["accounts"][1]["state"] == "error"
    fields = {"account", "mailbox", "messages", "last_sync", "last_change", "state", "since", "last_error",
              "watched_by"}
    assert all(set(r) == fields for r in doc["mailboxes"])
    by_name = {(r["account"], r["mailbox"]): r for r in doc["mailboxes"]}
    assert by_name[("personal", "INBOX")] == {
        "account": "personal",
        "mailbox": "INBOX",
        "messages": 3,
        "last_sync": NOW - 3600,
        "last_change": NOW - 120,
        "state": "idling",
        "since": NOW - 600,
        "last_error": None,
        "watched_by": None,
    }
    assert by_name[("personal", "Archive")]["state"] is None
    assert by_name[("personal", "Lists/dev")]["last_error"] == "connection lost\nreset by peer"


def test_stale_status_file_renders_as_not_running(tmp_path: Path, runtime: Path) -> None:
    config = make_config(tmp_path)
    fill_state(config)
    StatusFile.for_config(config).write(snapshot(pid=dead_pid()))
    _, text = render(config)
    assert text.startswith("mirrord is not running")
    _, text = render(config, as_json=True)
    assert json.loads(text)["daemon"] is None


def test_render_while_a_writer_has_the_db_open(tmp_path: Path, runtime: Path) -> None:
    config = make_config(tmp_path)
    fill_state(config)
    with StateDB(config.state_dir / "state.sqlite3") as db:
        db.add_messages("personal", "INBOX", [MessageRecord(9, "k9", frozenset(), 1)])
        _, text = render(config, as_json=True)
    rows = json.loads(text)["mailboxes"]
    assert next(r for r in rows if r["mailbox"] == "INBOX")["messages"] == 4


def test_unreadable_state_db_is_reported(tmp_path: Path, runtime: Path) -> None:
    config = make_config(tmp_path)
    config.state_dir.mkdir()
    (config.state_dir / "state.sqlite3").write_bytes(b"not a database" * 100)
    code, text = render(config)
    assert code == 1 and "cannot read the state database" in text
    code, text = render(config, as_json=True)
    assert code == 1 and "error" in json.loads(text)


def test_daemon_starting_with_no_mailboxes_yet(tmp_path: Path, runtime: Path) -> None:
    config = make_config(tmp_path, accounts=("personal",))
    status = snapshot(accounts=[AccountStatus("personal", "starting")])
    StatusFile.for_config(config).write(status)
    _, text = render(config)
    assert text.splitlines()[0].startswith("mirrord is running")
    assert "personal (starting)" in text and "nothing mirrored yet" in text


def test_two_configs_do_not_see_each_other(tmp_path: Path, runtime: Path) -> None:
    one = make_config(tmp_path, "one", ("personal",))
    two = make_config(tmp_path, "two", ("work",))
    StatusFile.for_config(one).write(snapshot())
    assert find_status(one.path, one.state_dir) is not None
    assert find_status(two.path, two.state_dir) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h"), (11520, "3h 12m"), (86400, "1d"),
     (90000, "1d 1h")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# -- publishing on change ---------------------------------------------------------

from twisted.internet import task  # noqa: E402

from mirrord.status import ChangePublisher  # noqa: E402


def test_nothing_changed_means_no_timer_and_no_write() -> None:
    clock = task.Clock()
    published: list[float] = []
    ChangePublisher(clock, lambda: published.append(clock.seconds()), min_gap=1.0)
    clock.advance(3600)
    assert published == [] and clock.getDelayedCalls() == []


def test_a_change_is_published_on_the_next_turn_and_a_burst_once_per_gap() -> None:
    clock = task.Clock()
    clock.advance(100)
    published: list[float] = []
    publisher = ChangePublisher(clock, lambda: published.append(clock.seconds()), min_gap=1.0)
    publisher.changed()
    clock.advance(0)
    assert published == [100.0], "the first change of a quiet spell: at once, no extra sleep"
    for _ in range(50):  # a burst of 12.5 s: one publication per gap, not fifty
        publisher.changed()
        clock.advance(0.25)
    assert published == [100.0 + i for i in range(13)]
    clock.advance(1)
    assert len(published) == 14, "the burst's last change is published too"
    assert clock.getDelayedCalls() == []
    clock.advance(60)
    publisher.changed()
    clock.advance(0)
    assert published[-1] == 173.5, "after a quiet minute, at once again"
    publisher.changed()
    publisher.stop()
    clock.advance(10)
    assert published[-1] == 173.5 and clock.getDelayedCalls() == []


def test_a_failing_publish_does_not_stop_later_ones(caplog: pytest.LogCaptureFixture) -> None:
    clock = task.Clock()
    calls: list[int] = []

    def publish() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    publisher = ChangePublisher(clock, publish, min_gap=1.0)
    publisher.changed()
    clock.advance(0)
    publisher.changed()
    clock.advance(1)
    assert len(calls) == 2 and "publishing the status failed" in caplog.text


def test_flush_publishes_now_and_drops_the_pending_one() -> None:
    clock = task.Clock()
    published: list[float] = []
    publisher = ChangePublisher(clock, lambda: published.append(clock.seconds()), min_gap=1.0)
    publisher.changed()
    clock.advance(0)
    publisher.changed()  # within the gap: pending for a second later
    clock.advance(0.5)
    publisher.flush()
    assert published == [0.0, 0.5] and clock.getDelayedCalls() == []


def test_a_change_undone_within_the_gap_costs_no_later_wakeup() -> None:
    clock = task.Clock()
    state = ["idling"]
    published: list[str] = []

    def publish() -> None:
        published.append(state[0])

    publisher = ChangePublisher(clock, publish, min_gap=1.0, differs=lambda: published[-1] != state[0])
    publisher.changed()
    clock.advance(0)
    assert published == ["idling"]
    # An IDLE renewal: renewing and back to idling within milliseconds, inside the gap.
    state[0] = "renewing"
    publisher.changed()
    state[0] = "idling"
    clock.advance(0)
    assert clock.getDelayedCalls() == [], "nothing new: no publication scheduled a second later"
    # A real change within the gap is published when the gap is over.
    state[0] = "reconnecting"
    publisher.changed()
    clock.advance(0)
    assert published == ["idling"] and len(clock.getDelayedCalls()) == 1
    clock.advance(1)
    assert published == ["idling", "reconnecting"]


def test_control_characters_in_names_are_shown_escaped(tmp_path: Path, runtime: Path) -> None:
    """A mailbox named with ESC sequences or LF (from an older state DB or a daemon snapshot) cannot rewrite the terminal."""
    config = make_config(tmp_path)
    with StateDB(config.state_dir / "state.sqlite3") as db:
        db.set_mailbox("personal", "evil\x1b[2J\nfake", 1, last_sync=NOW - 60)
    code, text = render(config)
    assert code == 0
    assert "\x1b" not in text
    assert "evil\\x1b[2J\\x0afake" in text


def test_a_polled_mailbox_says_how_it_is_polled(tmp_path: Path, runtime: Path) -> None:
    config = make_config(tmp_path)
    status = snapshot()
    status.accounts[0].mailboxes.append(MailboxStatus("Lists/quiet", "polling", watched_by="LIST-STATUS every 60 s"))
    StatusFile.for_config(config).write(status)
    _, text = render(config)
    row = next(line for line in text.splitlines() if "Lists/quiet" in line)
    assert "polling (LIST-STATUS every 60 s)" in row
