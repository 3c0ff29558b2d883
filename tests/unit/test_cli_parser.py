"""The command line parser built for the subcommand named: the same answers as the full one."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirrord.cli import build_parser, named_command


@pytest.mark.parametrize(
    "argv, named",
    [
        (["run", "--once"], "run"),
        (["-c", "x.yaml", "run", "--once"], "run"),
        (["--config", "run", "-v", "status", "--json"], "status"),
        (["-cfile", "check"], "check"),
        (["--config=f", "-v", "--verbose", "init"], "init"),
        (["--conf", "run", "check"], None),  # an abbreviation: left to argparse
        (["-vc", "run", "status"], None),
        (["--help"], None),
        ([], None),
        (["-c"], None),
        (["nonsense"], None),
    ],
)
def test_the_subcommand_is_found_where_argparse_finds_it(argv: list[str], named: str | None) -> None:
    assert named_command(argv) == named


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--once"],
        ["-c", "x.yaml", "run", "--once", "-v", "acct/INBOX", "--allow-delete", "acct/INBOX"],
        ["-v", "status", "--json", "-c", "y.yaml"],
        ["check"],
        ["install-service", "--force"],
        ["demo", "--live", "0", "--dir", "/tmp/d"],
    ],
)
def test_parsing_with_only_the_named_subcommand_built_gives_the_same_arguments(argv: list[str]) -> None:
    assert vars(build_parser(named_command(argv)).parse_args(argv)) == vars(build_parser().parse_args(argv))


def test_help_of_the_named_subcommand_is_complete(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser("run").parse_args(["run", "--help"])
    short = capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    assert short == capsys.readouterr().out
    assert "--allow-delete" in short and "examples:" in short


def test_config_path_type_is_kept() -> None:
    args = build_parser("run").parse_args(["-c", "a.yaml", "run", "--once"])
    assert args.config == Path("a.yaml")
