"""Tell systemd how the daemon is doing, without a dependency on libsystemd.

The unit runs with ``Type=notify`` and ``WatchdogSec=``: systemd counts the
service as started only when it says ``READY=1``, and restarts it when the
``WATCHDOG=1`` pings stop. The protocol is small enough to speak ourselves:
one datagram of ``KEY=value`` lines to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket). systemd learns
the sender's PID from the kernel (it sets SO_PASSCRED), so nothing else needs
to be sent.

Two promises matter more than any single message getting through:

- Notifying never crashes the daemon. If the socket is gone (the user
  manager was restarted, the daemon runs outside systemd with a stale
  variable), the failure is logged once at WARNING and every later message
  is dropped quietly until one gets through again.
- Notifying never blocks the reactor. The socket is non-blocking and a
  message that does not fit in the receiver's queue is dropped: a stalled
  manager must not stall mail delivery, and the next ping supersedes it.

Outside systemd (``$NOTIFY_SOCKET`` unset) every call is a silent no-op, so
callers never need to ask whether they run under systemd.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.internet.task import LoopingCall

log = logging.getLogger("mirrord.sdnotify")

MAX_DATAGRAM = 4096
"""systemd reads at most this many bytes of one notification (PIPE_BUF); more is cut off."""

MAX_STATUS = 512
"""Characters of STATUS= kept: a status line is for ``systemctl status``, not for a log."""

_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*\Z")


def _parse_address(value: str) -> str | None:
    """The socket address systemd means by ``$NOTIFY_SOCKET``, or None if we cannot use it.

    Only the two forms a user or system manager hands out are accepted: an
    absolute path, and ``@name`` for an abstract socket (Python spells the
    abstract namespace with a leading NUL). Other forms (``vsock:`` for VMs,
    relative paths) are refused rather than guessed at.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def _one_line(text: str) -> str:
    """Keep a value on its line: a newline would let text (say, a server's
    error message in STATUS=) smuggle in fields such as READY=1 or STOPPING=1."""
    return text.replace("\r", " ").replace("\n", " ")


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """The ping period in seconds: half of ``$WATCHDOG_USEC``, as systemd recommends.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is meant
    for; a child that inherited the variables (a password helper, a process
    forked by a test runner) must not think it is being watched.
    """
    raw_usec = environ.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid:
        try:
            pid = int(raw_pid)
        except ValueError:
            log.warning("ignoring WATCHDOG_PID=%r: not a process id", raw_pid)
            return None
        if pid != os.getpid():
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", raw_usec)
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


class Notifier:
    """Sends state changes to the service manager; a no-op when there is none.

    Build one with :meth:`from_environment` early in ``mirrord run`` and keep
    it for the life of the process. ``enabled`` says whether messages go
    anywhere; callers need not check it.
    """

    def __init__(self, address: str | None, watchdog_interval: float | None = None) -> None:
        """``address`` is a ``$NOTIFY_SOCKET`` value (``/path`` or ``@abstract``); None disables."""
        self._address: str | None = None
        if address is not None:
            self._address = _parse_address(address)
            if self._address is None:
                log.warning("ignoring NOTIFY_SOCKET=%r: not an absolute path or @abstract name", address)
        self.watchdog_interval: float | None = watchdog_interval if self._address is not None else None
        self._socket: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier systemd set up for this process, or a no-op one outside systemd."""
        address = environ.get("NOTIFY_SOCKET") or None
        return cls(address, _watchdog_interval(environ) if address else None)

    @property
    def enabled(self) -> bool:
        """True when notifications are sent somewhere (until :meth:`close`)."""
        return self._address is not None

    # -- the messages systemd understands ---------------------------------------

    def ready(self, status: str | None = None) -> None:
        """Startup (or a reload) is complete: ``systemctl start`` returns now."""
        self._send_with_status(["READY=1"], status)

    def stopping(self, status: str | None = None) -> None:
        """Shutdown has begun, so systemd does not read the quiet that follows as a hang."""
        self._send_with_status(["STOPPING=1"], status)

    def reloading(self, status: str | None = None) -> None:
        """A reload (SIGHUP: re-read the config) has begun; send :meth:`ready` when it is done.

        MONOTONIC_USEC lets systemd 253+ (``Type=notify-reload``) tell this
        reload apart from an earlier one; older versions ignore it.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send_with_status(["RELOADING=1", f"MONOTONIC_USEC={now_usec}"], status)

    def status(self, text: str) -> None:
        """One line for ``systemctl --user status mirrord``, e.g. ``3 accounts, 41 mailboxes idle``."""
        self.send(f"STATUS={self._status_text(text)}")

    def watchdog(self) -> None:
        """Still alive; see :func:`start_watchdog` for who calls this and why."""
        self.send("WATCHDOG=1")

    def notify(self, **fields: str) -> None:
        """Send arbitrary fields, e.g. ``notify(EXTEND_TIMEOUT_USEC="60000000")``."""
        lines = []
        for name, value in fields.items():
            if not _FIELD_NAME.match(name):
                raise ValueError(f"not a notification field name: {name!r}")
            lines.append(f"{name}={value}")
        self.send(*lines)

    def send(self, *lines: str) -> None:
        """Send ``lines`` as one datagram, e.g. ``send("READY=1", "STATUS=3 accounts")``.

        Never raises for a delivery problem and never blocks; see the module
        docstring.
        """
        if self._address is None or not lines:
            return
        data = "\n".join(_one_line(line) for line in lines).encode("utf-8", "replace")
        if len(data) > MAX_DATAGRAM:
            # Cut rather than drop: the leading fields (READY=1, WATCHDOG=1)
            # are the ones that matter, and a long STATUS= comes last.
            # Cut on a character boundary: the text must stay valid UTF-8.
            data = data[:MAX_DATAGRAM].decode("utf-8", "ignore").encode("utf-8")
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                )
            # Not connected: each send looks the address up afresh, so a
            # manager that re-creates its socket (daemon-reexec) is found again.
            self._socket.sendto(data, socket.MSG_DONTWAIT, self._address)
        except OSError as e:
            self._delivery_failed(e)
        else:
            if self._failing:
                log.info("notifying systemd works again")
                self._failing = False

    def close(self) -> None:
        """Release the socket; later calls are no-ops."""
        self._address = None
        self.watchdog_interval = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------

    def _send_with_status(self, lines: list[str], status: str | None) -> None:
        if status is not None:
            lines.append(f"STATUS={self._status_text(status)}")
        self.send(*lines)

    @staticmethod
    def _status_text(text: str) -> str:
        text = _one_line(text)
        return text if len(text) <= MAX_STATUS else text[: MAX_STATUS - 1] + "…"

    def _delivery_failed(self, error: OSError) -> None:
        """Warn once per outage; a watchdog ping every minute must not flood the journal."""
        if self._failing:
            log.debug("systemd notification dropped: %s", error)
            return
        self._failing = True
        if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            reason = "the service manager is not reading its socket; dropping messages"
        else:
            reason = f"{error.strerror or error}; carrying on without it"
        log.warning("cannot notify systemd at %s: %s", self._printable_address(), reason)

    def _printable_address(self) -> str:
        address = self._address or ""
        return "@" + address[1:] if address.startswith("\0") else address


def start_watchdog(notifier: Notifier, clock: IReactorTime | None = None) -> LoopingCall | None:
    """Ping ``WATCHDOG=1`` every ``notifier.watchdog_interval`` seconds from the reactor.

    The pings come from a timer in the reactor on purpose: if the reactor
    wedges (a blocking call, a busy loop), the pings stop, systemd kills the
    service after ``WatchdogSec=`` and ``Restart=on-failure`` starts it again.
    A thread would keep pinging for a daemon that no longer moves mail.

    Returns the running LoopingCall (stop it on shutdown), or None when
    systemd asked for no watchdog. ``clock`` is the reactor, or a
    ``task.Clock`` in tests.
    """
    interval = notifier.watchdog_interval
    if not notifier.enabled or interval is None:
        return None
    from twisted.internet.task import LoopingCall

    if clock is None:
        from twisted.internet import reactor as default_reactor

        clock = default_reactor  # type: ignore[assignment]
    loop = LoopingCall(notifier.watchdog)
    loop.clock = clock
    done = loop.start(interval, now=True)
    # watchdog() does not raise; should it ever, say so: the pings have stopped
    # and systemd will restart the service, which would otherwise be a mystery.
    done.addErrback(lambda failure: log.error("systemd watchdog pings stopped: %s", failure.getErrorMessage()))
    return loop
