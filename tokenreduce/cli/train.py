"""`tokenreduce train`: learn the thresholds of ltmp/asvit, or search DiffRate's rates, for a
GMACs budget (torchrun-ready)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import tokenreduce
from tokenreduce import distributed, report
from tokenreduce import train as training
from tokenreduce.cli import shared
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.base import make_config, trainable_method_names
from tokenreduce.methods.diffrate import DiffRateConfig
from tokenreduce.options import parse_method

__all__ = ["add_parser", "learning_rates", "run"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="learn the thresholds of ltmp/asvit or search DiffRate's rates for a GMACs budget "
        "(works under torchrun)",
        description="Soft-mask training on an ImageFolder, backbone frozen. ltmp/asvit: "
        "thresholds for cross-entropy + reg-scale x (kept MACs fraction - target)^2 (--finetune "
        "also trains the backbone); writes a threshold file for thresholds=PATH. diffrate: "
        "per-block rates for cross-entropy + reg-scale x (GMACs - gmacs-target)^2, as the "
        "official search; writes a schedule file for diffrate:searched=PATH. A JSON log is "
        "written beside the file.",
    )
    parser.add_argument("data", help="ImageFolder root: DATA/<class>/<image> (training images)")
    shared.add_model_args(parser, shared.DEMO_MODEL)
    shared.add_data_args(parser, batch_size=None)
    parser.add_argument(
        "--method",
        required=True,
        help="NAME[:opt=value,...] (ltmp, asvit or diffrate); default -b: the method's "
        "(ltmp/asvit 128, diffrate 256)",
    )
    parser.add_argument(
        "--target", type=float, default=None, help="ltmp/asvit: target fraction of dense GMACs"
    )
    parser.add_argument(
        "--gmacs-target", type=float, default=None, help="diffrate: target GMACs per image"
    )
    parser.add_argument("--out", required=True, help="file to write (.safetensors)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the training images; default: the method's (ltmp/asvit 1, diffrate 3)",
    )
    parser.add_argument(
        "--lr",
        action="append",
        default=[],
        help="KIND=VALUE learning rate of one kind of parameter (repeatable); default: the "
        "method's (ltmp merge_thresholds=5e-3, prune_thresholds=5e-6; asvit thresholds=1e-3; "
        "diffrate rates=1e-2, cosine to a tenth)",
    )
    parser.add_argument(
        "--reg-scale",
        type=float,
        default=None,
        help="budget loss weight; default: the method's (ltmp/asvit 10, diffrate 5)",
    )
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="of the cross-entropy")
    parser.add_argument(
        "--finetune", action="store_true", help="ltmp/asvit: also train the backbone (AdamW)"
    )
    parser.add_argument("--backbone-lr", type=float, default=None, help="default 1e-5 x batch/512")
    parser.add_argument("--seed", type=int, default=0, help="data order and initialisation")
    parser.set_defaults(run=run)


def learning_rates(items: list[str]) -> dict[str, float]:
    """--lr KIND=VALUE items as {kind: rate}."""
    rates = {}
    for item in items:
        kind, sep, value = item.partition("=")
        try:
            rates[kind] = float(value)
        except ValueError:
            sep = ""
        if not sep or not math.isfinite(rates[kind]) or rates[kind] < 0:
            raise InvalidOptionError(
                f"--lr {item!r} is not accepted; accepted: KIND=NUMBER with a number >= 0"
            )
    return rates


_FLAGS = {
    "target_ratio": "--target",
    "gmacs_target": "--gmacs-target",
    "reg_scale": "--reg-scale",
    "label_smoothing": "--label-smoothing",
    "backbone_lr": "--backbone-lr",
    "finetune": "--finetune",
}
"""The command line's name of each training setting, for error messages."""


def run(args: argparse.Namespace) -> training.TrainResult:
    name, options = parse_method(args.method)
    if name not in trainable_method_names():
        raise InvalidOptionError(
            f"--method={args.method!r} is not accepted; accepted: "
            f"{', '.join(trainable_method_names())}"
        )
    config = make_config(name, **options)
    rates = learning_rates(args.lr)
    shared.check_needs(args, [("backbone_lr", "finetune")])
    shared.check_at_least(args, {"epochs": 1, "batch_size": 1})
    training.check_settings(
        _FLAGS,
        config=config,
        target_ratio=args.target,
        gmacs_target=args.gmacs_target,
        reg_scale=args.reg_scale,
        label_smoothing=args.label_smoothing,
        backbone_lr=args.backbone_lr,
        finetune=args.finetune,
    )
    report.check_output_file("--out", args.out)
    if Path(args.out).suffix != ".safetensors":
        raise InvalidOptionError(f"--out={args.out} is not accepted; accepted: a .safetensors path")
    context = distributed.setup()
    model = shared.load_model(args)
    if args.gmacs_target is not None:  # the bound needs the model
        dense = tokenreduce.flops.dense_gmacs(model)
        training.check_gmacs_target("--gmacs-target", args.gmacs_target, dense)
    dataset = shared.image_folder(args, model, args.data)
    shared.add_zero_shot(args, model, dataset.classes)
    if context.is_main:
        budget = (
            f"{args.gmacs_target} GMACs"
            if args.gmacs_target is not None
            else f"{args.target} of dense GMACs"
        )
        shared.logger.info(
            "train: %s on %s (%s), target %s, %d process(es), %d threads",
            name,
            args.model,
            shared.weights_label(args),
            budget,
            context.world,
            torch.get_num_threads(),
        )
    result = training.train_thresholds(
        model,
        name,
        dataset,
        target_ratio=args.target,
        gmacs_target=args.gmacs_target,
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
        dims = tokenreduce.describe(model)
        seconds = ", ".join(f"{s:.1f}" for s in result.epoch_seconds)
        if isinstance(result.config, DiffRateConfig):
            prune, merge = result.config.kept_nums(dims)
            target = f"target {args.gmacs_target} GMACs"
            learned = f"schedule: prune_kept_num {prune}, merge_kept_num {merge}"
            use = f"{name}:searched={result.path}"
        else:
            thresholds = {
                kind: [round(v, 5) for v in values]
                for kind, values in result.config.threshold_vectors(dims).items()
            }
            target = f"target {args.target}"
            learned = f"thresholds: {json.dumps(thresholds)}"
            use = f"{name}:thresholds={result.path}"
        print(
            f"\ntrained {result.steps} steps, {seconds} s per epoch; mean "
            f"{result.mean_gmacs:.3f} GMACs = {result.ratio:.3f} of dense ({target}) on "
            f"training images\n{learned}\nwritten to {result.path} (log: {result.path}.json); "
            f"use --method {use}"
        )
    distributed.teardown(context)
    return result
