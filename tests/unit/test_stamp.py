"""The Maildir-stamp check: every row's file in place, strictly by name, from a stream of rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mirrord.sync.stamp import files_in_place


def _maildir(tmp_path: Path, new: list[str], cur: list[str]) -> Path:
    for sub, names in (("new", new), ("cur", cur), ("tmp", [])):
        (tmp_path / sub).mkdir()
        for name in names:
            (tmp_path / sub / name).write_bytes(b"x")
    return tmp_path


def _once(rows: list[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """The rows as a cursor gives them: one pass, no len()."""
    yield from rows


def test_exact_in_place_and_not(tmp_path: Path) -> None:
    box = _maildir(tmp_path, new=["k1", "k3:2,F"], cur=["k2:2,S", "k4:2,"])
    rows = [("k1", ""), ("k2", "\\Seen"), ("k3", "\\Flagged"), ("k4", "")]
    assert files_in_place(box, _once(rows)) == 2
    (box / "cur" / "reader-saved:2,S").write_bytes(b"y")
    assert files_in_place(box, _once(rows)) == 1  # in place, but not only ours
    assert files_in_place(box, _once([*rows, ("gone", "")])) == 0
    assert files_in_place(box, _once([("k2", "\\Seen \\Answered")])) == 0  # other letters on the name


def test_two_rows_naming_one_file_are_both_in_place(tmp_path: Path) -> None:
    box = _maildir(tmp_path, new=[], cur=["k1:2,S"])
    assert files_in_place(box, _once([("k1", "\\Seen"), ("k1", "\\Seen")])) == 2


def test_no_maildir_is_not_in_place(tmp_path: Path) -> None:
    assert files_in_place(tmp_path / "missing", _once([])) == 0
