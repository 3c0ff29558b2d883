"""Mail that looks like mail, to put on the test server."""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import email.utils
import hashlib
import itertools
import random
from collections.abc import Callable, Iterable, Mapping
from email.header import Header
from typing import NamedTuple

from mirrord.testing.imapclient import ImapClient

# --------------------------------------------------------------------------
# Mail to put in it

_WORDS = (
    "mirror mailbox server folder message sync daemon local copy update change flag "
    "state connection arrival delivery archive project meeting report draft review "
    "please thanks question answer tomorrow morning afternoon schedule invoice "
    "attached version release notes plan budget team weekly monthly reply forward "
    "the a of to and in for on with is that it as at by this from be are was we you"
).split()
_WORDS_UTF8 = "Grüße Straße Ærøskøbing naïve café Zürich Smørrebrød Привет 東京 Ελλάδα façade São jalapeño".split()
_PEOPLE = (
    ("Alice Example", "alice@example.org"),
    ("Bjørn Ødegård", "bjorn@example.net"),
    ("Chloé Durand", "chloe@example.fr"),
    ("Dmitri Петров", "dmitri@example.ru"),
    ("Eve Mallory", "eve@example.com"),
    ("Fumiko 山田", "fumiko@example.jp"),
    ("Günter Schütz", "guenter@example.de"),
)
_RECIPIENT = ("Mirror Test", "mirror@example.test")
_EPOCH = _dt.datetime(2024, 1, 2, 9, 0, tzinfo=_dt.timezone.utc)


def _header(name: str, value: str) -> bytes:
    """One header field, RFC 2047-encoded and folded when it is not plain ASCII."""
    if value.isascii():
        return f"{name}: {value}\r\n".encode("ascii")
    encoded = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {encoded}\r\n".encode("ascii")


def _add_paragraphs(rng: random.Random, lines: list[str], size: int) -> None:
    """Append paragraphs of about ``size`` bytes of text wrapped at 72 columns.

    Built word by word rather than with textwrap: bulk fills make thousands
    of messages, and textwrap made generating them slower than Dovecot
    storing them.
    """
    added = 0
    while added < size:
        # Words average about six characters with their space: cut the last
        # paragraph short rather than overshoot.
        count = min(rng.randint(20, 90), max(3, (size - added) // 6))
        words = rng.choices(_WORDS, k=count)
        for _ in range(len(words) // 12):
            words[rng.randrange(len(words))] = rng.choice(_WORDS_UTF8)
        words[0] = words[0].capitalize()
        words[-1] += "."
        line = words[0]
        for word in words[1:]:
            if len(line) + 1 + len(word) > 72:
                lines.append(line)
                added += len(line) + 1
                line = word
            else:
                line += " " + word
        lines += [line, ""]
        added += len(line) + 2


def _quoted_printable(text: str) -> bytes:
    encoded = binascii.b2a_qp(text.encode("utf-8"), istext=True)
    return encoded.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def make_message(
    i: int,
    *,
    size: int = 2000,
    rng: random.Random | None = None,
    subject: str | None = None,
    attachment_bytes: int = 0,
) -> bytes:
    """A realistic RFC 5322 message with CRLF line ends, the same every time for the same ``i`` and ``rng``.

    multipart/mixed with a quoted-printable UTF-8 text part, the whole
    message about ``size`` bytes, plus (when ``attachment_bytes`` > 0) a
    base64 attachment whose decoded content is exactly that many bytes (so
    the message grows by about 4/3 of it). Non-ASCII where real mail has it:
    display names and subjects as RFC 2047 encoded words, accented and
    non-Latin words in the body. Message-ID and Date follow from ``i`` alone,
    so distinct ``i`` give distinct messages; ``rng`` (by default seeded with
    ``i``) picks everything else.
    """
    rng = rng if rng is not None else random.Random(i)
    sender = _PEOPLE[rng.randrange(len(_PEOPLE))]
    if subject is None:
        topic = " ".join(rng.choice(_WORDS_UTF8 if rng.random() < 0.3 else _WORDS) for _ in range(rng.randint(2, 6)))
        subject = f"Message {i}: {topic}"
    digest = hashlib.sha256(f"mirrord-test-message-{i}".encode()).hexdigest()
    boundary = f"=_mirrord_{i}_{digest[:16]}"
    date = _EPOCH + _dt.timedelta(minutes=17 * i)

    head = b"".join(
        [
            _header("From", email.utils.formataddr(sender, charset="utf-8")),
            _header("To", email.utils.formataddr(_RECIPIENT, charset="utf-8")),
            _header("Subject", subject),
            _header("Date", email.utils.format_datetime(date)),
            _header("Message-ID", f"<{i}.{digest[:20]}@mirrord.test>"),
            _header("X-Mirrord-Test-Index", str(i)),
            b"MIME-Version: 1.0\r\n",
            f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'.encode("ascii"),
            b"\r\n",
            b"This is a multi-part message in MIME format.\r\n",
            f"\r\n--{boundary}\r\n".encode("ascii"),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n",
        ]
    )
    closing = f"\r\n--{boundary}--\r\n".encode("ascii")
    want = max(size - len(head) - len(closing), 40)
    lines: list[str] = []
    qp = b""
    while len(qp) < want:
        # Quoted-printable grows this text by a sixth or so: top up by less
        # than the shortfall and converge from below in a few steps.
        _add_paragraphs(rng, lines, max((want - len(qp)) * 4 // 5, 1))
        qp = _quoted_printable("\n".join(lines))
    parts = [head, qp]
    if attachment_bytes > 0:
        payload = base64.b64encode(rng.randbytes(attachment_bytes))
        parts += [
            f"\r\n--{boundary}\r\n".encode("ascii"),
            f'Content-Type: application/octet-stream; name="attachment-{i}.bin"\r\n'.encode("ascii"),
            f'Content-Disposition: attachment; filename="attachment-{i}.bin"\r\n'.encode("ascii"),
            b"Content-Transfer-Encoding: base64\r\n\r\n",
            b"\r\n".join(payload[k : k + 76] for k in range(0, len(payload), 76)),
            b"\r\n",
        ]
    parts.append(closing)
    return b"".join(parts)


class SampleMessage(NamedTuple):
    message: bytes
    flags: frozenset[str]


def sample_mailboxes(rng: random.Random | None = None) -> dict[str, list[SampleMessage]]:
    """A few dozen realistic messages in a few mailboxes, for ``mirrord demo`` and smoke tests.

    An INBOX with some mail read, flagged and answered and a few
    attachments; a read archive one level down (``Archive/2024``); drafts in
    a mailbox whose name needs modified UTF-7 (``Entwürfe``).
    """
    rng = rng if rng is not None else random.Random(2024)
    serial = itertools.count(1)

    def batch(count: int, choose_flags: Callable[[], set[str]], attachment_share: float) -> list[SampleMessage]:
        out = []
        for _ in range(count):
            i = next(serial)
            attachment = rng.randint(8_000, 120_000) if rng.random() < attachment_share else 0
            message = make_message(
                i, size=rng.randint(600, 6000), rng=random.Random(rng.getrandbits(64)), attachment_bytes=attachment
            )
            out.append(SampleMessage(message, frozenset(choose_flags())))
        return out

    def inbox_flags() -> set[str]:
        flags = set()
        if rng.random() < 0.6:
            flags.add("\\Seen")
        if rng.random() < 0.15:
            flags.add("\\Flagged")
        if "\\Seen" in flags and rng.random() < 0.2:
            flags.add("\\Answered")
        if rng.random() < 0.05:
            flags.add("$Forwarded")
        return flags

    def archive_flags() -> set[str]:
        return {"\\Seen", "\\Answered"} if rng.random() < 0.3 else {"\\Seen"}

    return {
        "INBOX": batch(20, inbox_flags, 0.15),
        "Archive/2024": batch(14, archive_flags, 0.2),
        "Entwürfe": batch(4, lambda: {"\\Draft", "\\Seen"}, 0.0),
    }


def populate(client: ImapClient, samples: Mapping[str, Iterable[SampleMessage]]) -> dict[str, list[int]]:
    """APPEND ``samples`` (as from :func:`sample_mailboxes`); return the new UIDs per mailbox."""
    uids: dict[str, list[int]] = {}
    for mailbox, messages in samples.items():
        if mailbox.upper() != "INBOX":
            client.create(mailbox)
        uids[mailbox] = [client.append(mailbox, m.message, m.flags) for m in messages]
    return uids
