"""`tokenreduce viz`: token maps after each reducing block, one PNG grid per method."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

import tokenreduce
from tokenreduce import data, report, viz
from tokenreduce.cli import shared
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.base import make_config
from tokenreduce.options import describe_options, parse_method, unique_labels


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "viz",
        help="token maps after each reducing block, one PNG grid per method",
        description="Merged groups in their mean colour with borders, pruned patches grey.",
    )
    shared.add_model_args(parser, shared.DEMO_MODEL)
    parser.add_argument(
        "--method", action="append", required=True, help="NAME[:opt=value,...], repeatable"
    )
    parser.add_argument("--image", nargs="+", required=True, help="image file(s), one row each")
    parser.add_argument(
        "--out", required=True, help="PNG path; with several methods, _<method> is appended"
    )
    parser.add_argument("--max-columns", type=int, default=6, help="reducing blocks shown at most")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> list[Path]:
    shared.check_at_least(args, {"max_columns": 1})
    specs = [parse_method(spec) for spec in args.method]
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise InvalidOptionError(f"--out={args.out} is not accepted; accepted: a .png path")
    report.check_output_file("--out", out)
    model = shared.load_model(args)
    images, display = data.load_images([Path(p) for p in args.image], model)
    written = []
    labels = unique_labels([name for name, _ in specs])
    for k, (name, options) in enumerate(specs):
        config = make_config(name, **{**options, "trace_source": True})
        reduced = tokenreduce.apply(copy.deepcopy(model), config)
        with torch.inference_mode():
            reduced(images)
        info = tokenreduce.last_info(reduced)
        path = out if len(specs) == 1 else out.with_name(f"{out.stem}_{labels[k]}{out.suffix}")
        cost = tokenreduce.flops.gmacs(reduced, info)
        written.append(
            viz.draw_token_maps(
                display,
                info,
                tokenreduce.flops.model_dims(model).grid_size,
                path,
                title=f"{args.model}, {name} {describe_options(config)}: {cost.mean:.2f} GMACs",
                row_labels=[Path(p).name for p in args.image],
                max_columns=args.max_columns,
            )
        )
        print(f"{name}: token maps written to {path}")
    return written
