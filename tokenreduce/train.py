"""Learn the thresholds of LTMP / AS-ViT against a GMACs budget (docs/methods.md §3.5, §3.6).

The model runs its soft-mask training forward; the loss is label-smoothed cross-entropy plus
reg_scale x (F - target)^2, F the differentiable kept fraction of the blocks' MACs. Only the
thresholds train by default (plain SGD, one learning rate per threshold kind, clamped after every
step); `finetune=True` also trains the backbone (AdamW). Runs unchanged under torchrun (DDP over
the thresholds; each rank reads its own shard of the data; rank 0 writes the file).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

import tokenreduce
from tokenreduce import distributed
from tokenreduce.data import ImageFolder
from tokenreduce.errors import InvalidOptionError, InvalidTypeError
from tokenreduce.methods.base import MethodConfig, learned_method_names, make_config
from tokenreduce.methods.learned import LearnedConfig, ThresholdParameters, write_threshold_file
from tokenreduce.patch import ModelAdapter, adapter_for, attached_engine
from tokenreduce.report import check_output_file
from tokenreduce.runtime import progress_bar

__all__ = ["Logits", "TrainResult", "check_settings", "train_thresholds"]


logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """The trained config and what it achieved. mean_gmacs: eval-mode mean per-image GMACs of
    the trained thresholds on (up to `gmacs_images`) training images; epoch_seconds: wall time
    of each epoch; seen: per rank, the dataset indices it trained on."""

    config: LearnedConfig
    path: Path | None
    target_ratio: float
    dense_gmacs: float
    mean_gmacs: float
    epoch_seconds: list[float]
    steps: int
    seen: list[list[int]] = field(repr=False)
    history: list[dict[str, float]] = field(repr=False)

    @property
    def ratio(self) -> float:
        return self.mean_gmacs / self.dense_gmacs


class Logits(nn.Module):
    """The model's class logits as its family gives them (`ModelAdapter.logits`: a timm model's
    output, a transformers classifier's `.logits`, an open_clip tower's zero-shot scores), as a
    module, so that DistributedDataParallel wraps the call that the gradients flow through."""

    def __init__(self, model: nn.Module, adapter_class: type[ModelAdapter]) -> None:
        super().__init__()
        self.model = model
        self.adapter_class = adapter_class

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.adapter_class.logits(self.model, images)


def _check_number(
    option: str, value: object, low: float, high: float | None, low_open: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (low_open and value == low) or (high is not None and value > high):
        opening = "(" if low_open else "["
        bound = f"{opening}{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise InvalidOptionError(f"{option}={value!r} is not accepted; accepted: {bound}")


def check_settings(
    flags: Mapping[str, str] | None = None,
    *,
    target_ratio: object,
    reg_scale: object,
    label_smoothing: object,
    backbone_lr: object = None,
) -> None:
    """The numeric training settings in range, or InvalidOptionError in one line naming the
    setting as `flags` calls it (the command line's flags; default "train: option NAME"), so
    that the command line can check them before it loads anything."""

    def name(option: str) -> str:
        return flags[option] if flags else f"train: option {option}"

    _check_number(name("target_ratio"), target_ratio, 0.0, 1.0, low_open=True)
    _check_number(name("reg_scale"), reg_scale, 0.0, None)
    _check_number(name("label_smoothing"), label_smoothing, 0.0, 1.0)
    if backbone_lr is not None:
        _check_number(name("backbone_lr"), backbone_lr, 0.0, None)


def _learning_rates(config: LearnedConfig, lr: Mapping[str, float] | None) -> dict[str, float]:
    if lr is not None and not isinstance(lr, Mapping):
        raise InvalidTypeError(f"train: lr must be a mapping {{kind: rate}}, got {lr!r}")
    rates = dict(type(config).train_lr)
    for kind, value in (lr or {}).items():
        if kind not in rates:
            raise InvalidOptionError(
                f"train: learning rate for {kind!r} is not accepted; method {config.name!r} "
                f"learns {sorted(rates)}"
            )
        _check_number(f"train: lr[{kind}]", value, 0.0, None)
        rates[kind] = float(value)
    return rates


def train_thresholds(
    model: nn.Module,
    method: str | MethodConfig,
    dataset: ImageFolder,
    *,
    target_ratio: float,
    epochs: int = 1,
    batch_size: int = 128,
    lr: Mapping[str, float] | None = None,
    reg_scale: float = 10.0,
    label_smoothing: float = 0.1,
    finetune: bool = False,
    backbone_lr: float | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    workers: int = 0,
    gmacs_images: int = 256,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
    **options: Any,
) -> TrainResult:
    """Train the thresholds of `method` on `dataset` for `target_ratio` x dense GMACs.

    The model is left unreduced and in eval mode; the result carries the trained config (apply
    it with `tokenreduce.apply(model, result.config)`) and, when `out` is given, rank 0 writes it
    as a threshold file (`thresholds=PATH`) with a JSON log beside it (`<out>.json`).
    """
    config = make_config(method, **options)
    if not isinstance(config, LearnedConfig):
        raise InvalidOptionError(
            f"train: method {config.name!r} has no learned thresholds; accepted: "
            f"{learned_method_names()}"
        )
    check_settings(
        target_ratio=target_ratio,
        reg_scale=reg_scale,
        label_smoothing=label_smoothing,
        backbone_lr=backbone_lr,
    )
    for option, value, low in (
        ("workers", workers, 0),
        ("gmacs_images", gmacs_images, 1),
        ("epochs", epochs, 1),
        ("batch_size", batch_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidOptionError(
                f"train: option {option}={value!r} is not accepted; accepted: an int >= {low}"
            )
    if not isinstance(dataset, ImageFolder):
        raise InvalidTypeError(
            f"train: dataset must be a tokenreduce.data.ImageFolder, got {type(dataset).__name__}"
        )
    check_output_file("out", out)
    try:
        json.dumps(dict(metadata or {}))
    except (TypeError, ValueError) as err:
        raise InvalidTypeError(f"train: metadata must be JSON values: {err}") from err
    if not isinstance(finetune, bool):
        raise InvalidTypeError(f"train: option finetune={finetune!r} must be True or False")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidTypeError(f"train: option seed={seed!r} must be an int")
    if backbone_lr is not None and not finetune:
        raise InvalidOptionError(
            "train: option backbone_lr is given but finetune=False (the backbone stays frozen); "
            "accepted: backbone_lr with finetune=True"
        )
    adapter_class = adapter_for(model)
    num_classes = adapter_class.num_classes(model)
    if num_classes < len(dataset.classes):
        raise InvalidOptionError(
            f"train: the dataset has {len(dataset.classes)} classes but the model predicts "
            f"{num_classes}; give it a classifier for them (a timm model: --head, or "
            "--num-classes with --checkpoint; a transformers model: a *ForImageClassification "
            "folder with that many labels; an open_clip tower: --class-map)"
        )
    rates = _learning_rates(config, lr)
    context = distributed.setup(next(model.parameters()).device.type)
    device = context.device

    torch.manual_seed(seed)
    model.to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(finetune)
    tokenreduce.apply(model, config)
    dims = tokenreduce.describe(model)
    layers = len(config.reduce_layers(dims))
    if config.has_thresholds:  # warm start from the given thresholds (e.g. a threshold file)
        start = {kind: list(values) for kind, values in config.threshold_vectors(dims).items()}
    else:
        start = {kind: [value] * layers for kind, value in config.train_init.items()}
    thresholds = ThresholdParameters(start).to(device)
    attached_engine(model).set_trainable(model, thresholds)
    groups = [
        {"params": [thresholds.values[kind]], "lr": rates[kind], "kind": kind}
        for kind in config.kinds
    ]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.SGD(groups, momentum=0.0, weight_decay=0.0)
    ]
    if finetune:
        learned = {id(p) for p in thresholds.parameters()}
        backbone = [p for p in model.parameters() if id(p) not in learned]
        rate = 1e-5 * batch_size * context.world / 512 if backbone_lr is None else backbone_lr
        optimizers.append(torch.optim.AdamW(backbone, lr=rate, weight_decay=0.05))
    network: nn.Module = Logits(model, adapter_class)
    if context.active:
        ids = [device.index] if device.type == "cuda" else None
        network = nn.parallel.DistributedDataParallel(network, device_ids=ids)

    sampler = DistributedSampler(
        dataset, num_replicas=context.world, rank=context.rank, shuffle=True, seed=seed
    )
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)
    low, high = config.clamp
    seen: list[int] = []
    history: list[dict[str, float]] = []
    epoch_seconds: list[float] = []
    bar = progress_bar(epochs * len(loader), progress and context.is_main, unit="step")
    model.train()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        for images, labels, indices, ok in loader:
            seen += indices.tolist()
            for i in indices[~ok].tolist():
                logger.warning("unreadable image skipped: %s", dataset.samples[i][0])
            images, labels = images[ok].to(device), labels[ok].to(device)
            if len(images) == 0:
                continue
            logits = network(images)
            info = tokenreduce.last_info(model)
            fraction = tokenreduce.flops.budget_fraction(dims, info.kept_fraction.mean(dim=0))
            ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            loss = ce + reg_scale * (fraction - target_ratio) ** 2
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            with torch.no_grad():
                for parameter in thresholds.values.values():
                    parameter.clamp_(low, high)
            step = {"loss": loss.item(), "ce": ce.item(), "budget": fraction.item()}
            history.append(step)
            bar.set_postfix(loss=f"{step['loss']:.3f}", budget=f"{step['budget']:.3f}")
            bar.update(1)
        epoch_seconds.append(time.perf_counter() - start)
    bar.close()
    model.eval()
    trained = config.with_vectors(thresholds.vectors())
    tokenreduce.remove(model)

    mean_gmacs = _mean_gmacs(model, trained, dataset, gmacs_images, batch_size, context)
    dense_gmacs = tokenreduce.flops.dense_gmacs(model)
    all_seen = distributed.gather(seen, context)
    all_seconds = distributed.gather(epoch_seconds, context)
    epoch_seconds = [max(s[e] for s in all_seconds) for e in range(epochs)]
    path = None
    if out is not None and context.is_main:
        summary = {
            "target_ratio": target_ratio,
            "mean_gmacs": mean_gmacs,
            "dense_gmacs": dense_gmacs,
            "gmacs_ratio": mean_gmacs / dense_gmacs,
            "epochs": epochs,
            "batch_size": batch_size,
            "world_size": context.world,
            "learning_rates": rates,
            "reg_scale": reg_scale,
            "label_smoothing": label_smoothing,
            "finetune": finetune,
            "samples": len(dataset),
            "epoch_seconds": epoch_seconds,
            **dict(metadata or {}),
        }
        path = write_threshold_file(out, trained, dims, summary)
        log = {**summary, "seen_per_rank": all_seen, "history": history}
        Path(f"{path}.json").write_text(json.dumps(log, indent=1))
    return TrainResult(
        config=trained,
        path=path,
        target_ratio=target_ratio,
        dense_gmacs=dense_gmacs,
        mean_gmacs=mean_gmacs,
        epoch_seconds=epoch_seconds,
        steps=len(history),
        seen=all_seen,
        history=history,
    )


def _mean_gmacs(
    model: nn.Module,
    config: LearnedConfig,
    dataset: ImageFolder,
    count: int,
    batch_size: int,
    context: distributed.Context,
) -> float:
    """Eval-mode mean GMACs of `config` on the first `count` images, sharded over ranks."""
    subset = Subset(dataset, distributed.shard(min(count, len(dataset)), context))
    values: list[float] = []
    tokenreduce.apply(model, config)
    with torch.inference_mode():
        for images, _, _, ok in DataLoader(subset, batch_size=batch_size):
            if ok.any():
                model(images[ok].to(context.device))
                report = tokenreduce.flops.gmacs(model, tokenreduce.last_info(model))
                values += report.gmacs.tolist()
    tokenreduce.remove(model)
    values = [v for part in distributed.gather(values, context) for v in part]
    return sum(values) / len(values)
