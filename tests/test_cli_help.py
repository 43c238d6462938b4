"""The top-level ``polyak`` command: one version, examples in every subcommand's --help, and each example
is a valid command line."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest

import polyak
from polyak.cli import EXAMPLES, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def subcommands() -> dict[str, object]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)  # type: ignore[arg-type]


def test_version_has_one_source(capsys: pytest.CaptureFixture[str]) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert not re.search(r"(?m)^version\s*=\s*\"", pyproject), "the version is written once, in polyak.__version__"
    assert re.search(r'(?m)^dynamic\s*=\s*\[[^]]*"version"', pyproject)
    assert 'version = { attr = "polyak.__version__" }' in pyproject
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.split() == ["polyak", polyak.__version__]
    assert importlib.metadata.version("polyak") == polyak.__version__


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_subcommand_help_ends_with_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert EXAMPLES.get(command), f"add examples for `polyak {command}` to polyak.cli.EXAMPLES"
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    tail = out[out.index("examples:") :]
    for line in EXAMPLES[command]:
        assert f"  {line}" in tail  # kept on its own line, not re-wrapped


@pytest.mark.parametrize(("command", "line"), [(c, line) for c, lines in EXAMPLES.items() for line in lines])
def test_every_example_parses(command: str, line: str) -> None:
    if command not in subcommands():
        pytest.skip(f"`polyak {command}` is not in this build")
    argv = shlex.split(re.sub(r"\s#.*$", "", line))
    if ">" in argv:
        argv = argv[: argv.index(">")]
    assert argv[:2] == ["polyak", command]
    args = build_parser().parse_args(argv[1:])  # exits (SystemExit 2) on a wrong option
    assert args.command == command


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in subcommands():
        assert command in out
