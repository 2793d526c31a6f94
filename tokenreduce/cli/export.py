"""`tokenreduce export`: a reduced model written as ONNX or as a torch.export ExportedProgram,
checked against PyTorch on real images."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from tokenreduce import data
from tokenreduce.api import apply
from tokenreduce.cli import shared
from tokenreduce.errors import InvalidOptionError
from tokenreduce.exporting import (
    FORMATS,
    MAX_DIFFERENCE,
    MIN_OPSET,
    check_exportable,
    check_exported,
    check_onnx_packages,
    check_suffix,
    export,
)
from tokenreduce.methods.base import make_config
from tokenreduce.options import format_spec, parse_method
from tokenreduce.report import check_output_file

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export",
        help="write a reduced model as ONNX (.onnx) or a torch.export program (.pt2), checked "
        "against PyTorch on real images",
        description="Write the model reduced by --method (dense without it) with a dynamic "
        "batch dimension, load the file back (ONNX Runtime on the CPU for .onnx, "
        "torch.export.load for .pt2) and compare its outputs with PyTorch's on real images: the "
        f"largest absolute difference is printed, and above {MAX_DIFFERENCE:g} the command fails.",
    )
    shared.add_model_args(parser, shared.DEMO_MODEL)
    parser.add_argument(
        "--method",
        default=None,
        help="NAME[:opt=value,...], a static reduction (every fixed-count method; ltmp/asvit "
        "with batching=masked); default: the dense model",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="file to write: " + ", ".join(f"{s} ({what})" for s, what in FORMATS.items()),
    )
    parser.add_argument(
        "--data",
        default=None,
        help="folder of images (any below it) to check the file on; default: the photographs "
        "shipped by scikit-image and matplotlib",
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=None,
        help="evenly spaced images taken from --data (default with --data: 8)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=None,
        help=f"ONNX opset, at least {MIN_OPSET} (with a .onnx --out; default: {MIN_OPSET})",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict[str, object]:
    """Check every option before any work, then load, reduce, write and check the model."""
    shared.check_needs(args, [("num_images", "data")])
    shared.check_at_least(args, {"num_images": 1, "opset": MIN_OPSET})
    check_suffix(args.out, "--out")
    check_output_file("--out", args.out)
    onnx = Path(args.out).suffix == ".onnx"
    if args.opset is not None and not onnx:
        raise InvalidOptionError(
            f"--opset={args.opset} acts only with a .onnx --out, not {args.out}; accepted: no "
            "--opset, or a .onnx file"
        )
    if onnx:
        check_onnx_packages(f"--out {args.out}")
    method = parse_method(args.method) if args.method else None
    if method is not None:
        config = make_config(method[0], **method[1])
        check_exportable(config)
        shared.warn_untrained([config], [args.method])
    model = shared.load_model(args)
    images = _real_images(args, model)
    if method is not None:
        apply(model, config)
    described = format_spec(*method) if method is not None else "dense"
    shared.logger.info(
        "export: %s (%s), %s -> %s", args.model, shared.weights_label(args), described, args.out
    )
    path = export(model, args.out, images, opset=args.opset or MIN_OPSET, check=False)
    size_mb = path.stat().st_size / 1e6
    print(f"wrote {path} ({FORMATS[path.suffix]}, {size_mb:.1f} MB): {args.model}, {described}")
    difference = check_exported(path, model, images)
    checked_in = "ONNX Runtime (CPU)" if onnx else "torch.export.load"
    print(
        f"max abs difference to PyTorch: {difference:.3g} ({checked_in}, {len(images)} real "
        f"images, batches of {len(images)} and 1; accepted: <= {MAX_DIFFERENCE:g})"
    )
    return {"path": path, "bytes": path.stat().st_size, "max_difference": difference}


def _real_images(args: argparse.Namespace, model: nn.Module) -> torch.Tensor:
    """Real images preprocessed for `model`: --data's, or the packaged photographs."""
    if args.data is None:
        return data.load_images(data.packaged_photos(), model)[0]
    args.num_images = 8 if args.num_images is None else args.num_images
    transform, _ = data.eval_transform(model)
    files = data.ImageFiles(args.data, transform, args.num_images)
    return shared.readable_images(files, range(len(files)), "the export check")
