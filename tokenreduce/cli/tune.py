"""`tokenreduce tune`: every method's weakest setting that meets a speed or cost target, sorted
by fidelity; `--out` writes the winner as a recipe."""

from __future__ import annotations

import argparse

import torch

from tokenreduce import data, recipe
from tokenreduce.cli import shared
from tokenreduce.errors import InvalidOptionError, UnreachableTargetError
from tokenreduce.options import parse_method
from tokenreduce.report import check_output_file
from tokenreduce.tuning import Target, TuneResult, tune

__all__ = ["COLUMNS", "add_parser", "run"]


COLUMNS = (
    "method options status gmacs_ratio ideal_speedup measured_speedup speedup_spread fidelity "
    "measurements reason"
)
"""The table's columns on stdout (the results file has every field)."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "tune",
        help="every method's weakest setting that meets a speed or cost target, by fidelity",
        description="For each method, the weakest strength whose measured speedup over the dense "
        "model (or GMACs ratio) meets the target, and its fidelity to the dense model on the "
        "images: top-1 with --head or --class-map, else pooled-feature cosine (--dense: every "
        "patch's feature).",
    )
    shared.add_model_args(parser, shared.DEMO_MODEL)
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--speedup", type=float, help="measured speedup over dense to reach (> 1)")
    goal.add_argument("--latency-ms", type=float, help="ms per batch to reach (measured dense)")
    goal.add_argument("--gmacs-ratio", type=float, help="fraction of the dense GMACs, in (0, 1)")
    parser.add_argument("-b", "--batch-size", type=int, default=1, help="batch size timed")
    parser.add_argument(
        "--data", required=True, help="calibration images: an ImageFolder (DATA/<class>/<image>)"
    )
    parser.add_argument(
        "--class-map", default=None, help="class names in label order (.txt or .json)"
    )
    parser.add_argument(
        "--num-images", type=int, default=256, help="evenly spaced images taken from --data"
    )
    parser.add_argument(
        "--calib-images", type=int, default=8, help="images the GMACs ratios are matched on"
    )
    parser.add_argument(
        "--dense",
        action="store_true",
        help="fidelity of the dense outputs: every patch's final feature against the dense "
        "model's (cosine), instead of top-1 / pooled features",
    )
    parser.add_argument(
        "--method",
        action="append",
        default=None,
        help="NAME[:opt=value,...], repeatable (learned methods: NAME:thresholds=FILE); "
        "default: every method",
    )
    parser.add_argument(
        "--max-measurements", type=int, default=4, help="timings per method in the search"
    )
    shared.add_timing_args(parser, warm=3, bench=10)
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N",
    )
    parser.add_argument("--out", default=None, help="write the winner as a recipe (.json)")
    shared.add_results_args(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> TuneResult:
    shared.check_at_least(
        args,
        {
            "num_images": 1,
            "calib_images": 1,
            "max_measurements": 1,
            "num_warm_iter": 0,
            "num_bench_iter": 2,
        },
    )
    kind = next(k for k in ("speedup", "latency_ms", "gmacs_ratio") if getattr(args, k) is not None)
    target = Target(kind, getattr(args, kind), args.batch_size)
    shared.check_device("--device", args.device)
    shared.check_results_file(args)
    check_output_file("--out", args.out)
    if args.out and not args.out.lower().endswith(".json"):
        raise InvalidOptionError(
            f"--out={args.out} is not accepted; accepted: a .json file (a recipe)"
        )
    specs = [parse_method(spec) for spec in args.method] if args.method else None
    model = shared.load_model(args).to(args.device).eval()
    transform, _ = data.eval_transform(model)
    # the folder's labels are the model's classes when a head or a class map says so
    labelled = bool(args.head or args.class_map) and not args.dense
    if labelled:
        classes = data.read_class_map(args.class_map) if args.class_map else None
        folder = data.ImageFolder(args.data, transform, args.num_images, classes)
    else:
        folder = data.ImageFiles(args.data, transform, args.num_images)
    images, labels = shared.readable_images_and_labels(folder, range(len(folder)), "tune")
    images = images.to(args.device)
    labels = labels.to(args.device) if labelled else None
    shared.logger.info(
        "tune: %s (%s) for %s=%s at batch %d, %s, %d threads; %d images",
        args.model,
        shared.weights_label(args),
        kind,
        target.value,
        args.batch_size,
        args.device,
        torch.get_num_threads(),
        len(images),
    )
    result = tune(
        model,
        images,
        target,
        specs,
        labels=labels,
        metric="patch_cosine" if args.dense else None,
        calib_images=args.calib_images,
        max_measurements=args.max_measurements,
        num_warm_iter=args.num_warm_iter,
        num_bench_iter=args.num_bench_iter,
        progress=not args.no_progress,
    )
    if result.dense_fidelity is not None:
        print(f"\ndense: top-1 {result.dense_fidelity:.2f}% on {len(images)} images")
    shared.print_results(
        [row.as_dict() for row in result.rows], COLUMNS, args.results_file, args.results_format
    )
    if result.winner is None:
        raise UnreachableTargetError(result.unreached_message())
    if args.out:
        recipe.write_recipe(args.out, result.recipe(model))
        print(f"recipe written to {args.out}: {result.winner[0].method} {result.winner[0].options}")
    return result
