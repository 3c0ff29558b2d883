"""Test support: a throwaway Dovecot on loopback, and realistic mail to put in it.

mirrord is only as good as its agreement with a real server, so its tests,
its benchmarks and ``mirrord demo`` all talk to a real Dovecot rather than to a
fake. :class:`PrivateDovecot` starts one under a directory of its own, on free
loopback ports, with a throwaway CA so that TLS can be verified the way
mirrord verifies it in production. :class:`ImapClient` plays *another* mail
client on that server (the one that delivers, flags and expunges while mirrord
watches), and :func:`make_message` / :func:`sample_mailboxes` produce mail that
looks like mail.

Nothing here is needed at run time; it lives in the package (like
``treq.testing``) so that the tests of code built on mirrord can use it too.
"""


from mirrord.testing._errors import DovecotError, DovecotMissing, ImapCommandError
from mirrord.testing.dovecot import (
    DOVEADM,
    DOVECOT,
    ROOT_MAIL_USER,
    ImapAccount,
    PrivateDovecot,
)
from mirrord.testing.imapclient import ImapClient, decode_mailbox, encode_mailbox
from mirrord.testing.messages import (
    SampleMessage,
    make_message,
    populate,
    sample_mailboxes,
)

__all__ = [
    "DOVECOT",
    "DOVEADM",
    "DovecotError",
    "DovecotMissing",
    "ImapAccount",
    "ImapClient",
    "ImapCommandError",
    "PrivateDovecot",
    "ROOT_MAIL_USER",
    "SampleMessage",
    "decode_mailbox",
    "encode_mailbox",
    "make_message",
    "populate",
    "sample_mailboxes",
]
