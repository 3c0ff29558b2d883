"""How many connections one account may hold open: ``max_connections``, or fewer if the server says so.

``max_connections`` is the user's estimate of the server's cap; the server
knows better. Dovecot refuses the connection past
``mail_max_userip_connections`` with ``NO [LIMIT] Maximum number of
connections from user+IP exceeded``; others say ``BYE Too many
connections``, and the user's own mail reader may hold some of the same
allowance. Retrying such a refusal is a loop that can never win, so the
budget shrinks instead, to the connections the account holds when the
refusal is settled, logged once (as a warning; a further shrink, when a
server that let a burst past its cap catches up, is an info line). The daemon then gives up the watchers that
no longer fit (their mailboxes are polled), keeping the workers.

"Settled": at start-up a dozen connections log in at once, and the first
refusal can come while others are still logging in and will succeed. The
budget is therefore set only when no connection attempt of the account is
in flight any more, to the number then open (which the server did accept),
and never from a count taken half-way. It is not raised again while the
daemon runs: a restart (or a change of the account's settings) tries
``max_connections`` anew.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

log = logging.getLogger("mirrord.daemon")


class ConnectionBudget:
    """The connections an account may use; see the module docstring."""

    def __init__(
        self, label: str, configured: int, clock: IReactorTime, *, on_change: Callable[[int], None] | None = None
    ) -> None:
        self.label = label
        self.configured = configured
        """``max_connections`` from the config."""
        self.limit = configured
        """What the account may use now: ``configured``, or what the server allowed when it refused one more."""
        self.clock = clock
        self.on_change: Callable[[int], None] = on_change or (lambda limit: None)
        """Called with the new limit when it shrinks."""
        self._clients: list[Any] = []
        self._attempts = 0
        self._refused: str | None = None
        self._settle: IDelayedCall | None = None

    @property
    def shrunk(self) -> bool:
        return self.limit < self.configured

    @property
    def unsettled(self) -> bool:
        """Attempts are in flight after a refusal: the limit is about to change, so wait for it."""
        return self._refused is not None

    def open_count(self) -> int:
        """Connections of this account that are open now."""
        self._clients = [c for c in self._clients if not getattr(c, "connected_transport_lost", True)]
        return len(self._clients)

    def attempt(self) -> None:
        """A connection attempt begins; :meth:`done` must follow, whatever its outcome."""
        self._attempts += 1

    def done(self, client: Any = None, refused: str | None = None) -> None:
        """The attempt ended: ``client`` if it logged in, ``refused`` (the server's words) if one too many."""
        self._attempts = max(0, self._attempts - 1)
        if client is not None:
            self._clients.append(client)
        if refused is not None:
            self._refused = refused
        if self._refused is not None and self._attempts == 0 and (self._settle is None or not self._settle.active()):
            # On the next turn: whoever was refused has then reacted (a watcher
            # hands its mailbox to the poller) before the daemon re-chooses.
            self._settle = self.clock.callLater(0, self._settled)

    def _settled(self) -> None:
        self._settle = None
        if self._attempts or self._refused is None:
            return  # another attempt began meanwhile: its end settles
        reason, self._refused = self._refused, None
        allowed = max(1, self.open_count())
        if allowed >= self.limit:
            log.debug("%s: one more connection refused at %d open: %s", self.label, allowed, reason)
            return
        first = not self.shrunk
        before, self.limit = self.limit, allowed
        if first:
            log.warning(
                "%s: the server refused a connection beyond %d (%s); using at most %d connections instead of %d "
                "until mirrord restarts (or the account's settings change); mailboxes that lose their watcher "
                "are polled", self.label, allowed, reason, allowed, before,
            )
        else:
            # Said once above; a server that let a burst of logins past its cap
            # (Dovecot counts them asynchronously) refuses again as it catches up.
            log.info("%s: refused again at %d connections: using at most %d", self.label, before, allowed)
        self.on_change(allowed)

    def stop(self) -> None:
        if self._settle is not None and self._settle.active():
            self._settle.cancel()
