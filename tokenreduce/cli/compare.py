"""`tokenreduce compare`: sweep methods and strengths — accuracy, GMACs, measured speedup, plots."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import tokenreduce
from tokenreduce import report
from tokenreduce.cli import shared
from tokenreduce.compare import CompareRow, compare, plot_tradeoffs, sweep_configs
from tokenreduce.methods.base import make_config
from tokenreduce.options import parse_method

__all__ = ["COLUMNS", "add_parser", "run"]


COLUMNS = (
    "method options gmacs ideal_speedup measured_speedup dense_spread noisy "
    "top1 top1_drop agreement"
)
"""The table's columns on stdout (the results file has every field)."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare",
        help="sweep methods and strengths: accuracy, GMACs, measured speedup, plots",
        description="Each method's registered sweep grid (plus any --config): mean GMACs, "
        "measured speedup over dense, and accuracy when --data is given; writes CSV/JSON and "
        "PNG plots (accuracy vs GMACs with the Pareto front, speedup vs GMACs with the ideal).",
    )
    shared.add_model_args(parser, shared.DEMO_MODEL)
    parser.add_argument("--data", default=None, help="ImageFolder root for accuracy (optional)")
    shared.add_data_args(parser)
    parser.add_argument(
        "--method", action="append", default=None, help="sweep only these methods (repeatable)"
    )
    parser.add_argument(
        "--config", action="append", default=[], help="extra NAME:opt=value,... rows"
    )
    parser.add_argument("--bench-batch-size", type=int, default=8, help="batch for the timing")
    shared.add_timing_args(parser, warm=2, bench=10)
    parser.add_argument(
        "--out-dir", default="tokenreduce-compare", help="where the results and plots go"
    )
    shared.add_results_format(parser, "csv")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> list[CompareRow]:
    shared.check_timing(args)
    shared.check_at_least(args, {"bench_batch_size": 1})
    data_only = ("crop_pct", "interpolation", "mean", "std", "num_samples", "class_map")
    shared.check_needs(args, [(option, "data") for option in data_only])
    report.check_output_dir("--out-dir", args.out_dir)
    configs = sweep_configs(args.method) + [
        make_config(name, **options) for name, options in map(parse_method, args.config)
    ]
    model = shared.load_model(args)
    dataset = shared.image_folder(args, model, args.data) if args.data else None
    if dataset is not None:
        picks = [i % len(dataset) for i in range(args.bench_batch_size)]
        timing = shared.readable_images(dataset, picks, "the timing batch")
    else:
        size = tokenreduce.describe(model).input_size
        timing = torch.randn(args.bench_batch_size, 3, *size)
    shared.logger.info(
        "compare: %s (%s), %d configurations, %d threads",
        args.model,
        shared.weights_label(args),
        len(configs),
        torch.get_num_threads(),
    )
    rows, evaluation = compare(
        model,
        configs,
        timing,
        dataset,
        args.model,
        args.batch_size,
        args.workers,
        args.num_warm_iter,
        args.num_bench_iter,
        progress=not args.no_progress,
    )
    out = Path(args.out_dir)
    results = out / f"compare_results.{args.results_format}"
    print()
    shared.print_results([r.as_dict() for r in rows], COLUMNS, results, args.results_format)
    dense_top1 = evaluation.dense_top1 if evaluation else None
    title = f"{args.model}" + (
        f", {evaluation.num_images} images, dense top-1 {dense_top1:.1f}%" if evaluation else ""
    )
    plots = plot_tradeoffs(rows, tokenreduce.flops.dense_gmacs(model), out, title, dense_top1)
    print(f"plots: {', '.join(str(p) for p in plots)}")
    return rows
