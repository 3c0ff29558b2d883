"""A toy OAuth2 token introspection endpoint (RFC 7662) on loopback, for Dovecot's oauth2 passdb.

mirrord's XOAUTH2 and OAUTHBEARER are tested against Dovecot itself, whose
``oauth2`` passdb asks an introspection URL about every token it is shown.
This is that URL: a twisted.web resource answering ``POST`` (Dovecot's
``introspection_mode = post``, body ``token=...``) from a JSON file of the
tokens a test has handed out, re-read on every request so that a test can
hand out, expire or revoke tokens while the server runs::

    {"tok-1": {"username": "alice", "active": true},
     "tok-old": {"username": "alice", "active": false}}

An unknown token is ``{"active": false}``, as RFC 7662 2.2 says. Every
request is appended to ``requests.log`` next to the tokens file (the token
itself, so that a test can count how often the server was asked about which
token; this is a test server and its tokens are throwaway).

Run it as ``python -m mirrord.testing.oauthserver TOKENS_JSON PORT_FILE``:
it listens on 127.0.0.1 on a free port and writes the port to PORT_FILE once
it is listening. :class:`IntrospectionServer` does that from a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from mirrord.testing._errors import DovecotError


def _serve(tokens_path: Path, port_file: Path) -> None:
    from twisted.internet import reactor
    from twisted.web import resource, server

    log_path = tokens_path.with_name("requests.log")

    class Introspect(resource.Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> bytes:
            token = (request.args.get(b"token") or [b""])[0].decode("utf-8", "replace")
            return self._answer(request, token)

        def render_GET(self, request: Any) -> bytes:
            # introspection_mode = auth: the token comes as a bearer token.
            header = (request.getHeader(b"authorization") or b"").decode("utf-8", "replace")
            token = header[len("Bearer "):] if header.startswith("Bearer ") else ""
            return self._answer(request, token)

        def _answer(self, request: Any, token: str) -> bytes:
            try:
                tokens = json.loads(tokens_path.read_text())
            except (OSError, ValueError):
                tokens = {}
            entry = tokens.get(token)
            answer: dict[str, Any] = {"active": False}
            if isinstance(entry, dict) and entry.get("active", True):
                answer = {"active": True, "username": entry["username"], "scope": "mail"}
            with open(log_path, "a") as log:
                log.write(f"{token} {'active' if answer['active'] else 'inactive'}\n")
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(answer).encode()

    site = server.Site(Introspect())
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    temporary = port_file.with_name(port_file.name + ".tmp")
    temporary.write_text(str(port.getHost().port))
    os.replace(temporary, port_file)
    reactor.run()  # type: ignore[attr-defined]


class IntrospectionServer:
    """The endpoint above, in a child process of the test, with tokens the test controls.

    ``url`` is what Dovecot's ``introspection_url`` must say. :meth:`grant`
    hands out a token for a user, :meth:`expire` makes it inactive, and
    :meth:`asked` lists the tokens Dovecot asked about, in order.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.tokens_path = self.directory / "tokens.json"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._tokens: dict[str, dict[str, Any]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/introspect"

    def start(self, timeout: float = 15.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._save()
        port_file = self.directory / "port"
        port_file.unlink(missing_ok=True)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "mirrord.testing.oauthserver", str(self.tokens_path), str(port_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.directory / "stderr", "wb"),  # noqa: SIM115 - the child keeps it
        )
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise DovecotError(
                    f"the introspection endpoint did not start: {(self.directory / 'stderr').read_text()[-2000:]}"
                )
            time.sleep(0.02)
        self.port = int(port_file.read_text())

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def grant(self, token: str, username: str) -> str:
        self._tokens[token] = {"username": username, "active": True}
        self._save()
        return token

    def expire(self, token: str) -> None:
        self._tokens[token]["active"] = False
        self._save()

    def asked(self) -> list[str]:
        try:
            lines = (self.directory / "requests.log").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [line.split(" ", 1)[0] for line in lines]

    def _save(self) -> None:
        temporary = self.tokens_path.with_name("tokens.json.tmp")
        temporary.write_text(json.dumps(self._tokens))
        os.replace(temporary, self.tokens_path)

    def __enter__(self) -> IntrospectionServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), Path(sys.argv[2]))
