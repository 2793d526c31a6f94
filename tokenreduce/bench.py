"""Speed benchmark: dense and reduced model timed interleaved in one process
(docs/measurement.md §2)."""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tokenreduce
from tokenreduce.errors import InvalidOptionError
from tokenreduce.flops import FlopsReport
from tokenreduce.methods.base import make_config
from tokenreduce.options import MethodSpec, format_options
from tokenreduce.patch import attached_engine
from tokenreduce.runtime import precision_context, timed_forward

__all__ = [
    "COMPILE_BACKENDS",
    "DEFAULT_METHODS",
    "NOISY_SPREAD",
    "BenchResult",
    "SpeedRow",
    "Timing",
    "bench_model",
    "bench_onnxruntime",
    "compile_for_timing",
    "fastest_total",
    "image_batches",
    "measure_speedup",
    "median_ms",
    "noise_note",
    "onnxruntime_forward",
    "round_robin",
]


logger = logging.getLogger(__name__)

DEFAULT_METHODS = (
    "tome:r=13",
    "evit:keep_rate=0.7",
    "topk:keep_rate=0.7",
    "ppt:r=50",
    "bat:keep_rate=0.7",
)


NOISY_SPREAD = 0.10
"""A timing is flagged noisy when the dense model's own repeats spread more than this (relative
to their median): the machine was busy, and the speedup is not to be trusted."""


@dataclass(frozen=True)
class Timing:
    """Seconds per batch of each timed iteration, dense and reduced; iteration k ran input k mod
    `inputs`.

    `dense_s` / `reduced_s` summarise them: the median with one input batch, the mean with
    several (each iteration runs the next batch, so the mean covers every image). `best_speedup`
    compares each input's fastest iteration instead: the work is the same every time an input
    runs, so its fastest is the one least disturbed by other processes on a shared machine."""

    dense: list[float]
    reduced: list[float]
    inputs: int = 1

    def _summary(self, times: list[float]) -> float:
        return statistics.fmean(times) if self.inputs > 1 else statistics.median(times)

    @property
    def dense_s(self) -> float:
        return self._summary(self.dense)

    @property
    def reduced_s(self) -> float:
        return self._summary(self.reduced)

    @property
    def speedup(self) -> float:
        return self.dense_s / self.reduced_s

    @property
    def best_speedup(self) -> float:
        return fastest_total(self.dense, self.inputs) / fastest_total(self.reduced, self.inputs)

    @property
    def dense_spread(self) -> float:
        """(max - min) / median of the dense model's iterations: the machine's noise."""
        return (max(self.dense) - min(self.dense)) / statistics.median(self.dense)

    @property
    def spread_measured(self) -> bool:
        """Whether the dense model ran more than once, so that its spread shows the noise."""
        return len(self.dense) > 1

    @property
    def noisy(self) -> bool:
        """Not to be trusted: the dense model's rounds spread more than `NOISY_SPREAD`, or it
        ran once, so that the noise is not measured."""
        return not self.spread_measured or self.dense_spread > NOISY_SPREAD


@dataclass(frozen=True)
class SpeedRow:
    """Cost and measured speed of one reduced model against the dense one (a table row)."""

    method: str
    options: str
    gmacs: float
    gmacs_ratio: float
    ideal_speedup: float
    measured_speedup: float
    dense_spread: float
    noisy: bool
    batch_size: int

    @staticmethod
    def fields_of(
        method: str, options: str, gmacs: float, dense_gmacs: float, timing: Timing, batch: int
    ) -> dict[str, Any]:
        """The row's fields from mean GMACs, the dense GMACs and a timing."""
        return {
            "method": method,
            "options": options,
            "gmacs": round(gmacs, 4),
            "gmacs_ratio": round(gmacs / dense_gmacs, 4),
            "ideal_speedup": round(dense_gmacs / gmacs, 3),
            "measured_speedup": round(timing.speedup, 3),
            "dense_spread": round(timing.dense_spread, 3),
            "noisy": timing.noisy,
            "batch_size": batch,
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    best_speedup: float
    of_ideal: float
    """measured_speedup / ideal_speedup: the share of the saved GMACs that shows as time."""
    dense_ms: float
    method_ms: float
    dense_ms_min: float
    dense_ms_max: float
    method_ms_min: float
    method_ms_max: float
    noisy: bool
    method_img_per_s: float
    device: str
    precision: str
    threads: int
    compiled: str
    """The torch.compile backend the two models were timed with; "" when eager."""
    backend: str = "torch"
    """What ran the two models: torch, or onnxruntime (their ONNX exports, CPU provider)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


COMPILE_BACKENDS = ("inductor", "cudagraphs")
"""torch.compile backends `bench --compile` takes: inductor (generated kernels; CUDA graphs on
CUDA) or cudagraphs (the eager kernels replayed as one CUDA graph: seconds to compile, where
inductor takes tens of seconds per model and shape)."""


def compile_for_timing(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    amp: bool,
    amp_dtype: torch.dtype,
    backend: str = "inductor",
) -> tuple[nn.Module, float]:
    """The model compiled and the seconds its first pass over the batches takes: the
    compilation, kept out of the timed rounds. The dense model and a static reduction compile as
    one graph (`tokenreduce.compile`; with inductor, CUDA graphs on a CUDA model); a reduction that
    reads per-image counts on the host compiles with graph breaks, once more for every new count
    (and cannot be one CUDA graph: the cudagraphs backend is refused for it)."""
    if backend not in COMPILE_BACKENDS:
        raise InvalidOptionError(
            f"--compile: {backend!r} is not a backend here; accepted: "
            + ", ".join(COMPILE_BACKENDS)
        )
    # a sweep compiles every method (and batch size) through the same forward code; past
    # dynamo's default of 8 versions of one code, fullgraph=True would fail instead of falling back
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    engine = attached_engine(model)
    static = engine is None or engine.static
    if backend == "cudagraphs" and not (static and batches[0].device.type == "cuda"):
        raise InvalidOptionError(
            "--compile cudagraphs: needs a CUDA device and a static reduction (every fixed-count "
            f"method; LTMP and AS-ViT with batching=masked); got {batches[0].device.type}"
            + ("" if static else f" and {engine.config.name} with batching={engine.batching.value}")
        )
    if backend == "cudagraphs":
        compiled = torch.compile(model, fullgraph=True, backend="cudagraphs")
    elif static:
        mode = "reduce-overhead" if batches[0].device.type == "cuda" else None
        compiled = torch.compile(model, fullgraph=True, mode=mode)
    else:
        compiled = torch.compile(model)
    start = time.perf_counter()
    with precision_context(batches[0].device.type, amp, amp_dtype):
        for x in batches:
            compiled(x)
    return compiled, time.perf_counter() - start


def measure_speedup(
    dense: nn.Module,
    reduced: nn.Module,
    x: torch.Tensor | Sequence[torch.Tensor],
    num_warm_iter: int,
    num_bench_iter: int,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.bfloat16,
) -> Timing:
    """Dense and reduced, timed alternately on the same input (`round_robin`: which of the two
    runs first alternates, so that a drift of the machine's speed favours neither).

    x: one batch (median over iterations) or several (iteration k runs batch k mod count; mean
    over iterations, so that methods whose cost depends on the image are timed on many).
    """
    batches = [x] if isinstance(x, torch.Tensor) else list(x)
    device = batches[0].device.type
    with precision_context(device, amp, amp_dtype):
        for k in range(num_warm_iter):
            dense(batches[k % len(batches)])
            reduced(batches[k % len(batches)])
        times = round_robin({"dense": dense, "reduced": reduced}, batches, num_bench_iter)
    return Timing(times["dense"], times["reduced"], inputs=len(batches))


def round_robin(
    forwards: Mapping[str, Callable[[Any], Any]], inputs: Sequence[Any], iterations: int
) -> dict[str, list[float]]:
    """Seconds of each forward's call in every iteration: iteration k runs input k mod
    len(inputs) through every forward in turn, in the given order or reversed. The order flips
    from one iteration to the next and, for each input, from one pass over the inputs to the
    next, so that a drift of the machine's speed favours no forward and an input timed twice is
    timed in both orders. Run it under inference mode, after a warm-up.
    """
    names = list(forwards)
    count = len(inputs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for k in range(iterations):
        reverse = (k % count + k // count) % 2 == 1
        for name in names[::-1] if reverse else names:
            times[name].append(timed_forward(forwards[name], inputs[k % count]))
    return times


def side_by_side(
    forwards: Mapping[str, Callable[[Any], Any]],
    images: torch.Tensor,
    rounds: int,
    ideal: Mapping[str, float],
) -> list[str]:
    """Times `forwards` on one batch, interleaved (`round_robin` after 3 warm-up rounds), and
    returns one line per forward: median ms, speedup over the first forward (the baseline) and,
    for a name in `ideal` (its ideal speedup, dense GMACs / its GMACs), the share of it reached.
    Run it under inference mode."""
    round_robin(forwards, [images], 3)
    median = median_ms(round_robin(forwards, [images], rounds))
    baseline = median[next(iter(median))]
    lines = []
    for name, ms in median.items():
        line = f"  {name:9s} {ms:8.2f} ms  {baseline / ms:.3f}x"
        if name in ideal:
            line += f"  (ideal {ideal[name]:.2f}x: {baseline / ms / ideal[name]:.0%})"
        lines.append(line)
    return lines


def median_ms(times: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Median milliseconds of each forward's calls (`round_robin`'s times)."""
    return {name: statistics.median(calls) * 1e3 for name, calls in times.items()}


def fastest_total(times: Sequence[float], inputs: int) -> float:
    """The sum over the inputs of each input's fastest call, where call k ran input k mod
    `inputs` (`round_robin`): the work is the same every time an input runs, so its fastest is
    the one least disturbed by other processes on a shared machine."""
    return sum(min(times[i::inputs]) for i in range(min(inputs, len(times))))


def noise_note(timing: Timing) -> str:
    """A caveat to print beside a noisy speedup, else ""."""
    if not timing.noisy:
        return ""
    if not timing.spread_measured:
        return "  NOISY: one timed round, so the machine's noise is not measured (time 3 or more)"
    return (
        f"  NOISY: the dense model's own rounds spread {timing.dense_spread:.0%} "
        "(another process is using the CPU?)"
    )


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


def _timing_batches(
    images: torch.Tensor | None, batch_size: int, img_size: tuple[int, int], device: str
) -> list[torch.Tensor]:
    """What each timed round runs on: consecutive batches of `images`, else one random batch."""
    if images is None:
        return [torch.randn(batch_size, 3, *img_size, device=device)]
    return image_batches(images.to(device), batch_size)


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
    torch_compile: str | None = None,
) -> list[BenchResult]:
    """Benchmark each method against `model` (left unreduced) at each batch size.

    images: real preprocessed images to time on, split into consecutive batches (each timing
    iteration runs the next one; GMACs are their mean), instead of one random batch.
    torch_compile: time dense and reduced models compiled with this backend (`COMPILE_BACKENDS`;
    each compiled by an untimed pass over the batches before the warm-up rounds; GMACs come from
    the eager reduced model, which computes the same token counts); None: eager.
    """
    model = model.to(device).eval()
    img_size = tokenreduce.describe(model).input_size
    dense_gmacs = tokenreduce.flops.dense_gmacs(model)
    precision = f"amp-{str(amp_dtype).removeprefix('torch.')}" if amp else "fp32"
    results = []
    compiled_dense: dict[int, nn.Module] = {}
    for name, options in methods:
        reduced = tokenreduce.apply(copy.deepcopy(model), name, **options)
        for batch_size in batch_sizes:
            batches = _timing_batches(images, batch_size, img_size, device)
            timed_dense, timed_reduced = model, reduced
            if torch_compile:
                if batch_size not in compiled_dense:
                    compiled_dense[batch_size], seconds = compile_for_timing(
                        model, batches, amp, amp_dtype, torch_compile
                    )
                    logger.info("  compiled for batch %d: dense %.0f s", batch_size, seconds)
                timed_dense = compiled_dense[batch_size]
                timed_reduced, seconds = compile_for_timing(
                    reduced, batches, amp, amp_dtype, torch_compile
                )
                logger.info("  compiled for batch %d: %s %.0f s", batch_size, name, seconds)
            timing = measure_speedup(
                timed_dense, timed_reduced, batches, num_warm_iter, num_bench_iter, amp, amp_dtype
            )
            report = _mean_report(reduced, batches, amp, amp_dtype)
            result = _bench_result(
                model_name,
                (name, options),
                batch_size,
                report,
                dense_gmacs,
                timing,
                device=device,
                precision=precision,
                compiled=torch_compile or "",
            )
            results.append(result)
    return results


def _bench_result(
    model_name: str,
    method: MethodSpec,
    batch_size: int,
    report: FlopsReport,
    dense_gmacs: float,
    timing: Timing,
    **setting: str,
) -> BenchResult:
    """One row of the benchmark, logged as it is made.

    Args:
        model_name: the model as the user named it.
        method: the method's name and options.
        batch_size: images per timed forward.
        report: the reduced model's GMACs over the timed batches.
        dense_gmacs: the dense model's GMACs per image.
        timing: the two models' timed rounds.
        setting: device, precision, compiled and backend (`BenchResult`'s fields).
    """
    name, options = method
    result = BenchResult(
        model=model_name,
        method=name,
        options=format_options(options),
        batch_size=batch_size,
        gmacs=round(report.mean, 4),
        gmacs_with_overhead=round(report.mean_total, 4),
        dense_gmacs=round(dense_gmacs, 4),
        ideal_speedup=round(dense_gmacs / report.mean, 3),
        measured_speedup=round(timing.speedup, 3),
        best_speedup=round(timing.best_speedup, 3),
        of_ideal=round(timing.speedup * report.mean / dense_gmacs, 3),
        dense_ms=round(timing.dense_s * 1e3, 2),
        method_ms=round(timing.reduced_s * 1e3, 2),
        dense_ms_min=round(min(timing.dense) * 1e3, 2),
        dense_ms_max=round(max(timing.dense) * 1e3, 2),
        method_ms_min=round(min(timing.reduced) * 1e3, 2),
        method_ms_max=round(max(timing.reduced) * 1e3, 2),
        noisy=timing.noisy,
        method_img_per_s=round(batch_size / timing.reduced_s, 1),
        threads=torch.get_num_threads(),
        **setting,
    )
    logger.info(
        "  %s %s b=%d: %.2fx (fastest rounds %.2fx, ideal %.2fx)%s",
        name,
        result.options,
        batch_size,
        result.measured_speedup,
        result.best_speedup,
        result.ideal_speedup,
        noise_note(timing),
    )
    return result


def onnxruntime_forward(path: Path, threads: int) -> Callable[[torch.Tensor], list[Any]]:
    """A forward that runs the ONNX file in ONNX Runtime on the CPU execution provider, with
    `threads` intra-op threads (one inter-op thread, as torch's CPU forward), on CPU tensors.

    Args:
        path: an ONNX file with one input.
        threads: intra-op threads (`torch.get_num_threads()`, so that both backends get the same).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def forward(images: torch.Tensor) -> list[Any]:
        return session.run(None, {input_name: images.numpy()})

    return forward


def bench_onnxruntime(
    model: nn.Module,
    model_name: str,
    methods: Sequence[MethodSpec],
    batch_sizes: Sequence[int],
    num_warm_iter: int = 5,
    num_bench_iter: int = 20,
    images: torch.Tensor | None = None,
) -> list[BenchResult]:
    """`bench_model` in ONNX Runtime: the dense model and each reduced one exported to ONNX (a
    temporary folder; dynamic batch) and timed interleaved in this process on the CPU execution
    provider (`measure_speedup`), with as many threads as torch uses. GMACs come from the
    PyTorch reduced model, which computes the same token counts.

    Args:
        model: the dense model (left unreduced); every method must be static (`export`).
        model_name: the model as the user named it.
        methods: the methods' names and options.
        batch_sizes: images per timed forward.
        num_warm_iter: untimed rounds before timing.
        num_bench_iter: timed rounds, each one dense then one reduced forward.
        images: real preprocessed images to time on (as `bench_model`'s), else one random batch.
    """
    from tokenreduce.exporting import check_exportable, check_onnx_packages, export

    check_onnx_packages("--backend onnxruntime")
    configs = [make_config(name, **options) for name, options in methods]
    for config in configs:
        check_exportable(config)
    model = model.cpu().eval()
    img_size = tokenreduce.describe(model).input_size
    dense_gmacs = tokenreduce.flops.dense_gmacs(model)
    threads = torch.get_num_threads()
    example = None if images is None else images[:2]
    results = []
    with tempfile.TemporaryDirectory(prefix="tokenreduce-onnx-") as folder:
        start = time.perf_counter()
        dense = onnxruntime_forward(export(model, Path(folder) / "dense.onnx", example), threads)
        logger.info("  exported dense to ONNX: %.0f s", time.perf_counter() - start)
        for index, ((name, options), config) in enumerate(zip(methods, configs, strict=True)):
            reduced_model = tokenreduce.apply(copy.deepcopy(model), config)
            start = time.perf_counter()
            path = export(reduced_model, Path(folder) / f"{index}_{name}.onnx", example)
            reduced = onnxruntime_forward(path, threads)
            logger.info("  exported %s to ONNX: %.0f s", name, time.perf_counter() - start)
            for batch_size in batch_sizes:
                batches = _timing_batches(images, batch_size, img_size, "cpu")
                timing = measure_speedup(dense, reduced, batches, num_warm_iter, num_bench_iter)
                report = _mean_report(reduced_model, batches, False, torch.float32)
                result = _bench_result(
                    model_name,
                    (name, options),
                    batch_size,
                    report,
                    dense_gmacs,
                    timing,
                    device="cpu",
                    precision="fp32",
                    compiled="",
                    backend="onnxruntime",
                )
                results.append(result)
    return results
