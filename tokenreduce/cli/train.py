"""`tokenreduce train`: learn the thresholds of ltmp/asvit for a GMACs budget (torchrun-ready)."""

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
from tokenreduce.methods.base import learned_method_names
from tokenreduce.options import parse_method

__all__ = ["add_parser", "learning_rates", "run"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="learn the thresholds of ltmp/asvit for a GMACs budget (works under torchrun)",
        description="Soft-mask training of a learned method's thresholds on an ImageFolder: "
        "cross-entropy + reg-scale x (kept MACs fraction - target)^2. Backbone frozen unless "
        "--finetune. Writes a threshold file for thresholds=PATH, with a JSON log beside it.",
    )
    parser.add_argument("data", help="ImageFolder root: DATA/<class>/<image> (training images)")
    shared.add_model_args(parser, shared.DEMO_MODEL)
    shared.add_data_args(parser, batch_size=128)
    parser.add_argument("--method", required=True, help="NAME[:opt=value,...] (ltmp or asvit)")
    parser.add_argument(
        "--target", type=float, required=True, help="target fraction of dense GMACs"
    )
    parser.add_argument("--out", required=True, help="threshold file to write (.safetensors)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training images")
    parser.add_argument(
        "--lr",
        action="append",
        default=[],
        help="KIND=VALUE learning rate of one threshold kind (repeatable); default: the "
        "method's (ltmp merge_thresholds=5e-3, prune_thresholds=5e-6; asvit thresholds=1e-3)",
    )
    parser.add_argument("--reg-scale", type=float, default=10.0, help="budget loss weight")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="of the cross-entropy")
    parser.add_argument("--finetune", action="store_true", help="also train the backbone (AdamW)")
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


def run(args: argparse.Namespace) -> training.TrainResult:
    name, options = parse_method(args.method)
    if name not in learned_method_names():
        raise InvalidOptionError(
            f"--method={args.method!r} is not accepted; accepted: {learned_method_names()}"
        )
    rates = learning_rates(args.lr)
    shared.check_needs(args, [("backbone_lr", "finetune")])
    shared.check_at_least(args, {"epochs": 1})
    training.check_settings(
        {
            "target_ratio": "--target",
            "reg_scale": "--reg-scale",
            "label_smoothing": "--label-smoothing",
            "backbone_lr": "--backbone-lr",
        },
        target_ratio=args.target,
        reg_scale=args.reg_scale,
        label_smoothing=args.label_smoothing,
        backbone_lr=args.backbone_lr,
    )
    report.check_output_file("--out", args.out)
    if Path(args.out).suffix != ".safetensors":
        raise InvalidOptionError(f"--out={args.out} is not accepted; accepted: a .safetensors path")
    context = distributed.setup()
    model = shared.load_model(args)
    dataset = shared.image_folder(args, model, args.data)
    shared.add_zero_shot(args, model, dataset.classes)
    if context.is_main:
        shared.logger.info(
            "train: %s on %s (%s), target %s of dense GMACs, %d process(es), %d threads",
            name,
            args.model,
            shared.weights_label(args),
            args.target,
            context.world,
            torch.get_num_threads(),
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
            for kind, values in result.config.threshold_vectors(tokenreduce.describe(model)).items()
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
