"""Sweeps over methods and strengths: accuracy, GMACs and measured speed, and their plots.

Every registered method contributes its `sweep` grid (a method added later joins by declaring
one). The picture users choose from: accuracy vs GMACs with the Pareto front, and measured
speedup vs GMACs against the ideal (dense GMACs / GMACs).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import tokenreduce
from tokenreduce import bench
from tokenreduce.data import ImageFolder
from tokenreduce.errors import InvalidOptionError
from tokenreduce.evaluate import EvalResult, evaluate
from tokenreduce.methods.base import MethodConfig, make_config, method_names
from tokenreduce.options import describe_options

__all__ = ["CompareRow", "compare", "pareto_front", "plot_tradeoffs", "sweep_configs"]


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareRow(bench.SpeedRow):
    """Speed and cost, and accuracy when a dataset was given."""

    top1: float | None
    top1_drop: float | None
    agreement: float | None


def sweep_configs(methods: Sequence[str] | None = None) -> list[MethodConfig]:
    """The registered sweep grid of each method (all registered methods by default)."""
    names = list(methods) if methods else method_names()
    configs = []
    for name in names:
        if ":" in name:
            raise InvalidOptionError(
                f"--method {name!r} is not accepted: compare's --method takes a method name and "
                "sweeps its grid; give one configuration with --config NAME:opt=value"
            )
        cls = type(make_config(name))
        if not cls.sweep:
            raise InvalidOptionError(
                f"method {name!r} registers no sweep grid; pass configs explicitly"
            )
        configs += [make_config(name, **options) for options in cls.sweep]
    return configs


def compare(
    model: nn.Module,
    configs: Sequence[MethodConfig],
    timing_images: torch.Tensor,
    dataset: ImageFolder | None = None,
    model_name: str = "",
    eval_batch_size: int = 64,
    workers: int = 0,
    num_warm_iter: int = 2,
    num_bench_iter: int = 5,
    progress: bool = True,
) -> tuple[list[CompareRow], EvalResult | None]:
    """One row per config: mean GMACs (on `dataset` when given, else on `timing_images`),
    measured speedup on `timing_images`, and accuracy on `dataset` when given."""
    evaluation = None
    if dataset is not None:
        evaluation = evaluate(
            model, configs, dataset, model_name, eval_batch_size, workers, progress=progress
        )
    dense = tokenreduce.flops.dense_gmacs(model)
    rows = []
    for k, config in enumerate(configs):
        reduced = tokenreduce.apply(copy.deepcopy(model), config)
        timing = bench.measure_speedup(model, reduced, timing_images, num_warm_iter, num_bench_iter)
        if evaluation is not None:
            gmacs = evaluation.methods[k].gmacs_mean
        else:
            gmacs = tokenreduce.flops.gmacs(reduced, tokenreduce.last_info(reduced)).mean
        accuracy = evaluation.methods[k] if evaluation is not None else None
        row = CompareRow(
            **bench.SpeedRow.fields_of(
                config.name, describe_options(config), gmacs, dense, timing, len(timing_images)
            ),
            top1=accuracy.top1 if accuracy else None,
            top1_drop=accuracy.top1_drop if accuracy else None,
            agreement=accuracy.agreement if accuracy else None,
        )
        if progress:
            logger.info(
                "  %s %s: %.3f GMACs, %.2fx (ideal %.2fx)%s%s",
                row.method,
                row.options,
                row.gmacs,
                row.measured_speedup,
                row.ideal_speedup,
                f", top-1 {row.top1:.1f}%" if accuracy else "",
                bench.noise_note(timing),
            )
        rows.append(row)
    return rows, evaluation


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points no other point beats: cheaper or equal and at
    least as accurate, strictly better in one. Sorted by cost."""
    front = []
    for i, (cost, acc) in enumerate(points):
        dominated = any(
            c <= cost and a >= acc and (c < cost or a > acc)
            for j, (c, a) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def plot_tradeoffs(
    rows: Sequence[CompareRow],
    dense_gmacs: float,
    out_dir: str | Path,
    title: str,
    dense_top1: float | None = None,
) -> list[Path]:
    """speedup_vs_gmacs.png (measured, with the ideal curve) and, with accuracy,
    accuracy_vs_gmacs.png (Pareto front marked). Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = sorted({r.method for r in rows})
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for method in methods:
        sel = sorted((r for r in rows if r.method == method), key=lambda r: r.gmacs)
        ax.plot([r.gmacs for r in sel], [r.measured_speedup for r in sel], "o-", label=method)
    grid = torch.linspace(min(r.gmacs for r in rows) * 0.95, dense_gmacs, 100)
    ax.plot(grid, dense_gmacs / grid, "k--", lw=1, label="ideal (dense / GMACs)")
    ax.plot([dense_gmacs], [1.0], "k*", ms=12, label="dense")
    ylabel = f"measured speedup over dense (batch {rows[0].batch_size})"
    written.append(
        _save(fig, ax, "GMACs per image", ylabel, title, out_dir / "speedup_vs_gmacs.png")
    )

    if dense_top1 is not None and all(r.top1 is not None for r in rows):
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        for method in methods:
            sel = sorted((r for r in rows if r.method == method), key=lambda r: r.gmacs)
            ax.plot([r.gmacs for r in sel], [r.top1 for r in sel], "o-", label=method)
        ax.plot([dense_gmacs], [dense_top1], "k*", ms=12, label="dense")
        points = [(r.gmacs, r.top1) for r in rows] + [(dense_gmacs, dense_top1)]
        front = pareto_front(points)
        ax.plot(
            [points[i][0] for i in front],
            [points[i][1] for i in front],
            "s--",
            color="black",
            mfc="none",
            ms=11,
            lw=1,
            label="Pareto front",
        )
        path = out_dir / "accuracy_vs_gmacs.png"
        written.append(_save(fig, ax, "GMACs per image (mean)", "top-1 (%)", title, path))
    return written


def _save(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
