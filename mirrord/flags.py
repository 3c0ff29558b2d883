"""IMAP flags and their Maildir spelling, shared by the sync engine and the store.

A Maildir file name carries message flags after ``:2,`` as single letters in
ASCII order. Only the five IMAP system flags below have a letter; keywords
(``$Forwarded``, ``Junk``, ...) have none and live only in the state DB.
``\\Recent`` is not a message flag at all (see :func:`message_flags`). Comparing the *representable* part of two flag sets is how the engine
decides whether a local file name must change.
"""

from __future__ import annotations

from functools import lru_cache

Flags = frozenset[str]
"""A message's IMAP flags, spelled as the server sends them (``\\Seen``, ``$Junk``)."""

# IMAP system flag -> Maildir info letter (the Maildir spec's letters).
_LETTER_FOR_FLAG = {
    "\\draft": "D",
    "\\flagged": "F",
    "\\answered": "R",
    "\\seen": "S",
    "\\deleted": "T",
}
_FLAG_FOR_LETTER = {
    "D": "\\Draft",
    "F": "\\Flagged",
    "R": "\\Answered",
    "S": "\\Seen",
    "T": "\\Deleted",
}


def maildir_info(flags: Flags) -> str:
    """The info letters for ``flags``, sorted as the Maildir spec requires (e.g. ``"FS"``)."""
    return "".join(
        sorted({_LETTER_FOR_FLAG[f.lower()] for f in flags if f.lower() in _LETTER_FOR_FLAG})
    )


@lru_cache(maxsize=256)
def flags_from_info(info: str) -> Flags:
    """The IMAP system flags that ``info`` letters stand for; unknown letters are ignored.

    Cached: a scan of a Maildir asks this for every file, and a mailbox has
    a handful of distinct info strings. Sharing one frozenset per string
    keeps a 100,000-message scan ~20 MB smaller (the set is immutable, so
    sharing it is safe; the cache is bounded against odd file names).
    """
    return frozenset(_FLAG_FOR_LETTER[c] for c in info if c in _FLAG_FOR_LETTER)


def representable(flags: Flags) -> Flags:
    """The part of ``flags`` that a Maildir file name can carry, in canonical spelling."""
    return flags_from_info(maildir_info(flags))


def is_seen(flags: Flags) -> bool:
    return any(f.lower() == "\\seen" for f in flags)


_SESSION_FLAGS = frozenset({"\\recent"})


def message_flags(flags: Flags) -> Flags:
    """The flags that belong to the message: ``flags`` without ``\\Recent``.

    ``\\Recent`` (RFC 3501) says which *session* was first to see a message;
    the next session sees it unset. Kept as a message flag it would turn a
    restart into a flag change of every new message. Every flag list a
    server sends about a message passes through here on its way in.
    """
    if not any(f.lower() in _SESSION_FLAGS for f in flags):
        return flags  # the common case: the very same (cached, shared) set
    return frozenset(f for f in flags if f.lower() not in _SESSION_FLAGS)
