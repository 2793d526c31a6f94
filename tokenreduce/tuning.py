"""Find, for every method, the weakest setting that meets a speed or cost target, and how close
it stays to the dense model there (docs/measurement.md §6).

A target is a measured speedup over the dense model at a batch size, a latency (turned into a
speedup by the dense model's measured latency), or a GMACs ratio. For a speed target the GMACs
ratio is the prior (the ideal speedup is 1 / ratio) and the measured speed the judge: a method's
ratio is set (`calibrate.match_gmacs`), the reduced model is timed interleaved with the dense
one (`bench.measure_speedup`), and the next ratio follows from the efficiency measured so far
(measured / ideal speedup) or, once the target is bracketed, by the secant between the two
sides. The candidate kept is timed again, so that one lucky round does not decide.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import tokenreduce
from tokenreduce import bench, calibrate
from tokenreduce.errors import InvalidOptionError, UnreachableTargetError
from tokenreduce.methods.base import MethodConfig, make_config, method_names
from tokenreduce.methods.learned import LearnedConfig, model_facts
from tokenreduce.options import MethodSpec, describe_options
from tokenreduce.patch import adapter_for
from tokenreduce.recipe import Recipe, config_options
from tokenreduce.runtime import progress_bar

__all__ = [
    "FIDELITY_METRICS",
    "TARGET_KINDS",
    "Candidate",
    "Target",
    "TuneResult",
    "TuneRow",
    "fidelity",
    "speedup_spread",
    "speedup_standard_error",
    "tune",
]


logger = logging.getLogger(__name__)

TARGET_KINDS = ("speedup", "latency_ms", "gmacs_ratio")
ROUND_RANGE = 1.96
"""The spread reported is this many standard deviations of a round's speedup (95% of rounds)."""
FIDELITY_METRICS = ("accuracy", "cosine", "patch_cosine")
"""accuracy: top-1 (%) on labelled images; cosine: pooled features against the dense model's;
patch_cosine: every patch's final feature (`patch_features`) against the dense model's."""

MATCH_TOLERANCE = 5e-3
"""How close (relative) a continuous strength's GMACs are matched to a ratio: finer than the
timing can tell apart."""

CLOSE_ENOUGH = 0.01
"""A search stops when the two ratios that bracket the target are this close."""


@dataclass(frozen=True)
class Target:
    """What to reach: kind in `TARGET_KINDS`, its value, and the batch size speed is timed at."""

    kind: str
    value: float
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise InvalidOptionError(
                f"target kind={self.kind!r} is not accepted; accepted: {', '.join(TARGET_KINDS)}"
            )
        value = self.value
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or value != value
        accepted = {
            "speedup": (not bad and value > 1, "a number > 1"),
            "latency_ms": (not bad and 0 < value < float("inf"), "a number of ms > 0"),
            "gmacs_ratio": (not bad and 0 < value < 1, "a number in (0, 1)"),
        }[self.kind]
        if not accepted[0]:
            option = "--" + self.kind.replace("_", "-")
            raise InvalidOptionError(f"{option}={value!r} is not accepted; accepted: {accepted[1]}")
        if isinstance(self.batch_size, bool) or not (
            isinstance(self.batch_size, int) and self.batch_size >= 1
        ):
            raise InvalidOptionError(
                f"--batch-size={self.batch_size!r} is not accepted; accepted: an integer >= 1"
            )


@dataclass(frozen=True)
class Candidate:
    """One measured setting: its config, GMACs ratio and the timing against the dense model."""

    config: MethodConfig
    gmacs_ratio: float
    timing: bench.Timing

    @property
    def speedup(self) -> float:
        return self.timing.speedup

    @property
    def spread(self) -> float:
        return speedup_spread(self.timing)

    @property
    def standard_error(self) -> float:
        return speedup_standard_error(self.timing)

    def pooled(self, other: Candidate) -> Candidate:
        """The same setting with the rounds of another timing of it added."""
        timing = bench.Timing(
            self.timing.dense + other.timing.dense,
            self.timing.reduced + other.timing.reduced,
            inputs=self.timing.inputs,
        )
        return Candidate(self.config, self.gmacs_ratio, timing)


@dataclass(frozen=True)
class TuneRow:
    """A method at the weakest setting found (a table row); status "ok", "unreached" (its
    strongest tried setting misses the target) or "skipped" (reason says why)."""

    method: str
    options: str
    status: str
    gmacs_ratio: float | None = None
    ideal_speedup: float | None = None
    measured_speedup: float | None = None
    speedup_spread: float | None = None
    fidelity: float | None = None
    fidelity_metric: str = ""
    measurements: int = 0
    dense_ms: float | None = None
    method_ms: float | None = None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TuneResult:
    """Every method's row, those that met the target first, by fidelity (best first), and the
    config of each row (None where there is none to apply)."""

    target: Target
    speedup_target: float | None
    rows: list[TuneRow]
    configs: list[MethodConfig | None]
    dense_fidelity: float | None = None
    device: str = "cpu"

    @property
    def winner(self) -> tuple[TuneRow, MethodConfig] | None:
        """The row with the best fidelity among those that met the target, and its config."""
        for row, config in zip(self.rows, self.configs, strict=True):
            if row.status == "ok" and config is not None:
                return row, config
        return None

    def recipe(self, model: nn.Module) -> Recipe:
        """The winner as a recipe for `model` (the dense model it was tuned on)."""
        if self.winner is None:
            raise UnreachableTargetError(self.unreached_message())
        row, config = self.winner
        return Recipe(
            method=config.name,
            options=config_options(config),
            model=model_facts(tokenreduce.describe(model)),
            target={
                "kind": self.target.kind,
                "value": self.target.value,
                "batch_size": self.target.batch_size,
                "speedup": self.speedup_target,
            },
            measured={
                "speedup": row.measured_speedup,
                "spread": row.speedup_spread,
                "gmacs_ratio": row.gmacs_ratio,
                "fidelity": row.fidelity,
                "fidelity_metric": row.fidelity_metric,
                "dense_fidelity": self.dense_fidelity,
                "dense_ms": row.dense_ms,
                "method_ms": row.method_ms,
            },
            device=self.device,
            torch=torch.__version__,
        )

    def unreached_message(self) -> str:
        """One line: no method met the target, and the best any reached."""
        option = "--" + self.target.kind.replace("_", "-")
        measured = [r for r in self.rows if r.measured_speedup is not None]
        if self.target.kind == "gmacs_ratio":
            low = min(measured, key=lambda r: r.gmacs_ratio, default=None)
            reached = (
                f"the lowest is {low.method} {low.options} at {low.gmacs_ratio:.3f} of dense"
                if low
                else "no method could be measured"
            )
        else:
            top = max(measured, key=lambda r: r.measured_speedup, default=None)
            reached = (
                f"the best reached is {top.method} {top.options} at {top.measured_speedup:.3f}x "
                f"± {top.speedup_spread:.3f}"
                if top
                else "no method could be measured"
            )
        return (
            f"{option}={self.target.value} is reached by no method here ({reached}); accepted: "
            "a weaker target"
        )


def _round_sigma(timing: bench.Timing) -> float:
    """The standard deviation of the per-round speedups (dense / reduced of the same round and
    input), from their interquartile range (IQR / 1.349) so that one disturbed round does not
    dominate; 0 with fewer than two rounds."""
    ratios = [d / r for d, r in zip(timing.dense, timing.reduced, strict=True)]
    if len(ratios) < 2:
        return 0.0
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive")
    return (quartiles[2] - quartiles[0]) / 1.349


def speedup_spread(timing: bench.Timing) -> float:
    """The spread of the measured speedup, reported with it: the half-width of the range that
    holds 95% of the rounds, 1.96 sigma (`_round_sigma`). The rounds of one timing share the
    machine's state, and a separate run later moves by more than their standard error: by up
    to about this much."""
    return ROUND_RANGE * _round_sigma(timing)


def speedup_standard_error(timing: bench.Timing) -> float:
    """The standard error of the median per-round speedup, 1.253 sigma / sqrt(rounds): how
    precisely this timing places the speedup, which the search uses to decide and to stop."""
    return 1.253 * _round_sigma(timing) / math.sqrt(max(len(timing.dense), 1))


def fidelity(
    model: nn.Module,
    reduced: nn.Module,
    images: torch.Tensor,
    metric: str,
    labels: torch.Tensor | None = None,
    chunk: int = 32,
) -> float:
    """How close `reduced` stays to `model` on `images` by `metric` (`FIDELITY_METRICS`);
    accuracy needs `labels`."""
    values = []
    with torch.inference_mode():
        for start in range(0, len(images), chunk):
            x = images[start : start + chunk]
            if metric == "accuracy":
                values.append((reduced(x).argmax(-1) == labels[start : start + chunk]).double())
            elif metric == "cosine":
                ours = adapter_for(reduced).pooled_features(reduced, x)
                dense = adapter_for(model).pooled_features(model, x)
                values.append(F.cosine_similarity(ours.double(), dense.double(), dim=-1))
            else:
                ours = tokenreduce.patch_features(reduced, x)
                dense = model.forward_features(x)
                values.append(F.cosine_similarity(ours.double(), dense.double(), dim=-1).mean(1))
    mean = torch.cat(values).mean().item()
    return mean * 100 if metric == "accuracy" else mean


class _Search:
    """The measurements of one tune run: the dense model, the images, the timing settings."""

    def __init__(
        self,
        model: nn.Module,
        calib: torch.Tensor,
        batches: list[torch.Tensor],
        num_warm_iter: int,
        num_bench_iter: int,
    ):
        self.model = model
        self.calib = calib
        self.batches = batches
        self.num_warm_iter = num_warm_iter
        self.num_bench_iter = num_bench_iter
        self.dense_gmacs = tokenreduce.flops.dense_gmacs(model)

    def measure(self, config: MethodConfig, gmacs_ratio: float | None = None) -> Candidate:
        """`config` timed interleaved with the dense model; timed again (rounds pooled) when
        the standard error of one timing is above `bench.NOISY_SPREAD` of its speedup (a busy
        machine)."""
        if gmacs_ratio is None:
            gmacs = calibrate.mean_gmacs(self.model, config, self.images_for(config))
            gmacs_ratio = gmacs / self.dense_gmacs
            tokenreduce.remove(self.model)
        reduced = tokenreduce.apply(copy.deepcopy(self.model), config)
        candidate = Candidate(config, gmacs_ratio, self._timing(reduced))
        if candidate.standard_error > bench.NOISY_SPREAD * candidate.speedup:
            candidate = candidate.pooled(Candidate(config, gmacs_ratio, self._timing(reduced)))
        return candidate

    def remeasure(self, candidate: Candidate) -> Candidate:
        """`candidate` timed once more; its rounds pooled with the earlier ones."""
        return candidate.pooled(self.measure(candidate.config, candidate.gmacs_ratio))

    def _timing(self, reduced: nn.Module) -> bench.Timing:
        return bench.measure_speedup(
            self.model, reduced, self.batches, self.num_warm_iter, self.num_bench_iter
        )

    def dense_ms(self) -> float:
        """The dense model's median milliseconds per batch (for a latency target)."""
        with torch.inference_mode():
            times = bench.round_robin(
                {"dense": self.model}, self.batches, self.num_warm_iter + self.num_bench_iter
            )["dense"][self.num_warm_iter :]
        return statistics.median(times) * 1e3

    def images_for(self, config: MethodConfig) -> torch.Tensor:
        """The images `config`'s GMACs are measured on: one when every image keeps the same
        counts (its GMACs are the same on any image), else all the calibration images."""
        return self.calib if config.per_image_counts else self.calib[:1]

    def match(self, config: MethodConfig, ratio: float) -> tuple[MethodConfig, float]:
        """`config` with its strength set to cost `ratio` x dense GMACs (or its strongest setting
        when that is as far as it goes), and the ratio it costs."""
        try:
            found = calibrate.match_gmacs(
                self.model,
                config,
                min(ratio, 1.0),
                self.images_for(config),
                tolerance=MATCH_TOLERANCE,
            )
        except UnreachableTargetError:
            strength = type(config).strength
            low, high = strength.bounds(tokenreduce.describe(self.model))
            strongest = make_config(
                config, **{strength.option: high if strength.larger_reduces_more else low}
            )
            cost = calibrate.mean_gmacs(self.model, strongest, self.images_for(config))
            tokenreduce.remove(self.model)
            return strongest, cost / self.dense_gmacs
        return found.config, found.ratio


def _meets(candidate: Candidate, speedup: float) -> bool:
    """Whether the measured speedup reaches `speedup` within its standard error."""
    return candidate.speedup + candidate.standard_error >= speedup


def _next_ratio(tried: list[Candidate], speedup: float) -> float | None:
    """The GMACs ratio to measure next, or None when the search is done."""
    meeting = [c for c in tried if _meets(c, speedup)]
    missing = [c for c in tried if not _meets(c, speedup)]
    weakest = max(meeting, key=lambda c: c.gmacs_ratio, default=None)
    if weakest is not None and abs(weakest.speedup - speedup) <= weakest.standard_error:
        return None  # within the noise of the target: a weaker setting would not measure apart
    bracket = [c for c in missing if weakest is None or c.gmacs_ratio > weakest.gmacs_ratio]
    if weakest is not None and bracket:
        above = min(bracket, key=lambda c: c.gmacs_ratio)
        if above.gmacs_ratio - weakest.gmacs_ratio < CLOSE_ENOUGH:
            return None
        slope = (weakest.speedup - above.speedup) / (weakest.gmacs_ratio - above.gmacs_ratio)
        if slope >= 0:
            return None  # the noise has the weaker setting as fast: no secant to follow
        # the secant of speedup over ratio between the two sides of the target
        ratio = above.gmacs_ratio + (speedup - above.speedup) / slope
        return min(max(ratio, weakest.gmacs_ratio), above.gmacs_ratio)
    # not bracketed: from the weakest that meets it, or the strongest that misses it, the ratio
    # that its efficiency (measured = efficiency x ideal, 1 / ratio) needs; a method already at
    # its strongest setting gets it again, and the search stops
    base = weakest or min(tried, key=lambda c: c.gmacs_ratio)
    return base.speedup * base.gmacs_ratio / speedup


def _search_speed(
    search: _Search, config: MethodConfig, speedup: float, max_measurements: int
) -> tuple[Candidate | None, list[Candidate]]:
    """The weakest measured setting of `config`'s strength that reaches `speedup` (None when
    none does), and every setting measured. The one kept is timed again and kept only if the
    pooled timing still meets the target; if not, the search goes on (two more timings) once."""
    tried: list[Candidate] = []
    ratio: float | None = 1 / speedup
    budget = max_measurements
    for _ in range(2):  # the search, and once more if the kept setting fails its re-timing
        while ratio is not None and len(tried) < budget:
            matched, achieved = search.match(config, ratio)
            if any(c.config == matched for c in tried):
                break  # the strength's grid gives no other setting near this ratio
            candidate = search.measure(matched, achieved)
            tried.append(candidate)
            logger.info(
                "      %s: %.3f of dense GMACs, %.3fx ± %.3f measured",
                describe_options(matched),
                achieved,
                candidate.speedup,
                candidate.spread,
            )
            ratio = _next_ratio(tried, speedup)
        meeting = [c for c in tried if _meets(c, speedup)]
        chosen = max(meeting, key=lambda c: c.gmacs_ratio, default=None)
        if chosen is None:
            return None, tried
        pooled = search.remeasure(chosen)
        tried[tried.index(chosen)] = pooled
        if _meets(pooled, speedup):
            return pooled, tried
        logger.info(
            "      %s timed again: %.3fx ± %.3f, short of the target",
            describe_options(pooled.config),
            pooled.speedup,
            pooled.spread,
        )
        ratio = _next_ratio(tried, speedup)
        budget = len(tried) + 2
    return None, tried


def _missed(target: Target, best: Candidate) -> str:
    """Why a method's best setting misses the target, in a few words."""
    if target.kind == "gmacs_ratio":
        return f"its strongest setting costs {best.gmacs_ratio:.3f} of dense"
    return f"best reached {best.speedup:.3f}x ± {best.spread:.3f}"


def _skip_reason(config: MethodConfig) -> str:
    if isinstance(config, LearnedConfig) and not config.has_thresholds:
        return (
            f"learned thresholds not given (--method {config.name}:thresholds=FILE from "
            "tokenreduce train)"
        )
    if type(config).strength is None and not isinstance(config, LearnedConfig):
        return "it declares no strength option to tune"
    return ""


def tune(
    model: nn.Module,
    images: torch.Tensor,
    target: Target,
    methods: Sequence[str | MethodSpec] | None = None,
    labels: torch.Tensor | None = None,
    metric: str | None = None,
    calib_images: int = 8,
    max_measurements: int = 4,
    num_warm_iter: int = 3,
    num_bench_iter: int = 10,
    progress: bool = True,
) -> TuneResult:
    """For every method, the weakest setting that meets `target`, and its fidelity on `images`.

    Args:
        model: the dense model (left unreduced), on the device to time on.
        images: preprocessed images [K, 3, H, W]: the first `calib_images` set GMACs ratios,
            the first batches (of `target.batch_size`, at least 8 images) are timed, all of
            them measure fidelity.
        target: what to reach (`Target`).
        methods: names or (name, options); default every registered method. A learned method
            without its trained thresholds is skipped; with them it is measured as trained.
        labels: the images' labels (fidelity "accuracy" by default); None: "cosine".
        metric: one of `FIDELITY_METRICS`, overriding the default.
        max_measurements: timings per method in the search (the kept one is timed once more).
    """
    metric = metric or ("accuracy" if labels is not None else "cosine")
    if metric not in FIDELITY_METRICS:
        raise InvalidOptionError(
            f"fidelity metric={metric!r} is not accepted; accepted: {', '.join(FIDELITY_METRICS)}"
        )
    if metric == "accuracy" and labels is None:
        raise InvalidOptionError("fidelity metric 'accuracy' needs labelled images")
    for option, value, low in (
        ("calib_images", calib_images, 1),
        ("max_measurements", max_measurements, 1),
        ("num_warm_iter", num_warm_iter, 0),
        ("num_bench_iter", num_bench_iter, 2),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidOptionError(f"{option}={value!r} is not accepted; accepted: >= {low}")
    specs = [(m, {}) if isinstance(m, str) else m for m in (methods or method_names())]
    configs = [make_config(name, **options) for name, options in specs]
    timing_images = images[: max(8, target.batch_size)]
    search = _Search(
        model,
        images[:calib_images],
        bench.image_batches(timing_images, target.batch_size),
        num_warm_iter,
        num_bench_iter,
    )
    device = images.device.type
    speedup = None
    if target.kind == "speedup":
        speedup = float(target.value)
    elif target.kind == "latency_ms":
        dense_ms = search.dense_ms()
        if target.value >= dense_ms:
            raise InvalidOptionError(
                f"--latency-ms={target.value} is not accepted: the dense model already runs a "
                f"batch of {target.batch_size} in {dense_ms:.1f} ms here; accepted: less than that"
            )
        speedup = dense_ms / target.value
        logger.info(
            "dense: %.1f ms per batch of %d: target speedup %.3fx",
            dense_ms,
            target.batch_size,
            speedup,
        )
    dense_fidelity = (
        fidelity(model, model, images, metric, labels) if metric == "accuracy" else None
    )
    found: list[tuple[TuneRow, MethodConfig | None]] = []
    bar = progress_bar(len(configs), progress, unit="method")
    for config in configs:
        bar.set_postfix_str(config.name)
        logger.info("%s:", config.name)
        row, chosen = _tune_one(search, config, target, speedup, max_measurements)
        if row.status == "ok":  # fidelity compares methods at the target, not beside it
            reduced = tokenreduce.apply(copy.deepcopy(model), chosen)
            score = fidelity(model, reduced, images, metric, labels)
            row = replace(row, fidelity=round(score, 4), fidelity_metric=metric)
        found.append((row, chosen))
        bar.update()
    bar.close()
    found.sort(key=lambda pair: _rank(pair[0]))
    rows = [row for row, _ in found]
    configs = [config if row.status == "ok" else None for row, config in found]
    return TuneResult(target, speedup, rows, configs, dense_fidelity, device)


def _rank(row: TuneRow) -> tuple[int, float]:
    """Sort key: the rows that met the target by fidelity (best first), then those that missed
    it by speed (fastest first), then the skipped ones."""
    if row.status == "ok":
        return 0, -(row.fidelity if row.fidelity is not None else float("-inf"))
    if row.status == "unreached":
        return 1, -(row.measured_speedup if row.measured_speedup is not None else 0.0)
    return 2, 0.0


def _tune_one(
    search: _Search,
    config: MethodConfig,
    target: Target,
    speedup: float | None,
    max_measurements: int,
) -> tuple[TuneRow, MethodConfig | None]:
    """One method's row (without fidelity) and the config to measure fidelity at."""
    reason = _skip_reason(config)
    if reason:
        logger.info("      skipped: %s", reason)
        return TuneRow(config.name, "", "skipped", reason=reason), None
    trained = isinstance(config, LearnedConfig)  # measured as trained: no strength to search
    if trained:
        candidate = search.measure(config)
        met = (
            candidate.gmacs_ratio <= target.value * (1 + calibrate.UNREACHABLE)
            if speedup is None
            else _meets(candidate, speedup)
        )
        chosen = candidate if met else None
        tried = [candidate]
    elif speedup is None:
        matched, achieved = search.match(config, target.value)
        candidate = search.measure(matched, achieved)
        met = achieved <= target.value * (1 + calibrate.UNREACHABLE)
        chosen = candidate if met else None
        tried = [candidate]
    else:
        chosen, tried = _search_speed(search, config, speedup, max_measurements)
    shown = chosen or max(tried, key=lambda c: c.speedup)
    status = "ok" if chosen is not None else "unreached"
    row = TuneRow(
        method=config.name,
        options=describe_options(shown.config),
        status=status,
        gmacs_ratio=round(shown.gmacs_ratio, 4),
        ideal_speedup=round(1 / shown.gmacs_ratio, 3),
        measured_speedup=round(shown.speedup, 3),
        speedup_spread=round(shown.spread, 3),
        measurements=len(tried),
        dense_ms=round(shown.timing.dense_s * 1e3, 2),
        method_ms=round(shown.timing.reduced_s * 1e3, 2),
        reason="" if chosen else _missed(target, shown),
    )
    logger.info(
        "      %s %s: %.3fx ± %.3f (%s)",
        status,
        row.options,
        shown.speedup,
        shown.spread,
        "kept" if chosen else "misses the target",
    )
    return row, shown.config
