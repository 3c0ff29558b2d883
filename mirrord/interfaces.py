"""The interfaces between components, in one place.

Twisted's ``IMailboxListener`` has ``newMessages``, ``flagsChanged`` and
``modeChanged`` and no way to say a message was expunged, which is half of
what a mirror needs to hear. ``MailboxEvents`` is what a watcher tells the
code that keeps a mailbox's local copy current.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from mirrord.flags import Flags


class MailboxEvents(Protocol):
    """What a watcher reports about one mailbox, in the order the server said it."""

    def watching(self) -> None:
        """The watcher (re)connected and has asked to be told of changes.

        Everything that changes from now on will be reported, so this is the
        moment to run a catch-up sync: nothing can slip between the two.
        """

    def new_messages(self) -> None:
        """The mailbox has messages it did not have before (EXISTS grew)."""

    def expunged(self, uids: Sequence[int]) -> None:
        """These messages are gone from the server (EXPUNGE mapped to UIDs, or VANISHED)."""

    def flags_changed(self, changes: Mapping[int, Flags]) -> None:
        """These messages now have exactly these flags."""

    def resync_needed(self, reason: str) -> None:
        """Something happened that events cannot describe exactly; compare listings."""

    def disconnected(self, reason: str) -> None:
        """The watcher lost its connection and will reconnect by itself."""
