"""Where a server mailbox lives on disk: a pure mapping, tested on its own.

Servers differ (DESIGN.md): Dovecot says prefix "" and delimiter "/", Cyrus
and Courier put everything under ``INBOX.`` with ".". Locally the hierarchy is
always spelled with "/" and the personal prefix is dropped, so the same
account looks the same on disk whichever server holds it:
``INBOX.Archive.2024`` -> ``Archive/2024``.
"""

from __future__ import annotations

from pathlib import Path

MAILDIR_SUBDIRS = frozenset({"cur", "new", "tmp"})


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
            raise UnmappableName(f"mailbox {server_name!r} has a component {part!r} that cannot be a folder")
    return "/".join(parts)


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
    return root.joinpath(*parts)
