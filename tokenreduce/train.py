"""Learn a trainable method for a GMACs budget: the thresholds of LTMP / AS-ViT
(docs/methods.md §3.5, §3.6) or DiffRate's per-block rates (§3.9, "Search").

One loop for every trainable method; each kind's objective says what trains, how, and what the
loss is. The model runs its soft-mask training forward (every token stays, a key mask removes
them) with the backbone frozen.
- Thresholds (`ThresholdObjective`): label-smoothed cross-entropy plus reg_scale x (F -
  target_ratio)^2, F the differentiable kept fraction of the blocks' MACs; plain SGD, one
  learning rate per threshold kind, clamped after every step; `finetune=True` also trains the
  backbone (AdamW). The result is a threshold file.
- DiffRate (`RateObjective`): label-smoothed cross-entropy plus reg_scale x (GMACs -
  gmacs_target)^2, the GMACs of the rates' rounded counts with straight-through gradients;
  AdamW on the rates, cosine per epoch, as the official search. The result is the schedule of
  the last step, a schedule file.
Runs unchanged under torchrun (DDP over the trained parameters; each rank reads its own shard of
the data; rank 0 writes the file).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

import tokenreduce
from tokenreduce import distributed
from tokenreduce.data import ImageFolder
from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError, InvalidTypeError
from tokenreduce.info import ReductionInfo
from tokenreduce.methods.base import MethodConfig, make_config, trainable_method_names
from tokenreduce.methods.diffrate import DiffRateConfig
from tokenreduce.methods.diffrate_search import SearchRates, write_schedule_file
from tokenreduce.methods.learned import LearnedConfig, ThresholdParameters, write_threshold_file
from tokenreduce.patch import ModelAdapter, adapter_for, attached_engine
from tokenreduce.report import check_output_file
from tokenreduce.runtime import progress_bar

__all__ = [
    "Logits",
    "Objective",
    "RateObjective",
    "ThresholdObjective",
    "TrainResult",
    "check_gmacs_target",
    "check_settings",
    "objective_class",
    "train_thresholds",
]


logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """The trained config and what it achieved. target_ratio / gmacs_target: the budget trained
    for (a fraction of dense GMACs for learned thresholds, GMACs for DiffRate; the other None);
    mean_gmacs: eval-mode mean per-image GMACs of the result on (up to `gmacs_images`) training
    images; epoch_seconds: wall time of each epoch; seen: per rank, the dataset indices it
    trained on."""

    config: MethodConfig
    path: Path | None
    target_ratio: float | None
    dense_gmacs: float
    mean_gmacs: float
    epoch_seconds: list[float]
    steps: int
    seen: list[list[int]] = field(repr=False)
    history: list[dict[str, float]] = field(repr=False)
    gmacs_target: float | None = None

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
        opening, above = ("(", ">") if low_open else ("[", ">=")
        bound = f"{opening}{low:g}, {high:g}]" if high is not None else f"{above} {low:g}"
        raise InvalidOptionError(f"{option}={value!r} is not accepted; accepted: {bound}")


def check_settings(
    flags: Mapping[str, str] | None = None,
    *,
    config: MethodConfig,
    target_ratio: object = None,
    gmacs_target: object = None,
    reg_scale: object = None,
    label_smoothing: object = 0.1,
    backbone_lr: object = None,
    finetune: object = False,
) -> None:
    """The training settings of `config`'s method in range, or InvalidOptionError in one line
    naming the setting as `flags` calls it (the command line's flags; default "train: option
    NAME"), so that the command line can check them before it loads anything: a trainable
    method, the budget it trains for (learned thresholds: target_ratio; DiffRate: gmacs_target,
    checked against the model's dense GMACs by `check_gmacs_target`), the numbers in range."""

    def flag(option: str) -> str:
        return flags[option] if flags else option

    def name(option: str) -> str:
        return flags[option] if flags else f"train: option {option}"

    method = config.name
    if not type(config).trainable:
        raise InvalidOptionError(
            f"train: method {method!r} has nothing tokenreduce train learns; accepted: "
            f"{', '.join(trainable_method_names())}"
        )
    budgets = {"target_ratio": "a fraction of dense GMACs", "gmacs_target": "GMACs per image"}
    wanted = "gmacs_target" if isinstance(config, DiffRateConfig) else "target_ratio"
    (other,) = set(budgets) - {wanted}
    given = {"target_ratio": target_ratio, "gmacs_target": gmacs_target}
    if given[other] is not None:
        raise InvalidOptionError(
            f"{name(other)} is not accepted with method {method!r}, which trains for "
            f"{budgets[wanted]}; accepted: {flag(wanted)}"
        )
    if given[wanted] is None:
        raise InvalidOptionError(
            f"train: method {method!r} needs {flag(wanted)} (the budget: {budgets[wanted]})"
        )
    if target_ratio is not None:
        _check_number(name("target_ratio"), target_ratio, 0.0, 1.0, low_open=True)
    if gmacs_target is not None:
        _check_number(name("gmacs_target"), gmacs_target, 0.0, None, low_open=True)
    if reg_scale is not None:
        _check_number(name("reg_scale"), reg_scale, 0.0, None)
    _check_number(name("label_smoothing"), label_smoothing, 0.0, 1.0)
    if backbone_lr is not None:
        _check_number(name("backbone_lr"), backbone_lr, 0.0, None)
    if not isinstance(finetune, bool):
        raise InvalidTypeError(f"train: option finetune={finetune!r} must be True or False")
    if finetune and isinstance(config, DiffRateConfig):
        raise InvalidOptionError(
            f"{name('finetune')} is not accepted with method 'diffrate': its search trains the "
            "rates with the backbone frozen, as the official; accepted: finetune off"
        )
    if isinstance(config, DiffRateConfig):
        config.check_searchable()


def check_gmacs_target(option: str, gmacs_target: float, dense_gmacs: float) -> None:
    """A GMACs target below the model's dense GMACs, or InvalidOptionError naming `option`."""
    if not gmacs_target < dense_gmacs:
        raise InvalidOptionError(
            f"{option}={gmacs_target!r} is not accepted; accepted: a number in (0, "
            f"{dense_gmacs:.4g}), below this model's dense GMACs"
        )


def _learning_rates(config: MethodConfig, lr: Mapping[str, float] | None) -> dict[str, float]:
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


class Objective:
    """What the training loop of one kind of trainable method trains and minimises: its
    parameters (registered on the model with `Engine.set_trainable`), their optimizer and its
    learning rate per epoch, the loss of a step, and the trained config and its file.

    Class defaults (the official recipes): epochs, batch_size, reg_scale.
    """

    epochs: ClassVar[int]
    batch_size: ClassVar[int]
    reg_scale: ClassVar[float]
    trainable: nn.Module
    """The trained parameters (`Engine.set_trainable` registers them on the model)."""

    def optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def start_epoch(self, optimizer: torch.optim.Optimizer, epoch: int, epochs: int) -> None:
        """Set the learning rate of `epoch` (0-based) of `epochs`; constant by default."""

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, info: ReductionInfo
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one step from the training forward's logits and record, and its parts
        for the log."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Anything to do after each optimizer step; nothing by default."""

    def trained(self) -> MethodConfig:
        """The config with what was learned, for inference."""
        raise NotImplementedError

    def write(
        self, path: str | Path, trained: MethodConfig, dims: ModelDims, summary: dict[str, Any]
    ) -> Path:
        """Write the trained config's file, with `summary` (JSON values) in its metadata."""
        raise NotImplementedError


class ThresholdObjective(Objective):
    """Learned thresholds (LTMP, AS-ViT; docs/methods.md §3.5): SGD with one learning rate per
    threshold kind, label-smoothed cross-entropy + reg_scale x (F - target_ratio)^2 with F the
    kept fraction of the blocks' MACs, thresholds clamped after each step; warm start from the
    thresholds the config holds (e.g. a threshold file), else the method's initial values."""

    epochs = 1
    batch_size = 128
    reg_scale = 10.0

    def __init__(
        self,
        config: LearnedConfig,
        dims: ModelDims,
        rates: Mapping[str, float],
        target_ratio: float,
        reg_scale: float,
        label_smoothing: float,
        device: torch.device,
    ) -> None:
        self.config, self.dims, self.rates = config, dims, dict(rates)
        self.target_ratio, self.reg_scale = target_ratio, reg_scale
        self.label_smoothing = label_smoothing
        if config.has_thresholds:
            start = {kind: list(values) for kind, values in config.threshold_vectors(dims).items()}
        else:
            layers = len(config.reduce_layers(dims))
            start = {kind: [value] * layers for kind, value in config.train_init.items()}
        self.trainable = ThresholdParameters(start).to(device)

    def optimizer(self) -> torch.optim.Optimizer:
        groups = [
            {"params": [self.trainable.values[kind]], "lr": self.rates[kind], "kind": kind}
            for kind in self.config.kinds
        ]
        return torch.optim.SGD(groups, momentum=0.0, weight_decay=0.0)

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, info: ReductionInfo
    ) -> tuple[torch.Tensor, dict[str, float]]:
        fraction = tokenreduce.flops.budget_fraction(self.dims, info.kept_fraction.mean(dim=0))
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        loss = ce + self.reg_scale * (fraction - self.target_ratio) ** 2
        return loss, {"loss": loss.item(), "ce": ce.item(), "budget": fraction.item()}

    def after_step(self) -> None:
        low, high = self.config.clamp
        with torch.no_grad():
            for parameter in self.trainable.values.values():
                parameter.clamp_(low, high)

    def trained(self) -> LearnedConfig:
        return self.config.with_vectors(self.trainable.vectors())

    def write(
        self, path: str | Path, trained: MethodConfig, dims: ModelDims, summary: dict[str, Any]
    ) -> Path:
        return write_threshold_file(path, trained, dims, summary)


class RateObjective(Objective):
    """DiffRate's rate search (docs/methods.md §3.9, "Search"; official main.py and engine.py):
    AdamW on the rates (weight decay 0), its learning rate a cosine from `lr` to lr/10 set per
    epoch as the official runs it, loss label-smoothed cross-entropy + reg_scale x (GMACs -
    gmacs_target)^2 with the GMACs of the rates' rounded counts (`flops.expected_gmacs`). The
    result is the rounded counts of the last step: the official `kept_token_number` is set by
    each training forward, so its evaluation and logs after the search read those of the last
    step, before that step's update (the initial rates' when no step ran)."""

    epochs = 3
    batch_size = 256
    reg_scale = 5.0

    def __init__(
        self,
        config: DiffRateConfig,
        dims: ModelDims,
        lr: float,
        gmacs_target: float,
        reg_scale: float,
        label_smoothing: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.config, self.dims, self.lr = config, dims, lr
        self.gmacs_target, self.reg_scale = gmacs_target, reg_scale
        self.label_smoothing = label_smoothing
        self.trainable: SearchRates = config.search_rates(dims, dtype).to(device)
        self.schedule: tuple[list[int], list[int]] | None = None

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.trainable.parameters(), lr=self.lr, weight_decay=0.0)

    def start_epoch(self, optimizer: torch.optim.Optimizer, epoch: int, epochs: int) -> None:
        # official: timm's CosineLRScheduler(t_initial=epochs, lr_min=--arch-min-lr) stepped
        # with step(epoch) after each epoch (DeiT's main.py), which sets the rate of t = epoch
        # for the epoch after it: the first epoch runs at the given rate, epoch e >= 1 at the
        # cosine's t = e - 1 (0.01, 0.01, 0.00775 over the official 3 epochs)
        rate, low = self.lr, self.lr / 10
        if epoch > 0:
            rate = low + 0.5 * (self.lr - low) * (1 + math.cos(math.pi * (epoch - 1) / epochs))
        for group in optimizer.param_groups:
            group["lr"] = rate

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, info: ReductionInfo
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # the steps the forward just ran, recomputed: they depend on the rates only
        steps = self.trainable.steps()
        self.schedule = self.trainable.schedule(steps)
        gmacs = tokenreduce.flops.expected_gmacs(self.dims, self.trainable.token_counts(steps))
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        loss = ce + self.reg_scale * (gmacs - self.gmacs_target) ** 2
        return loss, {"loss": loss.item(), "ce": ce.item(), "gmacs": gmacs.item()}

    def trained(self) -> DiffRateConfig:
        prune, merge = self.schedule or self.trainable.schedule(self.trainable.steps())
        return DiffRateConfig(
            prune_kept_num=tuple(prune),
            merge_kept_num=tuple(merge),
            trace_source=self.config.trace_source,
            rope_position=self.config.rope_position,
            granularity=self.config.granularity,
        )

    def write(
        self, path: str | Path, trained: MethodConfig, dims: ModelDims, summary: dict[str, Any]
    ) -> Path:
        return write_schedule_file(
            path,
            trained.prune_kept_num,
            trained.merge_kept_num,
            dims,
            {**summary, "granularity": trained.granularity},
        )


def objective_class(config: MethodConfig) -> type[Objective]:
    """The objective that trains `config`'s method."""
    return RateObjective if isinstance(config, DiffRateConfig) else ThresholdObjective


def train_thresholds(
    model: nn.Module,
    method: str | MethodConfig,
    dataset: ImageFolder,
    *,
    target_ratio: float | None = None,
    gmacs_target: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: Mapping[str, float] | None = None,
    reg_scale: float | None = None,
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
    """Train `method` on `dataset` for a GMACs budget: the thresholds of a learned method for
    `target_ratio` x dense GMACs, or DiffRate's rates for `gmacs_target` GMACs.

    epochs, batch_size, reg_scale: None takes the method's official recipe (thresholds: 1, 128,
    10; DiffRate: 3, 256, 5). lr: {kind: rate} (thresholds: the method's kinds; DiffRate:
    "rates", 0.01).
    The model is left unreduced and in eval mode; the result carries the trained config (apply
    it with `tokenreduce.apply(model, result.config)`) and, when `out` is given, rank 0 writes it
    as a threshold file (`thresholds=PATH`) or a DiffRate schedule file (`searched=PATH`) with a
    JSON log beside it (`<out>.json`).
    """
    config = make_config(method, **options)
    check_settings(
        config=config,
        target_ratio=target_ratio,
        gmacs_target=gmacs_target,
        reg_scale=reg_scale,
        label_smoothing=label_smoothing,
        backbone_lr=backbone_lr,
        finetune=finetune,
    )
    kind = objective_class(config)
    epochs = kind.epochs if epochs is None else epochs
    batch_size = kind.batch_size if batch_size is None else batch_size
    reg_scale = kind.reg_scale if reg_scale is None else reg_scale
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
    dense_gmacs = tokenreduce.flops.dense_gmacs(model)
    if gmacs_target is not None:
        check_gmacs_target("train: option gmacs_target", gmacs_target, dense_gmacs)
    rates = _learning_rates(config, lr)
    context = distributed.setup(next(model.parameters()).device.type)
    device = context.device

    torch.manual_seed(seed)
    model.to(device)
    dims = tokenreduce.describe(model)
    # before the model changes: the objective may refuse an option for this model
    if kind is RateObjective:
        dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
        objective: Objective = RateObjective(
            config, dims, rates["rates"], gmacs_target, reg_scale, label_smoothing, device, dtype
        )
    else:
        objective = ThresholdObjective(
            config, dims, rates, target_ratio, reg_scale, label_smoothing, device
        )
    for parameter in model.parameters():
        parameter.requires_grad_(finetune)
    tokenreduce.apply(model, config)
    attached_engine(model).set_trainable(model, objective.trainable)
    optimizers = [objective.optimizer()]
    if finetune:
        learned = {id(p) for p in objective.trainable.parameters()}
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
    seen: list[int] = []
    history: list[dict[str, float]] = []
    epoch_seconds: list[float] = []
    bar = progress_bar(epochs * len(loader), progress and context.is_main, unit="step")
    model.train()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        objective.start_epoch(optimizers[0], epoch, epochs)
        start = time.perf_counter()
        for images, labels, indices, ok in loader:
            seen += indices.tolist()
            for i in indices[~ok].tolist():
                logger.warning("unreadable image skipped: %s", dataset.samples[i][0])
            images, labels = images[ok].to(device), labels[ok].to(device)
            if len(images) == 0:
                continue
            logits = network(images)
            loss, step = objective.loss(logits, labels, tokenreduce.last_info(model))
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            objective.after_step()
            history.append(step)
            bar.set_postfix({key: f"{value:.3f}" for key, value in step.items() if key != "ce"})
            bar.update(1)
        epoch_seconds.append(time.perf_counter() - start)
    bar.close()
    model.eval()
    trained = objective.trained()
    tokenreduce.remove(model)

    mean_gmacs = _mean_gmacs(model, trained, dataset, gmacs_images, batch_size, context)
    all_seen = distributed.gather(seen, context)
    all_seconds = distributed.gather(epoch_seconds, context)
    epoch_seconds = [max(s[e] for s in all_seconds) for e in range(epochs)]
    path = None
    if out is not None and context.is_main:
        budget = {"target_ratio": target_ratio}
        if gmacs_target is not None:
            budget = {"gmacs_target": gmacs_target}
        summary = {
            **budget,
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
        path = objective.write(out, trained, dims, summary)
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
        gmacs_target=gmacs_target,
    )


def _mean_gmacs(
    model: nn.Module,
    config: MethodConfig,
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
