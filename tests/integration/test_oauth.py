"""OAuth2 sign-in against the real thing: Dovecot's oauth2 passdb, asking an introspection endpoint.

The endpoint (mirrord.testing.oauthserver, twisted.web on 127.0.0.1) knows
the tokens this test hands out and calls expired ones inactive, as a
provider's would. The token command is a small script that prints the next
token of a queue the test fills, and records each run.
"""

from __future__ import annotations

import base64
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrord.testing import ImapAccount, PrivateDovecot, make_message
from mirrord.testing.oauthserver import IntrospectionServer
from tests.conftest import _require_dovecot, _Roots
from tests.integration._mirrord import DaemonProcess, assert_mirrors, mirrord

TOKEN_SCRIPT = """\
import sys
from pathlib import Path
queue = Path(sys.argv[1])
with open(queue.with_name("runs"), "a") as runs:
    runs.write("run\\n")
lines = queue.read_text().splitlines()
first = lines[0]
if first.startswith("FAIL "):
    print("the refresh token was revoked", file=sys.stderr)
    sys.exit(int(first.split()[1]))
queue.write_text("\\n".join(lines[1:] or lines) + "\\n")
print(first)
"""


@pytest.fixture(scope="module")
def oauth_server(dovecot_roots: _Roots) -> Iterator[tuple[PrivateDovecot, IntrospectionServer]]:
    _require_dovecot()
    root = dovecot_roots.new("oauth")
    with IntrospectionServer(root / "idp") as idp:
        server = PrivateDovecot(root / "dovecot", oauth2_introspection_url=idp.url, auth_delay=False)
        server.start()
        try:
            yield server, idp
        finally:
            server.stop()


class Setup:
    def __init__(self, tmp_path: Path, server: PrivateDovecot, idp: IntrospectionServer, name: str) -> None:
        self.dir = tmp_path
        self.server = server
        self.idp = idp
        self.account: ImapAccount = server.new_account(name)
        self.queue = tmp_path / "queue"
        script = tmp_path / "token.py"
        script.write_text(TOKEN_SCRIPT)
        self.command = [sys.executable, str(script), str(self.queue)]
        self.granted: set[str] = set()

    def tokens(self, *lines: str) -> None:
        self.queue.write_text("\n".join(lines) + "\n")

    def grant(self, token: str) -> str:
        self.granted.add(token)
        return self.idp.grant(token, self.account.user)

    def asked(self) -> list[str]:
        """The tokens Dovecot asked the endpoint about, of this test's (the endpoint is shared)."""
        return [t for t in self.idp.asked() if t in self.granted or t.startswith("FAIL")]

    def runs(self) -> int:
        path = self.queue.with_name("runs")
        return len(path.read_text().splitlines()) if path.exists() else 0

    def config(self, auth: str = "oauth2") -> Path:
        path = self.dir / "config.yaml"
        path.write_text(
            f"state_dir: {self.dir / 'state'}\n"
            "accounts:\n"
            "  test:\n"
            f"    host: localhost\n"
            f"    port: {self.server.imaps_port}\n"
            f"    ca_file: {self.server.ca_file}\n"
            f"    username: {self.account.user}\n"
            f"    auth: {auth}\n"
            f"    token_command: [{', '.join(repr(a) for a in self.command)}]\n"
            f"    maildir: {self.dir / 'Mail'}\n"
            "    workers: 2\n"
        )
        os.chmod(path, 0o600)
        return path


@pytest.fixture
def setup(
    oauth_server: tuple[PrivateDovecot, IntrospectionServer], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Setup]:
    server, idp = oauth_server
    s = Setup(tmp_path, server, idp, request.node.name)
    try:
        yield s
    finally:
        s.account.close()


def secrets_of(token: str, user: str) -> list[str]:
    """The token, and every base64 form of it a careless trace could show."""
    forms = [token, base64.b64encode(token.encode()).decode()]
    for initial in (
        f"user={user}\x01auth=Bearer {token}\x01\x01",
        f"n,a={user},\x01host=localhost\x01port=",
    ):
        forms.append(base64.b64encode(initial.encode()).decode()[:24])
    return forms


@pytest.mark.parametrize(("auth", "mechanism"), [("oauth2", "OAUTHBEARER"), ("xoauth2", "XOAUTH2")])
def test_a_good_token_logs_in_and_check_names_the_mechanism(setup: Setup, auth: str, mechanism: str) -> None:
    setup.tokens(setup.grant(f"good-{auth}-7f3a"))
    run = mirrord("-c", str(setup.config(auth)), "check")
    assert run.status == 0, run.stdout + run.stderr
    assert f"logged in with {mechanism}" in run.stdout
    assert setup.asked()[-1:] == [f"good-{auth}-7f3a"]


def test_a_good_token_mirrors_and_each_connection_runs_the_command(setup: Setup) -> None:
    setup.account.client.append("INBOX", make_message(1), ())
    setup.account.client.create("Archive")
    setup.account.client.append("Archive", make_message(2), ())
    setup.tokens(setup.grant("good-sync-91c2"))
    run = mirrord("-c", str(setup.config()), "run", "--once")
    assert run.status == 0, run.stderr
    assert_mirrors(setup.account, setup.dir / "Mail", "INBOX")
    assert_mirrors(setup.account, setup.dir / "Mail", "Archive")
    # One run per login, none cached: every connection ran the command.
    logins = setup.server.log_path.read_text().count(f"Login: user=<{setup.account.user}>, method=OAUTHBEARER")
    assert logins >= 1 and setup.runs() == logins == setup.asked().count("good-sync-91c2")


def test_an_expired_token_is_replaced_on_the_retry_and_never_traced(setup: Setup) -> None:
    expired, good = setup.grant("expired-4b1e-token"), setup.grant("fresh-8d2c-token")
    setup.idp.expire(expired)
    setup.tokens(expired, good)
    setup.account.client.append("INBOX", make_message(1), ())
    run = mirrord("-c", str(setup.config()), "run", "--once", "-v")
    assert run.status == 0, run.stderr
    assert_mirrors(setup.account, setup.dir / "Mail", "INBOX")
    asked = setup.asked()
    assert asked[:2] == [expired, good], asked
    assert "refused the OAuth2 token" in run.stderr
    assert "server said status=invalid_token" in run.stderr
    assert "refused the login" not in run.stderr, "the retry succeeded: no failed login"
    assert "C: M1 AUTHENTICATE OAUTHBEARER <redacted>" in run.stderr, "the trace is on"
    for token in (expired, good):
        for form in secrets_of(token, setup.account.user):
            assert form not in run.stderr, form


def test_a_failing_token_command_says_so_and_backs_off_like_a_refused_login(setup: Setup) -> None:
    setup.tokens("FAIL 3")
    with DaemonProcess(setup.config()) as daemon:
        daemon.wait_for_log("trying again in")
    line = next(l for l in daemon.lines if "trying again in" in l)
    assert f"no OAuth2 token: account 'test': token_command: '{sys.executable}'" in line
    assert "exited with status 3" in line
    # The refused-login schedule (10 minutes, with jitter), not the 5 s of a dropped connection.
    delay = float(re.search(r"trying again in (\d+) s", line).group(1))  # type: ignore[union-attr]
    assert delay >= 300, line
    assert setup.asked() == [], "no token reached the server"
    assert "Traceback" not in daemon.log
