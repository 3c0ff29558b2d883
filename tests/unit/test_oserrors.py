"""OS errors said as sentences that name the path and the fix (issue 16 item 6)."""

from __future__ import annotations

import errno
import os

from mirrord.oserrors import explain


def test_permission_denied_names_the_path_and_the_fix() -> None:
    error = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/home/me/Mail/INBOX/tmp/1.x")
    text = explain(error, "cannot write the mirror")
    assert text == ("cannot write the mirror: /home/me/Mail/INBOX/tmp/1.x: Permission denied; give your user "
                    "write access to it (chmod u+rwx on the folder) or choose a folder you own")
    assert "[Errno" not in text


def test_a_rename_names_both_paths() -> None:
    error = OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a/tmp/x", None, "/b/new/x")
    assert explain(error) == f"/a/tmp/x -> /b/new/x: {os.strerror(errno.EXDEV)}"


def test_a_full_disk_says_it_resumes() -> None:
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/m/INBOX/tmp/x")
    assert "No space left on device; the disk is full: free some space" in explain(error)
