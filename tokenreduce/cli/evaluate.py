"""`tokenreduce eval`: top-1/top-5 of dense and reduced models on an ImageFolder, in one run."""

from __future__ import annotations

import argparse

import torch

from tokenreduce import distributed
from tokenreduce.cli import shared
from tokenreduce.evaluate import EvalResult, evaluate
from tokenreduce.options import parse_method

__all__ = ["COLUMNS", "add_parser", "run"]


COLUMNS = "method options top1 top5 top1_drop agreement gmacs_mean gmacs_min gmacs_max gmacs_ratio"
"""The table's columns on stdout (the results file has every field)."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval",
        help="top-1/top-5 of dense and reduced models on an ImageFolder, in one run",
        description="Dense and reduced models on the same images: top-1/top-5, their "
        "difference, prediction agreement, per-image GMACs.",
    )
    parser.add_argument("data", help="ImageFolder root: DATA/<class>/<image>")
    shared.add_model_args(parser, shared.DEMO_MODEL)
    shared.add_data_args(parser)
    parser.add_argument(
        "--method",
        action="append",
        default=None,
        help="NAME[:opt=value,...], repeatable; default: tome:r=13",
    )
    shared.add_matching_args(parser, "dense GMACs", "the first --calib-images images")
    shared.add_amp_args(parser)
    shared.add_results_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> EvalResult:
    shared.check_matching(args)
    shared.check_needs(args, [("amp_dtype", "amp")])
    shared.check_results_file(args)
    specs = [parse_method(spec) for spec in (args.method or ["tome:r=13"])]
    context = distributed.setup()
    model = shared.load_model(args)
    dataset = shared.image_folder(args, model, args.data)
    shared.add_zero_shot(args, model, dataset.classes)
    configs = shared.method_configs(args, specs, model, dataset, args.method or ["tome:r=13"])
    shared.logger.info(
        "eval: %s (%s), %d threads, %d process(es)",
        args.model,
        shared.weights_label(args),
        torch.get_num_threads(),
        context.world,
    )
    result = evaluate(
        model,
        configs,
        dataset,
        args.model,
        args.batch_size,
        args.workers,
        amp=args.amp,
        amp_dtype=shared.amp_dtype(args),
        progress=not args.no_progress,
    )
    distributed.teardown(context)
    if not context.is_main:
        return result
    print(
        f"\ndense: top-1 {result.dense_top1:.2f}%, top-5 {result.dense_top5:.2f}%, "
        f"{result.dense_gmacs:.3f} GMACs, {result.num_images} images"
        + (f", {len(result.unreadable)} unreadable (skipped)" if result.unreadable else "")
    )
    shared.print_results(result.rows(), COLUMNS, args.results_file, args.results_format)
    return result
