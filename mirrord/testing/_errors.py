"""Errors of the test support."""

from __future__ import annotations


class DovecotError(RuntimeError):
    """The private Dovecot could not be set up, started or driven."""


class DovecotMissing(DovecotError):
    """Dovecot is not installed, so integration tests cannot run here."""


class ImapCommandError(DovecotError):
    """The server answered NO or BAD to a command sent by :class:`ImapClient`."""

