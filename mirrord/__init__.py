"""mirrord: keep a local Maildir an exact, up-to-date copy of IMAP mailboxes."""

__version__ = "0.1.0"
