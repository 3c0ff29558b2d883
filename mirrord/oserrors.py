"""OS errors as sentences a person can act on, and the write probe of ``mirrord check``.

A raw ``[Errno 13] Permission denied: '/home/me/Mail/INBOX/tmp/...'`` names
neither what mirrord was doing nor what to do about it. :func:`explain`
turns an ``OSError`` into "PATH: what is wrong; what to do", and
:func:`probe_writable` lets ``check`` find out, before any sync, that a
folder cannot be written, which it used to answer "yes" to.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

_FIXES: dict[int, str] = {
    errno.EACCES: "give your user write access to it (chmod u+rwx on the folder) or choose a folder you own",
    errno.EPERM: "give your user write access to it (chmod u+rwx on the folder) or choose a folder you own",
    errno.EROFS: "it is on a read-only file system: remount it read-write or choose another folder",
    errno.ENOSPC: "the disk is full: free some space; mirroring resumes by itself once writing works",
    errno.EDQUOT: "your disk quota is used up: free some space; mirroring resumes by itself once writing works",
    errno.ENOTDIR: "a part of the path is a file, not a folder: move that file away or choose another folder",
    errno.EISDIR: "a folder stands where a file should be: move it away",
    errno.ENAMETOOLONG: "the name is too long for the file system: choose a shorter path",
    errno.EMFILE: "too many files are open: raise the limit (ulimit -n, or LimitNOFILE= in the unit)",
    errno.EIO: "the disk reported an I/O error: check it (dmesg) before going on",
}


def explain(error: OSError, doing: str = "") -> str:
    """One sentence: the path, what went wrong in plain words, and the fix if there is an obvious one.

    ``doing`` (``"cannot write the mirror"``) leads the sentence when given.
    The OS's own words stay in it, so that searching for them still works.
    """
    reason = error.strerror or str(error) or type(error).__name__
    path = error.filename
    if error.filename2:
        path = f"{error.filename} -> {error.filename2}"
    what = f"{path}: {reason}" if path else reason
    fix = _FIXES.get(error.errno or 0)
    text = f"{what}; {fix}" if fix else what
    return f"{doing}: {text}" if doing else text


def probe_writable(folder: Path) -> str | None:
    """Create, rename and remove a file where ``folder`` is (or will be); None if that all worked.

    mirrord writes each message to ``tmp/`` and renames it into ``new/`` or
    ``cur/``, and the state database does the same with its journal, so
    both are tried. A folder that does not exist yet is probed in its
    nearest existing parent, where mirrord will have to create it. Nothing
    is left behind. Returns the problem as a sentence (see :func:`explain`).
    """
    folder = Path(folder)
    where = folder
    while not where.exists() and where.parent != where:
        where = where.parent
    if not where.is_dir():
        return explain(OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(where)))
    token = secrets.token_hex(4)
    first = where / f".mirrord-check-{token}.tmp"
    second = where / f".mirrord-check-{token}"
    try:
        fd = os.open(first, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        return explain(e, f"cannot create a file in {where}")
    os.close(fd)
    try:
        os.rename(first, second)
    except OSError as e:
        _remove(first)
        return explain(e, f"cannot rename a file in {where}")
    _remove(second)
    return None


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
