"""Every command's --help runs, and every flag of every command has help that shows its default."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from kvtier.cli import SAYS_DEFAULT, build_parser


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("kvtier",)):
    """(command words, parser) for the top level and every subcommand, recursively."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(build_parser()))
IDS = [" ".join(path) for path, _ in COMMANDS]


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def _rendered_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text as --help prints it (defaults filled in), unwrapped."""
    return parser._get_formatter()._expand_help(action) if action.help else ""


def test_the_walk_reaches_every_command():
    assert {"kvtier generate", "kvtier chat", "kvtier serve", "kvtier bench throughput",
            "kvtier bench multiturn", "kvtier bench serve"} <= set(IDS)


@pytest.mark.parametrize("path, parser", COMMANDS, ids=IDS)
def test_every_flag_has_help_that_shows_its_default(path, parser):
    args = _arguments(parser)
    missing = [a.option_strings[0] if a.option_strings else a.metavar for a in args
               if not _rendered_help(parser, a).strip()]
    assert not missing, f"{' '.join(path)}: no help for {missing}"
    # A flag whose default is a value shows it; one whose default is None says what unset means
    # in its own words where that is not obvious ("default: the model's").
    no_default = [a.option_strings[0] for a in args
                  if a.option_strings and a.default is not None and not SAYS_DEFAULT.search(_rendered_help(parser, a))]
    assert not no_default, f"{' '.join(path)}: help does not show the default of {no_default}"


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=IDS)
def test_help_exits_0(path, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*path[1:], "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {' '.join(path)}")


def test_generate_help_from_the_shell():
    out = subprocess.run([sys.executable, "-m", "kvtier.cli", "generate", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # unwrapped
    for shown in ("--max-tokens MAX_TOKENS most tokens to generate per output (default: 128)",
                  "(default: 1.0)", "--ignore-eos keep generating past EOS", "(default: off)"):
        assert shown in text
