"""Byte-level formatting of the client's write commands (issue #12), on StringTransport."""

from __future__ import annotations

import pytest

from mirrord.protocol.client import copyuid_map, flag_list
from mirrord.protocol.errors import MissingCapability
from tests.unit.test_protocol_client import connected, result_of, run, sent


def test_store_is_silent_conditional_and_returns_modified() -> None:
    client, transport, _ = connected(b"* OK [CAPABILITY IMAP4rev1 CONDSTORE UIDPLUS] hi\r\n")
    sent(transport)
    d = run(client.uid_store([3, 4, 5, 9], add=["\\Seen"], unchanged_since=77))
    assert sent(transport) == b"M1 UID STORE 3:5,9 (UNCHANGEDSINCE 77) +FLAGS.SILENT (\\Seen)\r\n"
    client.dataReceived(b"M1 OK [MODIFIED 4,9] Conditional STORE failed\r\n")
    assert result_of(d) == {4, 9}


def test_store_without_condstore_is_unconditional() -> None:
    client, transport, _ = connected()
    sent(transport)
    d = run(client.uid_store([1], remove=["\\Flagged"], unchanged_since=5))
    assert sent(transport) == b"M1 UID STORE 1 -FLAGS.SILENT (\\Flagged)\r\n"
    client.dataReceived(b"M1 OK done\r\n")
    assert result_of(d) == set()


@pytest.mark.parametrize("bad", ["a b", "x)", "(x", "\\Seen\r\nM9 LOGOUT", '"q"', "\\Recent", "", "{3}", "a]"])
def test_flags_that_could_inject_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        flag_list([bad])


def test_expunge_needs_uidplus_and_never_sends_a_plain_expunge() -> None:
    client, transport, _ = connected()
    sent(transport)
    with pytest.raises(MissingCapability):
        result_of(run(client.uid_expunge([1])))
    assert sent(transport) == b""


def test_append_synchronizing_literal_with_crlf_in_one_write() -> None:
    client, transport, _ = connected()
    sent(transport)
    d = run(client.append(b"INBOX", b"Subject: x\n\nhi\n", ["\\Seen"]))
    assert sent(transport) == b"M1 APPEND \"INBOX\" (\\Seen) {18}\r\n"
    client.dataReceived(b"+ go\r\n")
    assert transport.value() == b"Subject: x\r\n\r\nhi\r\n\r\n"
    transport.clear()
    client.dataReceived(b"M1 OK [APPENDUID 38505 3955] done\r\n")
    assert result_of(d) == (38505, 3955)


def test_append_non_synchronizing_only_with_literal_plus() -> None:
    client, transport, _ = connected(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] hi\r\n")
    sent(transport)
    d = run(client.append(b"INBOX", b"a\n"))
    assert sent(transport) == b"M1 APPEND \"INBOX\" {3+}\r\na\r\n\r\n"
    client.dataReceived(b"M1 OK done\r\n")
    assert result_of(d) is None


def test_move_returns_the_copyuid_mapping_of_the_untagged_ok() -> None:
    client, transport, _ = connected(b"* OK [CAPABILITY IMAP4rev1 MOVE UIDPLUS] hi\r\n")
    sent(transport)
    d = run(client.uid_move([3, 4], b"Archive"))
    assert sent(transport) == b"M1 UID MOVE 3:4 \"Archive\"\r\n"
    client.dataReceived(b"* OK [COPYUID 7 3:4 20:21] moved\r\n* 1 EXPUNGE\r\n* 1 EXPUNGE\r\nM1 OK done\r\n")
    assert result_of(d) == {3: 20, 4: 21}


def test_copyuid_pairs_in_order() -> None:
    assert copyuid_map([b"COPYUID", b"1", b"3:5,9", b"20:23"]) == {3: 20, 4: 21, 5: 22, 9: 23}
    assert copyuid_map(None) is None


def test_remove_after_add_is_conditional_on_the_modseq_the_add_gave() -> None:
    """+FLAGS and -FLAGS are two STOREs: the second must not refuse what the first changed."""
    client, transport, _ = connected(b"* OK [CAPABILITY IMAP4rev1 CONDSTORE] hi\r\n")
    sent(transport)
    d = run(client.uid_store([1, 2], add=["\\Seen"], remove=["\\Flagged"], unchanged_since=5))
    assert sent(transport) == b"M1 UID STORE 1:2 (UNCHANGEDSINCE 5) +FLAGS.SILENT (\\Seen)\r\n"
    client.dataReceived(b"* 1 FETCH (UID 1 MODSEQ (9))\r\nM1 OK done\r\n")
    assert sent(transport) == b"M2 UID STORE 2 (UNCHANGEDSINCE 5) -FLAGS.SILENT (\\Flagged)\r\n"
    client.dataReceived(b"M2 OK done\r\n")
    assert sent(transport) == b"M3 UID STORE 1 (UNCHANGEDSINCE 9) -FLAGS.SILENT (\\Flagged)\r\n"
    client.dataReceived(b"M3 OK done\r\n")
    assert result_of(d) == set()
