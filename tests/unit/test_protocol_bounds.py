"""A hostile server cannot make the client spend unbounded memory (DESIGN.md invariant 9).

Each test feeds one hostile response and checks both that the connection is
refused with a clear reason and that tracemalloc's peak stayed small: the
bound is enforced before the cost is paid, not after.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from mirrord.protocol import _parser
from mirrord.protocol._parser import MAX_DEPTH, ProtocolError, ResponseReader
from mirrord.protocol.client import MAX_UIDS_PER_SET, MirrordIMAP4Client, parse_uid_ranges, parse_uid_set

MiB = 1024 * 1024


def peak_of(action: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def connected() -> tuple[MirrordIMAP4Client, StringTransport]:
    client = MirrordIMAP4Client(label="test", clock=task.Clock())
    transport = StringTransport()
    client.makeConnection(transport)
    client.dataReceived(b"* OK [CAPABILITY IMAP4rev1 ESEARCH] ready\r\n")
    return client, transport


HOSTILE_SET = b"1:9999999,20000000:29999999"  # 27 bytes, 20 million UIDs


def test_uid_set_is_counted_before_it_is_expanded() -> None:
    def parse() -> None:
        with pytest.raises(ProtocolError, match="more than"):
            parse_uid_set(HOSTILE_SET)

    assert peak_of(parse) < 1 * MiB
    assert parse_uid_ranges(b"5:3,7") == [(3, 5), (7, 7)]
    assert parse_uid_set(b"1:%d" % MAX_UIDS_PER_SET) == set(range(1, MAX_UIDS_PER_SET + 1))


def test_hostile_vanished_costs_nothing_on_a_plain_connection() -> None:
    # The watcher parses VANISHED with parse_uid_set (bounded above); a
    # worker's connection passes it on unexpanded.
    client, _ = connected()

    def feed() -> None:
        client.dataReceived(b"* VANISHED " + HOSTILE_SET + b"\r\n")

    assert peak_of(feed) < 2 * MiB


def test_hostile_esearch_drops_the_connection_cheaply() -> None:
    client, transport = connected()
    d = defer.Deferred.fromCoroutine(client.uid_search_all())
    tag = transport.value().split(b" ", 1)[0]

    def feed() -> None:
        client.dataReceived(b"* ESEARCH (TAG \"" + tag + b"\") UID ALL " + HOSTILE_SET + b"\r\n")

    assert peak_of(feed) < 2 * MiB
    assert transport.disconnecting
    d.addErrback(lambda f: None)


def test_deep_nesting_is_refused_before_it_costs() -> None:
    responses: list[Any] = []
    reader = ResponseReader(responses.append)
    line = b"* 1 FETCH " + b"(" * 1_000_000 + b"\r\n"

    def feed() -> None:
        with pytest.raises(ProtocolError, match="nested deeper"):
            reader.feed(line)

    # 1 MB of input; a list per '(' used to cost ~90 MB here.
    assert peak_of(feed) < 4 * MiB
    ok = ResponseReader(responses.append)
    ok.feed(b"* 1 FETCH " + b"(" * MAX_DEPTH + b")" * MAX_DEPTH + b"\r\n")
    assert responses


def literal_flood(count: int, size: int) -> Iterator[bytes]:
    yield b"* 1 FETCH (BODY[HEADER] "
    for _ in range(count):
        yield b"{%d}\r\n" % size
        for _ in range(size // 65536):
            yield b"x" * 65536
        yield b" X "
    yield b")\r\n"


def test_in_memory_literals_per_response_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Scaled down: 512 KiB literals against a 1 MiB per-response budget.
    monkeypatch.setattr(_parser, "MAX_MEMORY_LITERALS_PER_RESPONSE", 1 * MiB)
    reader = ResponseReader(lambda r: None, max_memory_literal=512 * 1024)

    def feed() -> None:
        with pytest.raises(ProtocolError, match="bytes of literals"):
            for chunk in literal_flood(40, 512 * 1024):
                reader.feed(chunk)

    # 40 x 512 KiB = 20 MiB would be held without the bound.
    assert peak_of(feed) < 3 * MiB
