"""Where a server mailbox lives on disk: a pure mapping, tested on its own.

Servers differ (DESIGN.md): Dovecot says prefix "" and delimiter "/", Cyrus
and Courier put everything under ``INBOX.`` with ".". Locally the hierarchy is
always spelled with "/" and the personal prefix is dropped, so the same
account looks the same on disk whichever server holds it:
``INBOX.Archive.2024`` -> ``Archive/2024``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

MAILDIR_SUBDIRS = frozenset({"cur", "new", "tmp"})

NAME_MAX = 255
"""Bytes in one path component on every Linux file system we run on."""

HASH_LEN = 8
"""Hex digits of the hash that keeps a shortened or renamed spelling unique and stable."""

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """``text`` with every control character (C0, DEL, C1) spelled ``\\xNN``.

    A server chooses mailbox names; an ESC or LF in one must not reach a
    terminal, a log line or a path as itself (it could rewrite the screen,
    forge a log line or hide a folder), so it is shown as visible text.
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def short_hash(text: str) -> str:
    """A short, stable digest of ``text``: the same name gets the same spelling on every run."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_LEN]


def fit_component(part: str, original: str | None = None) -> str:
    """``part`` shortened to fit one path component (``NAME_MAX`` bytes of UTF-8).

    A name that fits is kept as is. A longer one keeps its beginning, cut on
    a character boundary, plus ``~`` and a hash of the full ``original`` name,
    so it stays readable, stable across runs and distinct from its siblings.
    """
    raw = part.encode("utf-8", "surrogatepass")
    if len(raw) <= NAME_MAX:
        return part
    tail = "~" + short_hash(original if original is not None else part)
    head = raw[: NAME_MAX - len(tail)].decode("utf-8", "ignore")
    return head + tail


class UnmappableName(ValueError):
    """A server name that would not make a safe, unambiguous local path."""


def local_name(server_name: str, delimiter: str | None, prefix: str = "") -> str:
    """The local spelling of ``server_name`` (already decoded from modified UTF-7)."""
    if server_name.upper() == "INBOX":
        return "INBOX"
    name = server_name
    if prefix and name.startswith(prefix) and len(name) > len(prefix):
        name = name[len(prefix) :]
    if delimiter:
        parts = name.split(delimiter)
    else:
        parts = [name]
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\0" in part:
            raise UnmappableName(f"mailbox {visible(server_name)!r} has a component {visible(part)!r} that cannot be a folder")
    # Control characters are spelled visibly, and over-long components are
    # shortened: the local name is a path, a log field and a hook variable.
    return "/".join(fit_component(visible(part), part) for part in parts)


def unique_local_names(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Server name -> local name, with no two server names sharing a local one.

    ``pairs`` are (server name, :func:`local_name`). Different server names
    can map to one local name (``INBOX`` and ``INBOX.INBOX`` under prefix
    ``INBOX.``; names differing only in a control character or beyond the
    length limit); without this one folder would silently hide the other.
    The real INBOX always keeps ``INBOX``; of the others, the one whose
    server name equals its local spelling keeps it (so an existing folder
    never moves), and every other gets ``~`` plus a hash of its server name
    appended to its last component: stable, readable and distinct.
    """
    pairs = list(pairs)
    by_local: dict[str, list[str]] = {}
    for server, local in pairs:
        by_local.setdefault(local, []).append(server)
    result: dict[str, str] = {}
    taken = set(by_local)
    for local, servers in by_local.items():
        if len(servers) == 1:
            result[servers[0]] = local
            continue

        def rank(server: str, local: str = local) -> tuple[int, int, str]:
            is_inbox = local == "INBOX" and server.upper() == "INBOX"
            return (0 if is_inbox else 1, 0 if server == local else 1, server)

        keeper, *others = sorted(servers, key=rank)
        result[keeper] = local
        for server in others:
            head, sep, last = local.rpartition("/")
            suffix = "~" + short_hash(server)
            raw = last.encode("utf-8", "surrogatepass")
            cut = raw[: NAME_MAX - len(suffix)].decode("utf-8", "ignore")
            new = f"{head}{sep}{cut}{suffix}"
            while new in taken:  # pragma: no cover - a hash collision on top of a name collision
                suffix = "~" + short_hash(suffix + server)
                new = f"{head}{sep}{cut}{suffix}"
            taken.add(new)
            result[server] = new
    return result


def flat_name(name: str) -> str:
    """``name`` as one path component: ``%`` and ``/`` escaped, then fitted.

    Per-mailbox directories outside the Maildir (trash, set-aside) must not
    nest: with ``Archive`` and ``Archive/2024`` the parent's directory would
    hold the child's, and cleaning one would touch the other.
    """
    flat = name.replace("%", "%25").replace("/", "%2F")
    if flat in ("", ".", ".."):
        flat = flat.replace(".", "%2E") or "%"
    return fit_component(visible(flat), name)


def maildir_path(root: Path, name: str) -> Path:
    """The Maildir of local mailbox ``name`` under the account's ``root``.

    A component called cur, new or tmp would land inside its parent's own
    Maildir folders, so such names are refused rather than mixed in.
    """
    parts = name.split("/")
    if any(part in MAILDIR_SUBDIRS for part in parts[1:]) or (len(parts) > 1 and parts[0] in MAILDIR_SUBDIRS):
        raise UnmappableName(
            f"mailbox {name!r} would be stored inside another mailbox's cur/new/tmp folder"
        )
    return root.joinpath(*(fit_component(part) for part in parts))
