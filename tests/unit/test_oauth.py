"""OAuth2 sign-in without a server: the SASL messages, the exchange on StringTransport, the retry.

The same exchanges run against Dovecot's oauth2 passdb in
tests/integration/test_oauth.py; these pin the bytes and the decisions.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from mirrord.config import ConfigError, PasswordSource, load_config
from mirrord.protocol import sasl
from mirrord.protocol.client import MirrordIMAP4Client
from mirrord.protocol.connect import log_in
from mirrord.protocol.errors import (
    LoginFailed,
    MissingCapability,
    OAuthRefused,
    TokenUnavailable,
)

REPO = Path(__file__).resolve().parents[2]
TOKEN = "ya29.secret-token-Zq8"
CAPS = b"IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=OAUTHBEARER AUTH=XOAUTH2"
ERROR_JSON = base64.b64encode(b'{"status":"invalid_token","scope":"mail"}')


def connected(caps: bytes = CAPS) -> tuple[MirrordIMAP4Client, StringTransport]:
    client = MirrordIMAP4Client(label="acct", clock=task.Clock())
    transport = StringTransport()
    client.makeConnection(transport)
    client.dataReceived(b"* OK [CAPABILITY " + caps + b"] ready\r\n")
    return client, transport


def sent(transport: StringTransport) -> bytes:
    value = transport.value()
    transport.clear()
    return value


def outcome(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "deferred has not fired"
    return results[0]


# -- the SASL messages -------------------------------------------------------


def test_oauthbearer_initial_response_is_rfc_7628() -> None:
    message = sasl.initial_response("OAUTHBEARER", "me,x=y@example.com", "tok", "imap.example.com", 993)
    assert message == b"n,a=me=2Cx=3Dy@example.com,\x01host=imap.example.com\x01port=993\x01auth=Bearer tok\x01\x01"


def test_xoauth2_initial_response_is_googles() -> None:
    assert sasl.initial_response("XOAUTH2", "me@gmail.com", "tok", "h", 993) == (
        b"user=me@gmail.com\x01auth=Bearer tok\x01\x01"
    )


@pytest.mark.parametrize(
    ("caps", "wanted", "chosen"),
    [
        ({"AUTH=XOAUTH2", "AUTH=OAUTHBEARER"}, "oauth2", "OAUTHBEARER"),
        ({"AUTH=XOAUTH2"}, "oauth2", "XOAUTH2"),
        ({"AUTH=XOAUTH2", "AUTH=OAUTHBEARER"}, "xoauth2", "XOAUTH2"),
    ],
)
def test_oauthbearer_where_offered_else_xoauth2(caps: set[str], wanted: str, chosen: str) -> None:
    assert sasl.choose_mechanism(caps, wanted) == chosen


def test_no_oauth_mechanism_says_what_is_offered() -> None:
    with pytest.raises(sasl.NoOAuthMechanism, match="only LOGIN, PLAIN"):
        sasl.choose_mechanism({"IMAP4REV1", "AUTH=PLAIN", "AUTH=LOGIN"})
    with pytest.raises(sasl.NoOAuthMechanism, match="offers XOAUTH2"):
        sasl.choose_mechanism({"AUTH=XOAUTH2"}, "oauthbearer")


def test_error_challenge_is_decoded_for_the_log() -> None:
    assert sasl.describe_error(ERROR_JSON.decode()) == "status=invalid_token scope=mail"
    assert sasl.describe_error("not base64!") == "unreadable error challenge 'not base64!'"


# -- the exchange ------------------------------------------------------------


def test_sasl_ir_sends_the_token_in_the_command_and_the_trace_hides_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mirrord.trace")
    client, transport = connected()
    d = defer.Deferred.fromCoroutine(client.authenticate_oauth("OAUTHBEARER", "me", TOKEN, "h", 993))
    wire = sent(transport)
    encoded = base64.b64encode(sasl.initial_response("OAUTHBEARER", "me", TOKEN, "h", 993))
    assert wire == b"M1 AUTHENTICATE OAUTHBEARER " + encoded + b"\r\n"
    client.dataReceived(b"M1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
    assert outcome(d) is None
    assert client.auth_mechanism == "OAUTHBEARER" and client.state == "auth"
    assert "AUTHENTICATE OAUTHBEARER <redacted>" in caplog.text
    assert TOKEN not in caplog.text and encoded.decode() not in caplog.text


def test_without_sasl_ir_the_token_follows_the_continuation() -> None:
    client, transport = connected(b"IMAP4rev1 AUTH=XOAUTH2")
    d = defer.Deferred.fromCoroutine(client.authenticate_oauth("XOAUTH2", "me", TOKEN, "h", 993))
    assert sent(transport) == b"M1 AUTHENTICATE XOAUTH2\r\n"
    client.dataReceived(b"+ \r\n")
    assert sent(transport) == base64.b64encode(sasl.initial_response("XOAUTH2", "me", TOKEN, "h", 993)) + b"\r\n"
    client.dataReceived(b"M1 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    assert outcome(d) is None and client.auth_mechanism == "XOAUTH2"


@pytest.mark.parametrize(("mechanism", "reply"), [("OAUTHBEARER", b"AQ==\r\n"), ("XOAUTH2", b"\r\n")])
def test_a_refusal_answers_the_error_challenge_and_carries_it(mechanism: sasl.OAuthMechanism, reply: bytes) -> None:
    client, transport = connected()
    d = defer.Deferred.fromCoroutine(client.authenticate_oauth(mechanism, "me", TOKEN, "h", 993))
    sent(transport)
    client.dataReceived(b"+ " + ERROR_JSON + b"\r\n")
    assert sent(transport) == reply
    client.dataReceived(b"M1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    failure = outcome(d)
    assert isinstance(failure.value, OAuthRefused)
    assert failure.value.error == "status=invalid_token scope=mail"
    assert client.auth_mechanism is None


# -- the retry with a fresh token --------------------------------------------


@dataclass
class Settings:
    name: str = "acct"
    host: str = "h"
    port: int = 993
    username: str = "me"
    auth: str = "oauth2"
    compress: str = "no"


@dataclass
class Tokens:
    queue: list[str | Exception]
    handed: list[str] = field(default_factory=list)

    def fetcher(self) -> Callable[[], Awaitable[str]]:
        async def fetch() -> str:
            item = self.queue.pop(0)
            if isinstance(item, Exception):
                raise item
            self.handed.append(item)
            return item

        return fetch


def refuse(client: MirrordIMAP4Client, tag: bytes) -> None:
    client.dataReceived(b"+ " + ERROR_JSON + b"\r\n")
    client.dataReceived(tag + b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")


def test_a_refused_token_is_replaced_once_on_the_same_connection(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    client, transport = connected()
    tokens = Tokens(["expired", "fresh"])
    d = defer.Deferred.fromCoroutine(log_in(client, Settings(), "", "h:993", tokens.fetcher()))
    assert b"M1 AUTHENTICATE OAUTHBEARER" in sent(transport)
    refuse(client, b"M1")
    wire = sent(transport)
    assert b"M2 AUTHENTICATE OAUTHBEARER " + base64.b64encode(
        sasl.initial_response("OAUTHBEARER", "me", "fresh", "h", 993)
    ) in wire
    client.dataReceived(b"M2 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    assert outcome(d) is None
    assert tokens.handed == ["expired", "fresh"]
    assert "server said status=invalid_token scope=mail" in caplog.text
    assert "expired" not in caplog.text and "fresh" not in caplog.text.replace("for a fresh one", "")


def test_a_second_refusal_is_a_failed_login_with_the_servers_error() -> None:
    client, _ = connected()
    d = defer.Deferred.fromCoroutine(log_in(client, Settings(), "", "h:993", Tokens(["a", "b"]).fetcher()))
    refuse(client, b"M1")
    refuse(client, b"M2")
    failure = outcome(d)
    assert isinstance(failure.value, LoginFailed)
    assert "refused the login of 'me' with OAUTHBEARER, also with a fresh token" in str(failure.value)
    assert "status=invalid_token" in str(failure.value)


def test_the_same_token_again_is_not_offered_twice() -> None:
    client, transport = connected()
    d = defer.Deferred.fromCoroutine(log_in(client, Settings(), "", "h:993", Tokens(["same", "same"]).fetcher()))
    refuse(client, b"M1")
    assert b"AUTHENTICATE" not in sent(transport).split(b"\r\n", 1)[1]
    failure = outcome(d)
    assert isinstance(failure.value, LoginFailed)
    assert "gave the same token again" in str(failure.value)


def test_a_failing_token_command_is_a_token_unavailable_login_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    from mirrord.protocol import connect

    # The command runs in a thread; here, at once.
    monkeypatch.setattr(connect.threads, "deferToThread", lambda f, *a: defer.maybeDeferred(f, *a))

    @dataclass
    class WithSource(Settings):
        password: Any = None

    account = WithSource(password=PasswordSource("acct", command=("false",), token=True))
    client, transport = connected()
    failure = outcome(defer.Deferred.fromCoroutine(log_in(client, account, "", "h:993")))
    assert isinstance(failure.value, TokenUnavailable) and isinstance(failure.value, LoginFailed)
    assert str(failure.value) == "no OAuth2 token: account 'acct': token_command: 'false' exited with status 1"
    assert sent(transport) == b"", "nothing was sent to the server"


def test_a_server_without_oauth_mechanisms_is_a_missing_capability() -> None:
    client, _ = connected(b"IMAP4rev1 AUTH=PLAIN")
    failure = outcome(defer.Deferred.fromCoroutine(log_in(client, Settings(), "", "h:993", Tokens([]).fetcher())))
    assert isinstance(failure.value, MissingCapability)
    assert "neither OAUTHBEARER nor XOAUTH2" in str(failure.value)


# -- configuration -----------------------------------------------------------


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("accounts:\n  a:\n    host: h\n    username: u\n    maildir: /m\n" + body)
    path.chmod(0o600)
    return path


def test_auth_oauth2_takes_the_token_command_and_runs_nothing_at_load(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    config = load_config(write(tmp_path, f"    auth: oauth2\n    token_command: [touch, {marker}]\n"))
    (account,) = config.accounts
    assert account.auth == "oauth2"
    assert account.password.kind == "token_command" and account.password.token
    assert account.password.resolve_once() == ""
    assert not marker.exists()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("    auth: oauth2\n", "auth: oauth2 needs a token_command"),
        ("    auth: oauth2\n    token_command: [t]\n    password: p\n", "password would never be used"),
        ("    token_command: [t]\n    password_command: [p]\n", "add 'auth: oauth2'"),
        ("    auth: kerberos\n    password: p\n", "auth"),
    ],
)
def test_oauth_config_mistakes_are_named(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, body))


def test_the_examples_oauth2_accounts_load(tmp_path: Path) -> None:
    text = (REPO / "config.example.yaml").read_text()
    block = text.split("# --- OAuth2 examples ---\n", 1)[1].split("  # --- end of OAuth2 examples ---", 1)[0]
    accounts = "\n".join(line.replace("  # ", "  ", 1) if line.strip() != "#" else "" for line in block.splitlines())
    path = tmp_path / "config.yaml"
    path.write_text("accounts:\n" + accounts + "\n")
    config = load_config(path)
    hosts = {a.name: (a.host, a.auth, a.password.kind) for a in config.accounts}
    assert hosts == {
        "gmail": ("imap.gmail.com", "oauth2", "token_command"),
        "work": ("outlook.office365.com", "oauth2", "token_command"),
    }
