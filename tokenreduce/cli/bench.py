"""`tokenreduce bench`: GMACs and measured speedup of methods over the dense model."""

from __future__ import annotations

import argparse

import torch

from tokenreduce import bench, data
from tokenreduce.cli import shared
from tokenreduce.errors import InvalidOptionError
from tokenreduce.exporting import check_exportable, check_onnx_packages
from tokenreduce.methods.base import MethodConfig, make_config
from tokenreduce.options import parse_method

__all__ = ["BACKENDS", "COLUMNS", "add_parser", "check_one_cuda_graph", "check_onnxruntime", "run"]


COLUMNS = (
    "method options batch_size gmacs ideal_speedup measured_speedup of_ideal best_speedup dense_ms "
    "method_ms dense_ms_min dense_ms_max method_ms_min method_ms_max noisy"
)
"""The table's columns on stdout (the results file has every field)."""

BACKENDS = ("torch", "onnxruntime")
"""What runs the timed models (--backend)."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench", help="GMACs and measured speedup of methods over the dense model"
    )
    shared.add_model_args(parser, "deit_small_patch16_224", random_by_default=True)
    parser.add_argument(
        "-b",
        "--batch-size",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes to time (default: 1 32; with --data 1 8 32, as images of one batch "
        "keep different token counts with per-image methods)",
    )
    parser.add_argument(
        "--method",
        action="append",
        default=None,
        help="NAME[:opt=value,...], repeatable; default: " + " ".join(bench.DEFAULT_METHODS),
    )
    shared.add_amp_args(parser)
    shared.add_timing_args(parser, warm=5, bench=20)
    parser.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N; default: cuda when this machine has a GPU, else cpu (always "
        "cpu with --backend onnxruntime)",
    )
    parser.add_argument(
        "--backend",
        default="torch",
        choices=BACKENDS,
        help="what runs the models: torch (eager, or --compile), or onnxruntime (dense and "
        "reduced models exported to ONNX, CPU execution provider, as many threads as torch)",
    )
    shared.add_results_args(parser)
    parser.add_argument(
        "--data",
        default=None,
        help="time on real images from this ImageFolder (DATA/<class>/<image>), split into "
        "batches that the iterations cycle through, instead of one random batch; needed for "
        "methods whose cost depends on the image (ltmp, asvit, ppt)",
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=None,
        help="evenly spaced images taken from --data (default with --data: 64)",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        choices=bench.COMPILE_BACKENDS,
        help="time torch.compile'd dense and reduced models, compiled before the timed rounds: "
        "inductor (the default; CUDA graphs on CUDA; minutes per model on a CPU) or cudagraphs "
        "(CUDA only: the eager kernels as one CUDA graph, compiled in seconds); per-image "
        "methods compile as one graph only with batching=masked (static shapes)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> list[bench.BenchResult]:
    shared.check_timing(args)
    shared.check_needs(args, [("num_images", "data")])
    onnxruntime = args.backend == "onnxruntime"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not onnxruntime else "cpu"
    shared.check_device("--device", args.device)
    shared.check_results_file(args)
    specs = args.method or bench.DEFAULT_METHODS
    methods = [parse_method(spec) for spec in specs]
    configs = [make_config(name, **options) for name, options in methods]
    shared.warn_untrained(configs, specs)
    if args.compile == "cudagraphs":
        check_one_cuda_graph(args.device, configs, specs)
    if onnxruntime:
        check_onnxruntime(args, configs, specs)
    model = shared.load_model(args)
    if args.batch_size is None:
        args.batch_size = [1, 8, 32] if args.data else [1, 32]
    images = None
    if args.data:
        args.num_images = 64 if args.num_images is None else args.num_images
        shared.check_at_least(args, {"num_images": 1})
        transform, _ = data.eval_transform(model)
        folder = data.ImageFolder(args.data, transform, args.num_images)
        images = shared.readable_images(folder, range(len(folder)), "the timing")
    shared.logger.info(
        "benchmark: %s (%s), %s, %d threads%s%s",
        args.model,
        shared.weights_label(args),
        args.device,
        torch.get_num_threads(),
        f", torch.compile ({args.compile})" if args.compile else "",
        ", ONNX Runtime (CPU execution provider)" if onnxruntime else "",
    )
    if onnxruntime:
        results = bench.bench_onnxruntime(
            model,
            args.model,
            methods,
            args.batch_size,
            num_warm_iter=args.num_warm_iter,
            num_bench_iter=args.num_bench_iter,
            images=images,
        )
    else:
        results = bench.bench_model(
            model,
            args.model,
            methods,
            args.batch_size,
            num_warm_iter=args.num_warm_iter,
            num_bench_iter=args.num_bench_iter,
            amp=args.amp,
            amp_dtype=shared.amp_dtype(args),
            device=args.device,
            images=images,
            torch_compile=args.compile,
        )
    shared.print_results(
        [r.as_dict() for r in results], COLUMNS, args.results_file, args.results_format
    )
    return results


def check_one_cuda_graph(device: str, configs: list[MethodConfig], specs: list[str]) -> None:
    """`--compile cudagraphs` captures each model as one CUDA graph: a CUDA device, and methods
    whose forward keeps static shapes."""
    if not device.startswith("cuda"):
        raise InvalidOptionError(f"--compile cudagraphs: needs --device cuda; got {device}")
    for config, spec in zip(configs, specs, strict=True):
        if config.per_image_counts and not config.requested_batching().static:
            raise InvalidOptionError(
                f"--compile cudagraphs: --method {spec} reads per-image token counts on the "
                "host and cannot be one CUDA graph; accepted: fixed-count methods, or "
                "batching=masked for ltmp and asvit (or --compile inductor)"
            )


def check_onnxruntime(
    args: argparse.Namespace, configs: list[MethodConfig], specs: list[str]
) -> None:
    """`--backend onnxruntime` times ONNX exports in float32 on the CPU execution provider: no
    --amp, --compile or CUDA device, and only methods that export (static shapes)."""
    for flag, value in (("--amp", args.amp), ("--compile", args.compile)):
        if value:
            raise InvalidOptionError(
                f"{flag} with --backend onnxruntime: ONNX Runtime runs the float32 export as it "
                f"is; accepted: {flag} with --backend torch, or no {flag}"
            )
    if args.device != "cpu":
        raise InvalidOptionError(
            f"--device={args.device} with --backend onnxruntime: it runs on the CPU execution "
            "provider; accepted: --device cpu"
        )
    check_onnx_packages("--backend onnxruntime")
    for config, spec in zip(configs, specs, strict=True):
        try:
            check_exportable(config)
        except InvalidOptionError as err:
            raise InvalidOptionError(f"--method {spec}: {err}") from err
