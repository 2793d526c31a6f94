"""The main job end to end: a real ViT, real photographs, every method at the same cost.

Each registered method is set to the same fraction of the dense GMACs (`calibrate`), then
timed against the dense model, its pooled features compared with the dense model's, and its
token maps drawn.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import tokenreduce
from tokenreduce import bench, calibrate, data, viz
from tokenreduce.options import format_options

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoRow:
    method: str
    options: str
    gmacs: float
    dense_gmacs: float
    gmacs_ratio: float
    ideal_speedup: float
    measured_speedup: float
    batch_size: int
    feature_cosine: float
    min_feature_cosine: float
    token_maps: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's pooled pre-logits features [B, D]."""
    with torch.inference_mode():
        return model.forward_head(model.forward_features(images), pre_logits=True)


def run_demo(
    model: nn.Module,
    photos: Sequence[Path],
    methods: Sequence[str],
    out_dir: str | Path,
    gmacs_ratio: float = 0.65,
    batch_size: int | None = None,
    num_warm_iter: int = 3,
    num_bench_iter: int = 10,
    max_map_columns: int = 4,
) -> list[DemoRow]:
    """Run every method in `methods` at `gmacs_ratio` x dense GMACs on `photos`.

    Speed is timed on a batch of `batch_size` photos (repeated cyclically; default: all photos
    once). Writes `token_maps_<method>.png` per method into `out_dir`.
    """
    out_dir = Path(out_dir)
    images, display = data.load_images(photos, model)
    grid = tuple(model.patch_embed.grid_size)
    timing_batch = images[torch.arange(batch_size or len(photos)) % len(photos)]
    dense_features = pooled_features(model, images)
    dense_gmacs = tokenreduce.flops.dense_gmacs(model)
    labels = [Path(p).stem for p in photos]
    rows = []
    for step, name in enumerate(methods, start=1):
        logger.info(
            "[%d/%d] %s: matching %.0f%% of dense GMACs ...",
            step,
            len(methods),
            name,
            gmacs_ratio * 100,
        )
        matched = calibrate.match_gmacs(model, name, gmacs_ratio, images)
        strength = type(matched.config).strength.option
        options = {strength: getattr(matched.config, strength)}
        reduced = tokenreduce.apply(copy.deepcopy(model), name, **options, trace_source=True)
        features = pooled_features(reduced, images)
        info = tokenreduce.last_info(reduced)
        report = tokenreduce.flops.gmacs(reduced, info)
        cosine = F.cosine_similarity(features.double(), dense_features.double(), dim=-1)
        map_path = viz.draw_token_maps(
            display,
            info,
            grid,
            out_dir / f"token_maps_{name}.png",
            title=f"{name} {format_options(options)}: {report.mean:.2f} GMACs "
            f"({report.mean / dense_gmacs:.0%} of dense)",
            row_labels=labels,
            max_columns=max_map_columns,
        )
        tokenreduce.apply(reduced, name, **options)  # the same reduction, untraced, for timing
        dense_s, reduced_s = bench.measure_speedup(
            model, reduced, timing_batch, num_warm_iter, num_bench_iter
        )
        row = DemoRow(
            method=name,
            options=format_options(options),
            gmacs=round(report.mean, 4),
            dense_gmacs=round(dense_gmacs, 4),
            gmacs_ratio=round(report.mean / dense_gmacs, 3),
            ideal_speedup=round(dense_gmacs / report.mean, 3),
            measured_speedup=round(dense_s / reduced_s, 3),
            batch_size=len(timing_batch),
            feature_cosine=round(float(cosine.mean()), 4),
            min_feature_cosine=round(float(cosine.min()), 4),
            token_maps=str(map_path),
        )
        logger.info(
            "      %s: %.3f GMACs, %.2fx measured (ideal %.2fx), feature cosine %.4f",
            row.options,
            row.gmacs,
            row.measured_speedup,
            row.ideal_speedup,
            row.feature_cosine,
        )
        rows.append(row)
    return rows
