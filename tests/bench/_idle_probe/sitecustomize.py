"""Wakeup probe for bench_idle.py, loaded into ``python -m mirrord`` through PYTHONPATH.

Inactive unless ``MIRRORD_IDLE_PROBE`` names an output file. It wraps three
things, all cheap and none of them timers of their own:

- ``EPollReactor.doPoll``: every return from a *blocking* epoll_wait is one
  wakeup (a poll with timeout 0 is the reactor finishing an iteration, not
  a sleep); it notes whether the poll timed out (a timer) or which
  connections had data;
- ``DelayedCall``: the name of every timer that runs, and after which wakeup;
- ``MirrordIMAP4Client._trace_in``: the first bytes of every line received,
  so a wakeup for ``* OK Still here`` is told apart from new mail.

SIGUSR1 starts a measurement (forgets what came before); SIGUSR2 writes what
was seen since as JSON to the output file. The two signals' own wakeups are
not counted.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

_OUT = os.environ.get("MIRRORD_IDLE_PROBE")


def _install(out: str) -> None:
    from twisted.internet import base, epollreactor

    from mirrord.protocol import client as client_module

    wakeups: list[dict[str, Any]] = []
    state: dict[str, Any] = {"current": None, "started": time.monotonic()}

    def label_of(selectable: Any) -> str:
        protocol = getattr(selectable, "protocol", None)
        for _ in range(4):
            if protocol is None:
                break
            label = getattr(protocol, "label", None)
            if isinstance(label, str):
                return label
            protocol = getattr(protocol, "wrappedProtocol", None)
        return type(selectable).__name__

    original_poll = epollreactor.EPollReactor.doPoll

    def do_poll(self: Any, timeout: Any) -> None:
        if timeout == 0:
            return original_poll(self, timeout)
        # Which fds will be ready cannot be known before; wrap the poller.
        poller = self._poller
        ready: list[Any] = []

        class Spy:
            def poll(self_spy: Any, t: Any, n: Any) -> Any:
                result = poller.poll(t, n)
                ready.extend(result)
                return result

            def __getattr__(self_spy: Any, name: str) -> Any:  # register, modify, unregister
                return getattr(poller, name)

        self._poller = Spy()
        try:
            original_poll(self, timeout)
        finally:
            self._poller = poller
        record = {
            "t": time.monotonic(),
            "timeout": None if timeout is None or timeout < 0 else timeout,
            "io": [label_of(self._selectables.get(fd)) for fd, _ in ready],
            "timers": [],
            "lines": [],
        }
        if state.pop("skip_next", False) and not ready[1:] and record["io"] and not record["timers"]:
            state["current"] = None  # SIGUSR1's own wakeup
            return
        wakeups.append(record)
        state["current"] = record

    epollreactor.EPollReactor.doPoll = do_poll  # type: ignore[method-assign]
    epollreactor.EPollReactor.doIteration = do_poll  # type: ignore[method-assign]

    original_init = base.DelayedCall.__init__

    def name_of(func: Any) -> str:
        owner = getattr(func, "__self__", func)
        inner = getattr(owner, "f", None)  # a LoopingCall is its own delayed call: name its function
        if inner is not None:
            return type(owner).__name__ + "(" + getattr(inner, "__qualname__", repr(inner)) + ")"
        return getattr(func, "__qualname__", repr(func))

    def init(self: Any, time_: float, func: Any, args: Any, kw: Any, *rest: Any, **kwrest: Any) -> None:
        name = name_of(func)
        delay = time_ - time.time()

        def wrapped(*a: Any, **k: Any) -> Any:
            current = state["current"]
            if current is not None:
                current["timers"].append(f"{name} (after {delay:.3g} s)")
            return func(*a, **k)

        original_init(self, time_, wrapped, args, kw, *rest, **kwrest)

    base.DelayedCall.__init__ = init  # type: ignore[method-assign]

    original_trace = client_module.MirrordIMAP4Client._trace_in

    def trace_in(self: Any, line: bytes) -> None:
        current = state["current"]
        if current is not None:
            current["lines"].append(f"{self.label}: {line[:40].decode('utf-8', 'replace')}")
        original_trace(self, line)

    client_module.MirrordIMAP4Client._trace_in = trace_in  # type: ignore[method-assign]

    def start(signum: int, frame: Any) -> None:
        wakeups.clear()
        state["current"] = None
        state["started"] = time.monotonic()
        state["skip_next"] = True

    def dump(signum: int, frame: Any) -> None:
        # The handler runs inside the interrupted epoll_wait, before this
        # signal's wakeup is recorded: nothing of ours to drop here.
        data = {"seconds": time.monotonic() - state["started"], "wakeups": list(wakeups)}
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, dump)


if _OUT:
    _install(_OUT)
