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
    """`model(x)` and its wall seconds, synchronising the GPU before and after when x is on
    CUDA."""
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model(x)
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def timed_forward(model: nn.Module, x: torch.Tensor) -> float:
    """Wall seconds of `model(x)` (see `timed_call`)."""
    return timed_call(model, x)[1]


def progress_bar(total: int, enabled: bool, unit: str = "img") -> tqdm:
    """A tqdm bar on stderr, silent when not `enabled` (e.g. on ranks other than 0)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, disable=not enabled, dynamic_ncols=True)
