"""Dense outputs measured end to end: saliency maps of a reduced model against the dense model's
(docs/measurement.md §3, "Dense outputs").

The dense model's map is the reference; each reduced model's map is scored against it with the
standard saliency agreement metrics (Bylinskii et al., "What do different evaluation metrics tell
us about saliency models?", TPAMI 2019) and the salient-object MAE:

- cc: Pearson correlation of the two maps over pixels (1: identical up to scale and shift);
- kl: KL(reference || reduced) of the maps normalised to sum 1 (0: identical);
- sim: histogram intersection, sum of min(P, Q) of the maps normalised to sum 1 (1: identical);
  unlike the benchmark code, the maps are not first rescaled to [0, 1] by their min and max
  (both are sigmoid outputs in [0, 1] already), so a raised background counts as mass;
- mae: mean absolute difference of the [0, 1] maps (0: identical).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce
from tokenreduce.bench import Timing
from tokenreduce.errors import InvalidOptionError
from tokenreduce.imgfocus import SaliencyModel
from tokenreduce.methods.base import MethodConfig
from tokenreduce.options import describe_options
from tokenreduce.runtime import precision_context, progress_bar, timed_call

__all__ = [
    "KL_EPSILON",
    "METRICS",
    "SaliencyResult",
    "SaliencyRow",
    "decoder_gmacs",
    "evaluate_saliency",
    "saliency_agreement",
]


logger = logging.getLogger(__name__)

METRICS = ("cc", "kl", "sim", "mae")
KL_EPSILON = 2.2204e-16
"""The epsilon of the saliency benchmarks' KL (MATLAB's eps), so that results compare."""


def saliency_agreement(reduced: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image agreement of saliency maps reduced vs reference, both [B, 1, H, W] >= 0.

    Returns {"cc", "kl", "sim", "mae"}, each [B] float64 (see the module docstring).
    """
    if reduced.shape != reference.shape or reduced.dim() != 4:
        raise ValueError(
            f"saliency maps must be two [B, 1, H, W] tensors of one shape, got "
            f"{tuple(reduced.shape)} and {tuple(reference.shape)}"
        )
    p = reduced.flatten(1).double()
    q = reference.flatten(1).double()
    centred_p = p - p.mean(dim=1, keepdim=True)
    centred_q = q - q.mean(dim=1, keepdim=True)
    cc = (centred_p * centred_q).sum(dim=1) / (
        centred_p.norm(dim=1) * centred_q.norm(dim=1)
    ).clamp_min(1e-300)
    p_dist = p / p.sum(dim=1, keepdim=True).clamp_min(1e-300)
    q_dist = q / q.sum(dim=1, keepdim=True).clamp_min(1e-300)
    kl = (q_dist * torch.log(KL_EPSILON + q_dist / (KL_EPSILON + p_dist))).sum(dim=1)
    sim = torch.minimum(p_dist, q_dist).sum(dim=1)
    mae = (p - q).abs().mean(dim=1)
    return {"cc": cc, "kl": kl, "sim": sim, "mae": mae}


def decoder_gmacs(model: SaliencyModel) -> float:
    """GMACs per image of the saliency decoder (counted by torch's FlopCounterMode)."""
    backbone = model.backbone
    rows, cols = backbone.patch_embed.grid_size
    grid = torch.zeros(1, backbone.embed_dim, rows, cols)
    size = tuple(tokenreduce.describe(backbone).input_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.decoder(grid, size)
    return counter.get_total_flops() / 2 / 1e9


@dataclass(frozen=True)
class SaliencyRow:
    """One reduced model against the dense one: cost, measured speed and map agreement (means
    over the images; `*_std` their standard deviation)."""

    method: str
    options: str
    backbone_gmacs: float
    backbone_gmacs_ratio: float
    gmacs: float
    gmacs_ratio: float
    ideal_speedup: float
    measured_speedup: float
    dense_spread: float
    noisy: bool
    cc: float
    kl: float
    sim: float
    mae: float
    cc_std: float
    kl_std: float
    sim_std: float
    mae_std: float
    num_images: int
    pruned: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SaliencyResult:
    """Dense cost and the per-method rows of one `evaluate_saliency` run."""

    dense_backbone_gmacs: float
    decoder_gmacs: float
    num_images: int
    unreadable: list[str]
    rows: list[SaliencyRow]


def evaluate_saliency(
    model: SaliencyModel,
    configs: Sequence[MethodConfig],
    dataset: Dataset,
    batch_size: int,
    workers: int = 0,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.bfloat16,
    progress: bool = False,
) -> SaliencyResult:
    """Dense and reduced saliency maps of every image of `dataset` ((image, label, index, ok)
    items), scored per method, with GMACs and measured speed.

    Speed: each batch runs the dense model, then each reduced model, timed one after the other
    in this process (after one untimed warm-up batch); the speedup is the dense time over the
    reduced time summed over the batches.
    """
    model = model.eval()
    dense_backbone = tokenreduce.flops.dense_gmacs(model.backbone)
    decoder = decoder_gmacs(model)
    reduced_models = []
    for config in configs:
        reduced = copy.deepcopy(model)
        tokenreduce.apply(reduced.backbone, config)
        reduced_models.append(reduced)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    scores: list[dict[str, list[torch.Tensor]]] = [{m: [] for m in METRICS} for _ in configs]
    backbone_gmacs: list[list[torch.Tensor]] = [[] for _ in configs]
    dense_times: list[float] = []
    reduced_times: list[list[float]] = [[] for _ in configs]
    unreadable: list[str] = []
    count = 0
    bar = progress_bar(len(dataset), progress)
    with precision_context("cpu", amp, amp_dtype):
        for k, (images, _, indices, ok) in enumerate(loader):
            unreadable += [str(dataset.samples[i][0]) for i in indices[~ok].tolist()]
            images = images[ok]
            if len(images) == 0:
                continue
            if k == 0:  # warm-up: first calls allocate and pick kernels
                model(images)
                for reduced in reduced_models:
                    reduced(images)
            dense_maps, seconds = timed_call(model, images)
            dense_times.append(seconds / len(images))
            for i, reduced in enumerate(reduced_models):
                maps, seconds = timed_call(reduced, images)
                reduced_times[i].append(seconds / len(images))
                info = tokenreduce.last_info(reduced.backbone)
                backbone_gmacs[i].append(tokenreduce.flops.gmacs(reduced.backbone, info).gmacs)
                for metric, values in saliency_agreement(maps, dense_maps).items():
                    scores[i][metric].append(values)
            count += len(images)
            bar.update(len(images))
    bar.close()
    if count == 0:
        raise InvalidOptionError(
            f"no readable image among the {len(dataset)} image(s) in the folder: "
            + ", ".join(unreadable[:3])
        )
    rows = []
    dense_total = dense_backbone + decoder
    for i, config in enumerate(configs):
        timing = Timing(dense_times, reduced_times[i], inputs=len(dense_times))
        gmacs = torch.cat(backbone_gmacs[i]).mean().item()
        per_image = {m: torch.cat(scores[i][m]) for m in METRICS}
        summary = {m: round(v.mean().item(), 4) for m, v in per_image.items()}
        spread = {f"{m}_std": round(v.std(correction=0).item(), 4) for m, v in per_image.items()}
        rows.append(
            SaliencyRow(
                method=config.name,
                options=describe_options(config),
                backbone_gmacs=round(gmacs, 4),
                backbone_gmacs_ratio=round(gmacs / dense_backbone, 4),
                gmacs=round(gmacs + decoder, 4),
                gmacs_ratio=round((gmacs + decoder) / dense_total, 4),
                ideal_speedup=round(dense_total / (gmacs + decoder), 3),
                measured_speedup=round(timing.speedup, 3),
                dense_spread=round(timing.dense_spread, 3),
                noisy=timing.noisy,
                **summary,
                **spread,
                num_images=count,
                pruned=model.pruned,
            )
        )
    return SaliencyResult(round(dense_backbone, 4), round(decoder, 4), count, unreadable, rows)
