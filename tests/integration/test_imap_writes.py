"""The client's write commands against the private Dovecot, with and without the extensions they prefer.

Each case runs the client in a child process (one reactor per process) and
checks the result with the other, independent IMAP client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from mirrord.testing import PrivateDovecot

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from twisted.internet import task
    from twisted.internet.endpoints import HostnameEndpoint
    from twisted.internet.protocol import Factory
    from mirrord.protocol.client import MirrordIMAP4Client

    async def main(reactor, port, user, password, body_path):
        client = await HostnameEndpoint(reactor, "127.0.0.1", int(port)).connect(
            Factory.forProtocol(lambda: MirrordIMAP4Client(label="t", clock=reactor)))
        await client.greeting
        await client.login(user, password)
        out = {"caps": sorted(client.capabilities)}
        out["created"] = await client.create(b"Archive")
        out["created_again"] = await client.create(b"Archive")
        status = await client.select(b"INBOX")
        out["append"] = await client.append(b"INBOX", body_path, ["\\\\Flagged", "$Junk"])
        out["append2"] = await client.append(b"INBOX", b"Subject: two\\n\\nbody\\n")
        if "CONDSTORE" in client.capabilities:
            await client.enable("CONDSTORE")
        status = await client.select(b"INBOX")
        out["modseq"] = status.highestmodseq
        out["store"] = sorted(await client.uid_store([1, 2], add=["\\\\Seen"], remove=["\\\\Flagged"],
                                                     unchanged_since=status.highestmodseq))
        out["stale"] = sorted(await client.uid_store([1, 2], add=["\\\\Answered"], unchanged_since=1))
        await client.uid_store([1, 2], remove=["\\\\Answered"])
        copy = await client.uid_copy([2], b"Archive")
        out["copy"] = {str(k): v for k, v in copy.items()} if copy else None
        move = await client.uid_move([1], b"Archive")
        out["move"] = {str(k): v for k, v in move.items()} if move else None
        await client.uid_store([2], add=["\\\\Deleted"])
        try:
            await client.uid_expunge([2])
            out["expunged"] = True
        except Exception as e:
            out["expunged"] = type(e).__name__
        print(json.dumps(out))
        await client.logout()

    task.react(lambda reactor: __import__("twisted").internet.defer.Deferred.fromCoroutine(main(reactor, *sys.argv[1:])))
    """
)

BODY = b"From: a@example.org\nSubject: one\nMessage-ID: <one@example.org>\n\n" + b"line\n" * 50000


@pytest.mark.parametrize(
    "hidden",
    [(), ("UIDPLUS", "MOVE", "CONDSTORE", "QRESYNC", "LITERAL+", "LITERAL-")],
    ids=["all-extensions", "none"],
)
def test_writes_reach_the_server(dovecot_factory: Callable[..., PrivateDovecot], tmp_path: Path, hidden: tuple[str, ...]) -> None:
    server = dovecot_factory(hide_capabilities=hidden) if hidden else dovecot_factory()
    account = server.new_account("writes")
    body = tmp_path / "msg"
    body.write_bytes(BODY)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(account.port), account.user, account.password, str(body)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    full = not hidden
    assert out["created"] is True and out["created_again"] is False
    if full:
        assert out["append"][1] == 1 and out["append2"][1] == 2
        assert out["copy"] == {"2": 1} and out["move"] == {"1": 2}
        assert out["expunged"] is True
        assert account.client.uids("INBOX") == []
        assert out["modseq"]
        assert out["stale"] == [1, 2]  # CONDSTORE: a stale modseq changes nothing
    else:
        # Dovecot still sends APPENDUID/COPYUID with UIDPLUS hidden; they are
        # used when sent. UNCHANGEDSINCE is not sent without CONDSTORE.
        assert out["stale"] == []
        assert out["expunged"] == "MissingCapability"
        # No plain EXPUNGE: both originals stay, marked \\Deleted (1 by the move's fallback).
        flags = account.client.flags("INBOX")
        assert "\\Deleted" in flags[1]
    assert out["store"] == []
    assert not any("\\Answered" in f for f in account.client.flags("Archive").values())
    archive = account.client.messages("Archive")
    bodies = sorted(m[1] for m in archive.values())
    assert BODY.replace(b"\n", b"\r\n") in bodies
    moved = next(f for f, b in archive.values() if b == BODY.replace(b"\n", b"\r\n"))
    assert "\\Seen" in moved and "$Junk" in moved and "\\Flagged" not in moved
