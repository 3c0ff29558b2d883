"""``mirrord run`` survives network and server faults without losing or duplicating a message.

Each test puts a :class:`~mirrord.testing.faultproxy.FaultProxy` between the daemon and
Dovecot's plain port (or, for a server restart, stops and starts a private
Dovecot), breaks the link at an exact point of the IMAP conversation, changes
the mailbox through a client that talks to Dovecot directly, and waits for the
Maildir to converge on the server again: every message there exactly once,
byte for byte, with its flags, and nothing left behind in ``tmp/``.

Every test prints one line of figures (``pytest -s`` shows them): the fault,
how the daemon noticed it, and how long the mirror took to converge, counted
with ``time.monotonic()`` from the fault (or from healing it, where the fault
lasts) until the Maildir equals the server. ``MIRRORD_TEST_TRACE=1`` puts the
protocol trace in the daemon log that a failure shows.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from mirrord.testing.faultproxy import FaultProxy
from mirrord.testing import ImapAccount, PrivateDovecot, make_message
from tests.integration._mirrord import (
    DaemonProcess,
    assert_mirrors,
    difference,
    expected_messages,
    local_messages,
    mirrors,
    wait_until,
    write_config,
)

MAILBOX = "INBOX"

# The most a test waits for the mirror to converge after a fault is healed.
# Recovery is bounded by the reconnect backoff (seconds here), not by
# live.RETRY_DELAY (30 s): a recovery that needed the retry timer is too slow.
CONVERGE_TIMEOUT = 15.0


# -- helpers ------------------------------------------------------------------


def proxied_config(directory: Path, account: ImapAccount, port: int, *, extra: str = "") -> Path:
    """``write_config``'s file, but pointing at ``port`` (a proxy) over plain IMAP."""
    return write_config(directory, account, tls="none", host="127.0.0.1", ca_file=None, port=port, extra=extra)


@pytest.fixture
def proxy(imap_account: ImapAccount) -> Iterator[FaultProxy]:
    """A fault proxy in front of the shared Dovecot's plain port."""
    with FaultProxy(imap_account.host, imap_account.port) as p:
        yield p


def local_count(root: Path, mailbox: str = MAILBOX) -> int:
    try:
        return len(local_messages(root / mailbox))
    except FileNotFoundError:
        return 0


def converge(account: ImapAccount, root: Path, since: float, *, count: int | None = None, mailbox: str = MAILBOX,
             timeout: float = CONVERGE_TIMEOUT) -> float:
    """Wait until the Maildir equals the server; seconds from ``since`` (a monotonic time) to then.

    With ``count``, first wait (cheaply, without asking the server) for that
    many local files, then for the exact mirror.
    """
    deadline = since + timeout

    def explain() -> str:
        local = sorted((m.sha256, m.flags) for m in local_messages(root / mailbox))
        return f"{len(local)} local; {difference(local, expected_messages(account, mailbox))}"

    if count is not None:
        wait_until(lambda: local_count(root, mailbox) == count, max(0.1, deadline - time.monotonic()),
                   f"{count} messages in {mailbox}", explain)
    wait_until(lambda: mirrors(account, root, mailbox), max(0.1, deadline - time.monotonic()),
               f"{mailbox} to mirror the server", explain)
    return time.monotonic() - since


def check_exact(account: ImapAccount, root: Path, mailbox: str = MAILBOX) -> tuple[int, int]:
    """Assert an exact mirror, nothing missing, nothing twice, tmp/ clean; return (lost, duplicated)."""
    local = local_messages(root / mailbox)
    server = expected_messages(account, mailbox)
    local_sha = Counter(m.sha256 for m in local)
    server_sha = Counter(sha for sha, _ in server)
    lost = sum((server_sha - local_sha).values())
    duplicated = sum((local_sha - server_sha).values())
    assert (lost, duplicated) == (0, 0), f"{lost} messages lost, {duplicated} extra or duplicated"
    assert len(local) == len(server)
    assert len({m.sha256 for m in local}) == len(local), "a message is there twice"
    assert_mirrors(account, root, mailbox)
    stray = sorted(p.name for p in (root / mailbox / "tmp").iterdir())
    assert stray == [], f"files left in tmp/: {stray}"
    return lost, duplicated


def assert_recovered_quietly(daemon: DaemonProcess, *needles: str) -> list[str]:
    """The fault shows in the log as a WARNING naming it, with no traceback and no ERROR."""
    log = daemon.log
    assert "Traceback" not in log, log
    assert "Unhandled" not in log, log
    warnings = [line for line in daemon.lines if " WARNING " in line and any(n in line for n in needles)]
    assert warnings, f"no WARNING mentioning any of {needles}:\n{log}"
    errors = [line for line in daemon.lines if " ERROR " in line or " CRITICAL " in line]
    assert errors == [], "a transient fault logged as an error:\n" + "\n".join(errors)
    return [line for line in daemon.lines if " WARNING " in line]


def report(fault: str, detected: str, recover: float, lost: int, duplicated: int, *, log: Sequence[str] = (),
           **extra: float) -> None:
    """One line of figures for ``pytest -s``, then the daemon's warnings about the fault."""
    more = "".join(f" | {k} {v:.2f} s" for k, v in extra.items())
    print(f"\nFAULT | {fault} | detected: {detected} | recovered in {recover:.2f} s{more}"
          f" | lost {lost} | duplicated {duplicated}")
    for line in log:
        print(f"    {line}")


def wait_for_line(daemon: DaemonProcess, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
    """Poll the daemon's log for a line; return it."""
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        lines = daemon.lines[seen:]
        for line in lines:
            if predicate(line):
                return line
        seen += len(lines)
        assert daemon.process is not None
        if daemon.process.poll() is not None:
            raise AssertionError(f"mirrord exited with {daemon.process.returncode}:\n{daemon.log}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not logged within {timeout} s:\n{daemon.log}")
        time.sleep(0.01)


# -- resets at exact points of the conversation --------------------------------------


def test_reset_during_login(imap_account: ImapAccount, proxy: FaultProxy, tmp_path: Path) -> None:
    """Logins cut right after AUTHENTICATE, at start (a worker's) and on a watcher's reconnect."""
    client = imap_account.client
    root = tmp_path / "Mail"
    client.append(MAILBOX, make_message(0), ())
    # The first two logins die: the daemon's first worker connection and its retry.
    proxy.cut_when(b"AUTHENTICATE", direction="client", times=2)
    started = time.monotonic()
    with DaemonProcess(proxied_config(tmp_path, imap_account, proxy.port)) as daemon:
        startup = time.monotonic() - started
        client.append(MAILBOX, make_message(1), ())
        converge(imap_account, root, started, count=2)
        assert proxy.connections >= 3

        # Now a watcher's login: everything is reset, and the next login is cut too.
        idling = proxy.watch(b"+ idling")
        proxy.cut_when(b"AUTHENTICATE", direction="client", times=1)
        fault = time.monotonic()
        proxy.reset_all()
        client.append(MAILBOX, make_message(2), ())  # while the daemon is reconnecting
        assert idling.wait(20), f"the watcher did not get back to IDLE:\n{daemon.log}"
        client.append(MAILBOX, make_message(3), ())
        recover = converge(imap_account, root, fault, count=4)
        lost, duplicated = check_exact(imap_account, root)
        warned = assert_recovered_quietly(daemon, "reconnecting", "retrying on a new connection")
    report("reset right after AUTHENTICATE (start-up, then a watcher reconnect)", "connection lost during setup",
           recover, lost, duplicated, startup_with_2_cut_logins=startup, log=warned)


def test_reset_mid_literal_of_a_large_message(imap_account: ImapAccount, proxy: FaultProxy, tmp_path: Path) -> None:
    """A 5 MB message's FETCH is cut 300 KB into its literal, twice; it lands once, whole."""
    client = imap_account.client
    root = tmp_path / "Mail"
    client.append(MAILBOX, make_message(10), ())
    with DaemonProcess(proxied_config(tmp_path, imap_account, proxy.port)) as daemon:
        big = make_message(11, attachment_bytes=3_750_000)
        assert len(big) > 5_000_000
        literal = proxy.watch(b"BODY[] {")
        proxy.cut_when(b"BODY[] {", after_bytes=300_000, times=2)
        fault = time.monotonic()
        client.append(MAILBOX, big, ())
        assert literal.wait(10), f"no BODY[] literal went through the proxy:\n{daemon.log}"
        # No partial file may become visible while the fetch is retried.
        deadline = time.monotonic() + CONVERGE_TIMEOUT
        while local_count(root) < 2 and time.monotonic() < deadline:
            for message in local_messages(root / MAILBOX):
                assert message.path.stat().st_size in (len(make_message(10).replace(b"\r\n", b"\n")),
                                                       len(big.replace(b"\r\n", b"\n"))), "a partial message is visible"
            time.sleep(0.01)
        client.append(MAILBOX, make_message(12), ())
        recover = converge(imap_account, root, fault, count=3)
        lost, duplicated = check_exact(imap_account, root)
        warned = assert_recovered_quietly(daemon, "retrying on a new connection", "reconnecting")
        retried = [line for line in warned if "fetching new mail" in line and "interrupted" in line]
        assert len(retried) == 2, "both cuts should have hit the FETCH of the big message"
    report("reset 300 KB into a 5 MB literal (x2)", "connection lost under the FETCH", recover, lost, duplicated,
           log=warned)


def test_reset_during_idle(imap_account: ImapAccount, proxy: FaultProxy, tmp_path: Path) -> None:
    """Every connection reset while the watcher idles; mail sent during the gap still lands."""
    client = imap_account.client
    root = tmp_path / "Mail"
    uids = [client.append(MAILBOX, make_message(i), ()) for i in range(20, 25)]
    idling = proxy.watch(b"+ idling")
    with DaemonProcess(proxied_config(tmp_path, imap_account, proxy.port)) as daemon:
        assert idling.wait(10)
        back = proxy.watch(b"+ idling")
        fault = time.monotonic()
        proxy.reset_all()
        # Changes while the watcher is away: a new message, an expunge, a flag.
        client.append(MAILBOX, make_message(25), ())
        client.expunge(MAILBOX, uids[0])
        client.add_flags(MAILBOX, uids[1], ["\\Seen", "\\Flagged"])
        assert back.wait(20), f"the watcher did not get back to IDLE:\n{daemon.log}"
        reidle = time.monotonic() - fault
        client.append(MAILBOX, make_message(26), ())
        recover = converge(imap_account, root, fault, count=6)
        lost, duplicated = check_exact(imap_account, root)
        warned = assert_recovered_quietly(daemon, "reconnecting")
    report("reset of every connection during IDLE", "connection lost (RST)", recover, lost, duplicated,
           back_in_idle=reidle, log=warned)


def test_reset_between_done_and_its_ok(imap_account: ImapAccount, proxy: FaultProxy, tmp_path: Path) -> None:
    """The watcher's DONE reaches the server, the tagged OK never comes back."""
    client = imap_account.client
    root = tmp_path / "Mail"
    client.append(MAILBOX, make_message(30), ())
    idling = proxy.watch(b"+ idling")
    with DaemonProcess(proxied_config(tmp_path, imap_account, proxy.port)) as daemon:
        assert idling.wait(10)
        done = proxy.watch(b"DONE", direction="client")
        proxy.cut_when(b"DONE", direction="client", times=1)
        fault = time.monotonic()
        # New mail makes the watcher leave IDLE (to learn the UID): DONE, cut.
        client.append(MAILBOX, make_message(31), ())
        assert done.wait(10), f"the watcher never sent DONE:\n{daemon.log}"
        client.append(MAILBOX, make_message(32), ())  # while it reconnects
        recover = converge(imap_account, root, fault, count=3)
        client.append(MAILBOX, make_message(33), ())
        converge(imap_account, root, time.monotonic(), count=4)
        lost, duplicated = check_exact(imap_account, root)
        warned = assert_recovered_quietly(daemon, "reconnecting")
    report("reset between DONE and its tagged OK", "connection lost (RST)", recover, lost, duplicated, log=warned)


# -- a link that goes silent -----------------------------------------------------


@pytest.mark.slow
def test_silent_dead_connection_is_noticed(imap_account: ImapAccount, proxy: FaultProxy, tmp_path: Path) -> None:
    """A black-holed link is found by the IDLE renewal's DONE deadline, then mail flows again.

    Keepalive cannot see this fault (the proxy's kernel answers the probes),
    so detection is bounded by idle_renew (10 s) + the 30 s DONE deadline.
    Mail that arrives during the stall is announced into the black hole and
    must come with the catch-up after the reconnect.
    """
    client = imap_account.client
    root = tmp_path / "Mail"
    client.append(MAILBOX, make_message(40), ())
    idling = proxy.watch(b"+ idling")
    config = proxied_config(tmp_path, imap_account, proxy.port, extra="    idle_renew: 10s\n")
    with DaemonProcess(config) as daemon:
        assert idling.wait(10)
        proxy.stall()
        fault = time.monotonic()
        client.append(MAILBOX, make_message(41), ())  # its EXISTS goes into the black hole
        line = wait_for_line(daemon, lambda s: "watcher disconnected" in s, 60, "the watcher's disconnect")
        detected = time.monotonic() - fault
        print(f"\nstall noticed after {detected:.2f} s: {line}")
        proxy.resume()
        healed = time.monotonic()
        client.append(MAILBOX, make_message(42), ())
        recover = converge(imap_account, root, healed, count=3)
        lost, duplicated = check_exact(imap_account, root)
        warned = assert_recovered_quietly(daemon, "no response from the server")
        assert detected < 10 + 30 + 5, line
    report("stall (black hole) while idling, idle_renew 10s", "DONE deadline (no response for 30 s)", recover,
           lost, duplicated, detection=detected, fault_to_converged=detected + recover, log=warned)


# -- the server goes away ------------------------------------------------------------


def _session_pids(server: PrivateDovecot) -> list[int]:
    """The pids of the server's logged-in IMAP sessions: ``imap`` children of its master."""
    master = server.pid
    assert master is not None
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().rstrip(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == master and command.endswith(b"/imap"):
            pids.append(int(entry.name))
    return pids


def _restart(server: PrivateDovecot) -> None:
    """Stop the server and every session it serves, then start it again on the same ports.

    ``PrivateDovecot.stop()`` alone stops the master but leaves logged-in
    ``imap`` processes running (measured with Dovecot 2.3.19, despite
    ``shutdown_clients = yes``): their clients would never notice. A real
    restart ends the sessions too, so their processes (children of the master
    this test started, found by pid) get the SIGTERM the master would send.
    """
    sessions = _session_pids(server)
    assert sessions, "no IMAP session to end: is the daemon connected?"
    server.stop()
    for pid in sessions:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in sessions):
        assert time.monotonic() < deadline, "IMAP sessions survived SIGTERM"
        time.sleep(0.02)
    server.start()


def test_server_restart_while_idling(dovecot_factory: Callable[..., PrivateDovecot], tmp_path: Path) -> None:
    """Dovecot goes down with every session and comes back; changes made right after land."""
    server = dovecot_factory()
    account = server.new_account("restart")
    root = tmp_path / "Mail"
    try:
        client = account.client
        uids = [client.append(MAILBOX, make_message(i), ()) for i in range(50, 53)]
        client.close()  # only the daemon's sessions are on the server when it goes down
        config = write_config(tmp_path, account, tls="none", host="127.0.0.1", ca_file=None)
        with DaemonProcess(config) as daemon:
            wait_until(lambda: len(_session_pids(server)) >= 2, 10, "the watcher and a worker logged in")
            time.sleep(0.3)  # the watcher's "+ idling" is on its way
            fault = time.monotonic()
            _restart(server)
            up = time.monotonic()
            client.append(MAILBOX, make_message(53), ())  # right after the start
            client.expunge(MAILBOX, uids[0])
            client.add_flags(MAILBOX, uids[1], ["\\Answered"])
            recover = converge(account, root, up, count=3)
            client.append(MAILBOX, make_message(54), ())
            converge(account, root, time.monotonic(), count=4)
            lost, duplicated = check_exact(account, root)
            warned = assert_recovered_quietly(daemon, "reconnecting")
    finally:
        account.close()
    report("Dovecot restarted (master and sessions) while idling", "connection closed by the server", recover,
           lost, duplicated, down_for=up - fault, fault_to_converged=up - fault + recover, log=warned)


def test_refused_connections_for_a_while(imap_account: ImapAccount, proxy: FaultProxy, tmp_path: Path) -> None:
    """Every connection reset and new ones refused for 5 s; mail sent meanwhile lands after."""
    client = imap_account.client
    root = tmp_path / "Mail"
    client.append(MAILBOX, make_message(60), ())
    idling = proxy.watch(b"+ idling")
    with DaemonProcess(proxied_config(tmp_path, imap_account, proxy.port)) as daemon:
        assert idling.wait(10)
        proxy.refuse(True)
        proxy.reset_all()
        refused_from = proxy.connections
        client.append(MAILBOX, make_message(61), ())
        time.sleep(5)
        attempts = proxy.connections - refused_from
        proxy.refuse(False)
        healed = time.monotonic()
        client.append(MAILBOX, make_message(62), ())
        recover = converge(imap_account, root, healed, count=3)
        lost, duplicated = check_exact(imap_account, root)
        warned = assert_recovered_quietly(daemon, "reconnecting")
        assert attempts >= 2, f"only {attempts} connection attempts in 5 s of refusal"
    report(f"connections refused for 5 s ({attempts} attempts refused)", "connect reset / lost during setup",
           recover, lost, duplicated, log=warned)
