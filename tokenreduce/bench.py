"""Speed benchmark: dense and reduced model timed interleaved in one process
(docs/measurement.md §2)."""

from __future__ import annotations

import copy
import logging
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

import tokenreduce
from tokenreduce.flops import FlopsReport
from tokenreduce.options import MethodSpec, format_options
from tokenreduce.runtime import precision_context, timed_forward

logger = logging.getLogger(__name__)

DEFAULT_METHODS = (
    "tome:r=13",
    "evit:keep_rate=0.7",
    "topk:keep_rate=0.7",
    "ppt:r=50",
    "bat:keep_rate=0.7",
)


@dataclass(frozen=True)
class BenchResult:
    model: str
    method: str
    options: str
    batch_size: int
    gmacs: float
    gmacs_with_overhead: float
    dense_gmacs: float
    ideal_speedup: float
    measured_speedup: float
    dense_ms: float
    method_ms: float
    method_img_per_s: float
    device: str
    precision: str
    threads: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_speedup(
    dense: nn.Module,
    reduced: nn.Module,
    x: torch.Tensor | Sequence[torch.Tensor],
    num_warm_iter: int,
    num_bench_iter: int,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.bfloat16,
) -> tuple[float, float]:
    """Seconds per batch of dense and reduced, timed alternately on the same input.

    x: one batch (median over iterations) or several (iteration k runs batch k mod count; mean
    over iterations, so that methods whose cost depends on the image are timed on many).
    """
    batches = [x] if isinstance(x, torch.Tensor) else list(x)
    device = batches[0].device.type
    dense_times, reduced_times = [], []
    with precision_context(device, amp, amp_dtype):
        for k in range(num_warm_iter):
            dense(batches[k % len(batches)])
            reduced(batches[k % len(batches)])
        for k in range(num_bench_iter):
            dense_times.append(timed_forward(dense, batches[k % len(batches)]))
            reduced_times.append(timed_forward(reduced, batches[k % len(batches)]))
    summary = statistics.median if len(batches) == 1 else statistics.fmean
    return summary(dense_times), summary(reduced_times)


def image_batches(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive batches of `images` (cycled when there are fewer images than one batch)."""
    if len(images) < batch_size:
        repeat = -(-batch_size // len(images))
        images = images.repeat(repeat, 1, 1, 1)
    count = len(images) // batch_size
    return [images[i * batch_size : (i + 1) * batch_size] for i in range(count)]


def _mean_report(
    reduced: nn.Module, batches: list[torch.Tensor], amp: bool, amp_dtype: torch.dtype
) -> FlopsReport:
    """Per-image GMACs of `reduced` over all the batches."""
    reports = []
    with precision_context(batches[0].device.type, amp, amp_dtype):
        for x in batches:
            reduced(x)
            reports.append(tokenreduce.flops.gmacs(reduced, tokenreduce.last_info(reduced)))
    return FlopsReport(
        gmacs=torch.cat([r.gmacs for r in reports]),
        overhead_gmacs=torch.cat([r.overhead_gmacs for r in reports]),
    )


def bench_model(
    model: nn.Module,
    model_name: str,
    methods: Sequence[MethodSpec],
    batch_sizes: Sequence[int],
    num_warm_iter: int = 5,
    num_bench_iter: int = 20,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    images: torch.Tensor | None = None,
) -> list[BenchResult]:
    """Benchmark each method against `model` (left unreduced) at each batch size.

    images: real preprocessed images to time on, split into consecutive batches (each timing
    iteration runs the next one; GMACs are their mean), instead of one random batch.
    """
    model = model.to(device).eval()
    img_size = model.patch_embed.img_size
    dense_gmacs = tokenreduce.flops.dense_gmacs(model)
    precision = f"amp-{str(amp_dtype).removeprefix('torch.')}" if amp else "fp32"
    results = []
    for name, options in methods:
        reduced = tokenreduce.apply(copy.deepcopy(model), name, **options)
        for batch_size in batch_sizes:
            if images is None:
                batches = [torch.randn(batch_size, 3, *img_size, device=device)]
            else:
                batches = image_batches(images.to(device), batch_size)
            dense_s, reduced_s = measure_speedup(
                model, reduced, batches, num_warm_iter, num_bench_iter, amp, amp_dtype
            )
            report = _mean_report(reduced, batches, amp, amp_dtype)
            result = BenchResult(
                model=model_name,
                method=name,
                options=format_options(options),
                batch_size=batch_size,
                gmacs=round(report.mean, 4),
                gmacs_with_overhead=round(report.mean_total, 4),
                dense_gmacs=round(dense_gmacs, 4),
                ideal_speedup=round(dense_gmacs / report.mean, 3),
                measured_speedup=round(dense_s / reduced_s, 3),
                dense_ms=round(dense_s * 1e3, 2),
                method_ms=round(reduced_s * 1e3, 2),
                method_img_per_s=round(batch_size / reduced_s, 1),
                device=device,
                precision=precision,
                threads=torch.get_num_threads(),
            )
            logger.info(
                "  %s %s b=%d: %.2fx (ideal %.2fx)",
                name,
                result.options,
                batch_size,
                result.measured_speedup,
                result.ideal_speedup,
            )
            results.append(result)
    return results
