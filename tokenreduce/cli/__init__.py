"""The `tokenreduce` command line: one module per command, shared options and steps in
`shared`.

Each command module has `add_parser(commands)`, which registers its sub-parser with
`run(args)` as the default `run`. A user error (`tokenreduce.errors.TokenReduceError`) becomes
one line on stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tokenreduce.cli import bench, compare, demo, eval_dense, evaluate, train, viz
from tokenreduce.errors import TokenReduceError

__all__ = ["COMMANDS", "build_parser", "main"]


COMMANDS = (demo, bench, evaluate, eval_dense, compare, train, viz)


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
