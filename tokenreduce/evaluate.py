"""Accuracy of reduced models against the dense model, on the same images in the same run.

docs/measurement.md §3: ImageFolder data preprocessed with timm's data config; top-1/top-5 of the
dense and of each reduced model, their difference, the agreement of the two predictions, and
the distribution of per-image GMACs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import tokenreduce
from tokenreduce import distributed
from tokenreduce.data import ImageFolder
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.base import MethodConfig
from tokenreduce.options import describe_options
from tokenreduce.patch import adapter_for
from tokenreduce.runtime import precision_context, progress_bar

__all__ = ["CLASSIFIER_HINTS", "EvalResult", "MethodAccuracy", "classifier_hint", "evaluate"]


logger = logging.getLogger(__name__)


@dataclass
class MethodAccuracy:
    """One reduced model's results; accuracies in percent over the readable images."""

    method: str
    options: str
    top1: float
    top5: float
    top1_drop: float
    agreement: float
    gmacs_mean: float
    gmacs_std: float
    gmacs_min: float
    gmacs_max: float
    gmacs_ratio: float
    per_image_gmacs: list[float] = field(repr=False)

    def as_row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "per_image_gmacs"}


@dataclass
class EvalResult:
    """Dense results and one MethodAccuracy per method, over `num_images` readable images."""

    model: str
    num_images: int
    unreadable: list[str]
    dense_top1: float
    dense_top5: float
    dense_gmacs: float
    methods: list[MethodAccuracy]
    dense_predictions: list[int] = field(repr=False)

    def rows(self) -> list[dict[str, Any]]:
        base = {
            "model": self.model,
            "num_images": self.num_images,
            "unreadable": len(self.unreadable),
            "dense_top1": self.dense_top1,
            "dense_top5": self.dense_top5,
            "dense_gmacs": self.dense_gmacs,
        }
        return [base | m.as_row() for m in self.methods]


def _topk_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    return top[:, 0] == labels, (top == labels[:, None]).any(dim=-1)


CLASSIFIER_HINTS = {
    "transformers": "accepted: a folder saved from a ...ForImageClassification model with as many "
    "labels as the dataset's classes (hf:PATH)",
    "open_clip": "accepted: zero-shot classifier weights for the dataset's classes (the "
    "command line sets them from the class names; in Python "
    "tokenreduce.patch.openclip.set_zero_shot_weights)",
}
"""How each family gets a classifier, where --num-classes and --head (timm only) do not apply."""


def classifier_hint(family: str) -> str:
    """How a model of `family` gets a classifier of the dataset's size."""
    return CLASSIFIER_HINTS.get(
        family,
        "give it one with --num-classes and --checkpoint, or a head file with --head",
    )


def evaluate(
    model: nn.Module,
    configs: Sequence[MethodConfig],
    dataset: ImageFolder,
    model_name: str = "",
    batch_size: int = 64,
    workers: int = 0,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> EvalResult:
    """Dense `model` and a reduced copy per config, on every image of `dataset`.

    Under torchrun each rank evaluates its shard; the per-image results are gathered (every rank
    returns the full result, in dataset order, equal to a one-process run).
    """
    num_classes = adapter_for(model).num_classes(model)
    if not num_classes:
        raise InvalidOptionError(
            f"model {model_name} has no classifier (num_classes=0); "
            + classifier_hint(tokenreduce.describe(model).family)
        )
    if num_classes < len(dataset.classes):
        raise InvalidOptionError(
            f"the dataset has {len(dataset.classes)} classes but model {model_name} predicts "
            f"{num_classes}; " + classifier_hint(tokenreduce.describe(model).family)
        )
    if num_classes > len(dataset.classes):  # a subset of the model's classes can be meant
        logger.warning(
            "model %s predicts %d classes and the dataset has %d: label k is the k-th class of "
            "the class map (or of the sorted folders), and a prediction of any other class "
            "counts as wrong; check that they match",
            model_name,
            num_classes,
            len(dataset.classes),
        )
    reduced = [tokenreduce.apply(copy.deepcopy(model), c) for c in configs]
    context = distributed.setup(next(model.parameters()).device.type)
    part = Subset(dataset, distributed.shard(len(dataset), context)) if context.active else dataset
    loader = DataLoader(part, batch_size=batch_size, num_workers=workers, shuffle=False)
    device = next(model.parameters()).device
    dense_hits: list[torch.Tensor] = []
    dense_pred: list[torch.Tensor] = []
    hits: list[list[torch.Tensor]] = [[] for _ in configs]
    gmacs: list[list[torch.Tensor]] = [[] for _ in configs]
    unreadable: list[str] = []
    order: list[torch.Tensor] = []
    logits_of = adapter_for(model).logits  # refuses a model without a classifier up front
    bar = progress_bar(len(part), progress and context.is_main)
    with precision_context(device.type, amp, amp_dtype):
        for images, labels, indices, ok in loader:
            for i in indices[~ok].tolist():
                unreadable.append(str(dataset.samples[i][0]))
                logger.warning("unreadable image skipped: %s", dataset.samples[i][0])
            images, labels = images[ok].to(device), labels[ok].to(device)
            if len(images) == 0:
                continue
            order.append(indices[ok])
            logits = logits_of(model, images).float()
            top1, top5 = _topk_hits(logits, labels)
            pred = logits.argmax(-1)
            dense_hits.append(torch.stack([top1, top5]))
            dense_pred.append(pred)
            for k, net in enumerate(reduced):
                out = logits_of(net, images).float()
                top1, top5 = _topk_hits(out, labels)
                hits[k].append(torch.stack([top1, top5, out.argmax(-1) == pred]))
                gmacs[k].append(tokenreduce.flops.gmacs(net, tokenreduce.last_info(net)).gmacs)
            bar.update(len(indices))
    bar.close()
    if context.active:
        dense_hits, dense_pred, hits, gmacs, unreadable = _gather_in_order(
            context, order, dense_hits, dense_pred, hits, gmacs, unreadable
        )
    if not dense_hits:
        raise InvalidOptionError(f"no readable image in the dataset ({len(unreadable)} unreadable)")
    dense = torch.cat(dense_hits, dim=1).double().mean(dim=1) * 100
    dense_gmacs = tokenreduce.flops.dense_gmacs(model)
    results = []
    for k, config in enumerate(configs):
        acc = torch.cat(hits[k], dim=1).double().mean(dim=1) * 100
        per_image = torch.cat(gmacs[k])
        results.append(
            MethodAccuracy(
                method=config.name,
                options=describe_options(config),
                top1=round(float(acc[0]), 2),
                top5=round(float(acc[1]), 2),
                top1_drop=round(float(dense[0] - acc[0]), 2),
                agreement=round(float(acc[2]), 2),
                gmacs_mean=round(float(per_image.mean()), 4),
                gmacs_std=round(float(per_image.std(unbiased=False)), 4),
                gmacs_min=round(float(per_image.min()), 4),
                gmacs_max=round(float(per_image.max()), 4),
                gmacs_ratio=round(float(per_image.mean()) / dense_gmacs, 4),
                per_image_gmacs=[round(float(g), 5) for g in per_image],
            )
        )
    return EvalResult(
        model=model_name,
        num_images=int(sum(h.shape[1] for h in dense_hits)),
        unreadable=unreadable,
        dense_top1=round(float(dense[0]), 2),
        dense_top5=round(float(dense[1]), 2),
        dense_gmacs=round(dense_gmacs, 4),
        methods=results,
        dense_predictions=torch.cat(dense_pred).tolist(),
    )


def _gather_in_order(
    context: distributed.Context,
    order: list[torch.Tensor],
    dense_hits: list[torch.Tensor],
    dense_pred: list[torch.Tensor],
    hits: list[list[torch.Tensor]],
    gmacs: list[list[torch.Tensor]],
    unreadable: list[str],
) -> tuple:
    """Every rank's per-image results, concatenated and put back in dataset order."""

    def cat(chunks: list[torch.Tensor], dim: int) -> torch.Tensor | None:
        return torch.cat([c.cpu() for c in chunks], dim=dim) if chunks else None

    local = (
        cat(order, 0),
        cat(dense_hits, 1),
        cat(dense_pred, 0),
        [cat(h, 1) for h in hits],
        [cat(g, 0) for g in gmacs],
        unreadable,
    )
    every = distributed.gather(local, context)
    unreadable = sorted(name for p in every for name in p[5])
    parts = [p for p in every if p[0] is not None]
    if not parts:
        return [], [], [[] for _ in hits], [[] for _ in gmacs], unreadable
    rank_order = torch.cat([p[0] for p in parts]).argsort()
    return (
        [torch.cat([p[1] for p in parts], dim=1)[:, rank_order]],
        [torch.cat([p[2] for p in parts])[rank_order]],
        [[torch.cat([p[3][k] for p in parts], dim=1)[:, rank_order]] for k in range(len(hits))],
        [[torch.cat([p[4][k] for p in parts])[rank_order]] for k in range(len(gmacs))],
        unreadable,
    )
