"""How the workflows run a model: inference precision, timing of one call, progress bars."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

__all__ = ["precision_context", "progress_bar", "timed_call", "timed_forward"]


if TYPE_CHECKING:
    from tqdm import tqdm


@contextlib.contextmanager
def precision_context(device: str, amp: bool, amp_dtype: torch.dtype) -> Iterator[None]:
    """Inference mode, under autocast to `amp_dtype` on `device` when `amp`."""
    with torch.inference_mode():
        if amp:
            with torch.autocast(device_type=device, dtype=amp_dtype):
                yield
        else:
            yield


def timed_call(model: nn.Module, x: torch.Tensor) -> tuple[Any, float]:
    """`model(x)` and its seconds: wall time on a CPU; on CUDA the time between two CUDA events
    recorded around the call on the current stream (the GPU's own clock, after the work queued
    before the call has finished, so a launch-bound model is timed with its launches)."""
    if x.device.type != "cuda":
        start = time.perf_counter()
        out = model(x)
        return out, time.perf_counter() - start
    torch.cuda.synchronize(x.device)
    start_event = torch.cuda.Event(enable_timing=True)
    end_event = torch.cuda.Event(enable_timing=True)
    start_event.record()
    out = model(x)
    end_event.record()
    end_event.synchronize()
    return out, start_event.elapsed_time(end_event) / 1e3


def timed_forward(model: nn.Module, x: torch.Tensor) -> float:
    """Wall seconds of `model(x)` (see `timed_call`)."""
    return timed_call(model, x)[1]


def progress_bar(total: int, enabled: bool, unit: str = "img") -> tqdm:
    """A tqdm bar on stderr, silent when not `enabled` (e.g. on ranks other than 0)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, disable=not enabled, dynamic_ncols=True)
