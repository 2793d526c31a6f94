"""The main job end to end: a real ViT, real photographs, every method at the same cost.

Each registered method is set to the same fraction of the dense GMACs (`calibrate`), then
timed against the dense model, its pooled features compared with the dense model's, and its
token maps drawn.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import tokenreduce
from tokenreduce import bench, calibrate, data, viz
from tokenreduce.errors import UnreachableTargetError
from tokenreduce.methods.base import make_config
from tokenreduce.options import MethodSpec, describe_options, unique_labels
from tokenreduce.patch import adapter_for

__all__ = ["DemoRow", "pooled_features", "run_demo"]


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoRow(bench.SpeedRow):
    """Speed and cost, and how close the pooled features stay to the dense model's."""

    dense_gmacs: float
    feature_cosine: float
    min_feature_cosine: float
    token_maps: str


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's pooled pre-logits features [B, D]."""
    with torch.inference_mode():
        return adapter_for(model).pooled_features(model, images)


def run_demo(
    model: nn.Module,
    photos: Sequence[Path],
    methods: Sequence[str | MethodSpec],
    out_dir: str | Path,
    gmacs_ratio: float = 0.65,
    batch_size: int | None = None,
    num_warm_iter: int = 3,
    num_bench_iter: int = 10,
    max_map_columns: int = 4,
) -> list[DemoRow]:
    """Run every method in `methods` at `gmacs_ratio` x dense GMACs on `photos`.

    methods: names, or (name, options) whose options stay fixed while the strength option is
    matched to the ratio.

    Speed is timed on a batch of `batch_size` photos (repeated cyclically; default: all photos
    once). Writes `token_maps_<method>.png` per method into `out_dir`.
    """
    out_dir = Path(out_dir)
    images, display = data.load_images(photos, model)
    grid = tokenreduce.describe(model).grid_size
    timing_batch = images[torch.arange(batch_size or len(photos)) % len(photos)]
    dense_features = pooled_features(model, images)
    dense_gmacs = tokenreduce.flops.dense_gmacs(model)
    labels = [Path(p).stem for p in photos]
    rows = []
    specs = [(m, {}) if isinstance(m, str) else m for m in methods]
    map_names = unique_labels([name for name, _ in specs])
    for step, (name, given) in enumerate(specs, start=1):
        logger.info(
            "[%d/%d] %s: matching %.0f%% of dense GMACs ...",
            step,
            len(specs),
            name,
            gmacs_ratio * 100,
        )
        strength = make_config(name).strength
        if strength is not None and strength.option in given:
            logger.warning(
                "%s: the given %s=%r is replaced by the value matched to %.0f%% of dense GMACs",
                name,
                strength.option,
                given[strength.option],
                gmacs_ratio * 100,
            )
        try:
            matched = calibrate.match_gmacs(model, name, gmacs_ratio, images, **given)
        except UnreachableTargetError as err:  # a small model: the others still show
            logger.warning("      %s: skipped, %s", name, err)
            continue
        options = describe_options(matched.config)
        reduced = tokenreduce.apply(copy.deepcopy(model), matched.config, trace_source=True)
        features = pooled_features(reduced, images)
        info = tokenreduce.last_info(reduced)
        report = tokenreduce.flops.gmacs(reduced, info)
        cosine = F.cosine_similarity(features.double(), dense_features.double(), dim=-1)
        map_path = viz.draw_token_maps(
            display,
            info,
            grid,
            out_dir / f"token_maps_{map_names[step - 1]}.png",
            title=f"{name} {options}: {report.mean:.2f} GMACs "
            f"({report.mean / dense_gmacs:.0%} of dense)",
            row_labels=labels,
            max_columns=max_map_columns,
        )
        tokenreduce.apply(reduced, matched.config)  # the same reduction, untraced, for timing
        timing = bench.measure_speedup(model, reduced, timing_batch, num_warm_iter, num_bench_iter)
        row = DemoRow(
            **bench.SpeedRow.fields_of(
                name, options, report.mean, dense_gmacs, timing, len(timing_batch)
            ),
            dense_gmacs=round(dense_gmacs, 4),
            feature_cosine=round(float(cosine.mean()), 4),
            min_feature_cosine=round(float(cosine.min()), 4),
            token_maps=str(map_path),
        )
        logger.info(
            "      %s: %.3f GMACs, %.2fx measured (ideal %.2fx), feature cosine %.4f%s",
            row.options,
            row.gmacs,
            row.measured_speedup,
            row.ideal_speedup,
            row.feature_cosine,
            bench.noise_note(timing),
        )
        rows.append(row)
    return rows
