"""The OAuth2 SASL mechanisms: OAUTHBEARER (RFC 7628) and Google's XOAUTH2.

Pure functions, no I/O: which mechanism to use given the server's
capabilities, the client's first message for each, and what to make of the
error a server sends when it refuses a token. The exchange itself is
:meth:`mirrord.protocol.client.MirrordIMAP4Client.authenticate_oauth`.

Both mechanisms carry the bearer token in the client's first message, so it
is as secret as a password: nothing here logs, and the client's trace shows
only ``AUTHENTICATE <mechanism> <redacted>``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection
from typing import Literal

OAuthMechanism = Literal["OAUTHBEARER", "XOAUTH2"]

OAUTH_MECHANISMS: tuple[OAuthMechanism, ...] = ("OAUTHBEARER", "XOAUTH2")
"""In order of preference: OAUTHBEARER is the standard one (RFC 7628)."""

OAUTHBEARER_FAILURE_REPLY = b"\x01"
"""RFC 7628 3.2.3: after the server's error challenge the client answers with a
single ^A, and the server then ends the exchange with its failure."""

XOAUTH2_FAILURE_REPLY = b""
"""Google's XOAUTH2: the error challenge is answered with an empty response."""


class NoOAuthMechanism(Exception):
    """The server offers neither OAuth2 mechanism (or not the one the account names)."""


def choose_mechanism(capabilities: Collection[str], wanted: str = "oauth2") -> OAuthMechanism:
    """The mechanism to use: OAUTHBEARER where the server offers it, XOAUTH2 otherwise.

    ``wanted`` is the account's ``auth`` setting: ``oauth2`` takes the best
    offered, ``oauthbearer`` or ``xoauth2`` insist on that one (for a server
    that advertises a mechanism it does not really support).
    """
    offered = [m for m in OAUTH_MECHANISMS if f"AUTH={m}" in capabilities]
    if wanted.upper() in OAUTH_MECHANISMS:
        if wanted.upper() in offered:
            return wanted.upper()  # type: ignore[return-value]
        raise NoOAuthMechanism(
            f"the server does not offer AUTH={wanted.upper()}"
            + (f" (it offers {' and '.join(offered)}; say auth: oauth2 to use it)" if offered else "")
        )
    if not offered:
        mechs = sorted(c[5:] for c in capabilities if c.startswith("AUTH="))
        raise NoOAuthMechanism(
            "the server offers neither OAUTHBEARER nor XOAUTH2"
            + (f" (only {', '.join(mechs)})" if mechs else "")
        )
    return offered[0]


def initial_response(mechanism: OAuthMechanism, username: str, token: str, host: str, port: int) -> bytes:
    """The client's first message, not yet base64-encoded.

    OAUTHBEARER (RFC 7628 3.1): a GS2 header naming the user, then
    ``host``, ``port`` and ``auth`` key-value pairs, each ended by ^A, and a
    final ^A. XOAUTH2 (Google's): ``user=...^Aauth=Bearer ...^A^A``.
    """
    user = username.encode("utf-8")
    bearer = b"auth=Bearer " + token.encode("utf-8")
    if mechanism == "XOAUTH2":
        return b"user=" + user + b"\x01" + bearer + b"\x01\x01"
    # RFC 5801 4: ',' and '=' in the authzid are escaped as =2C and =3D.
    authzid = user.replace(b"=", b"=3D").replace(b",", b"=2C")
    return (
        b"n,a=" + authzid + b",\x01host=" + host.encode("utf-8")
        + b"\x01port=" + str(port).encode() + b"\x01" + bearer + b"\x01\x01"
    )


def failure_reply(mechanism: OAuthMechanism) -> bytes:
    """What to answer the server's error challenge with, before its NO."""
    return OAUTHBEARER_FAILURE_REPLY if mechanism == "OAUTHBEARER" else XOAUTH2_FAILURE_REPLY


def describe_error(challenge: str) -> str:
    """The server's error challenge (RFC 7628 3.2.2: base64 of a JSON object), for a log line.

    ``{"status":"invalid_token","scope":"mail"}`` becomes
    ``status=invalid_token scope=mail``. Something that is not base64 JSON
    is shown as the server sent it, shortened: it is the server's text,
    never ours, so it holds no secret of ours.
    """
    text = challenge.strip()
    try:
        decoded = base64.b64decode(text, validate=True).decode("utf-8")
        data = json.loads(decoded)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return f"unreadable error challenge {text[:80]!r}" if text else "empty error challenge"
    if not isinstance(data, dict):
        return decoded[:200]
    parts = []
    for key in ("status", "scope", "schemes", "openid-configuration"):
        if key in data:
            parts.append(f"{key}={data[key]}")
    parts.extend(f"{k}={v}" for k, v in data.items() if k not in ("status", "scope", "schemes", "openid-configuration"))
    return " ".join(" ".join(str(p).split()) for p in parts)[:300] or "{}"


__all__ = [
    "OAUTH_MECHANISMS",
    "NoOAuthMechanism",
    "OAuthMechanism",
    "choose_mechanism",
    "describe_error",
    "failure_reply",
    "initial_response",
]
