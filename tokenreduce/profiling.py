"""What a forward asks of the machine beyond its arithmetic: the ATen operators it dispatches (on
a GPU below batch ~256 each is a kernel launch that costs its time whatever its size) and the
device values it reads on the host (each one stalls the stream and rules out a CUDA graph).
Counted on any device, so that the CPU measures the GPU path's launches and syncs
(docs/measurement.md §2)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "HOST_READ_METHODS",
    "SYNCING_OPERATORS",
    "VIEW_OPERATORS",
    "HostSyncs",
    "OperatorCount",
    "host_syncs",
    "is_syncing",
    "operators_per_forward",
]


VIEW_OPERATORS = frozenset(
    {
        "view", "_unsafe_view", "unsqueeze", "squeeze", "transpose", "permute", "expand",
        "slice", "select", "t", "as_strided", "alias", "unbind", "split", "split_with_sizes",
        "chunk", "unflatten", "detach", "narrow", "diagonal", "reshape", "flatten", "view_as",
    }
)  # fmt: skip
"""Operators that only view their input (no kernel)."""

HOST_READ_METHODS = frozenset(
    {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy"}
)
"""Tensor methods that hand a device value to Python (on the CPU `tolist` reads memory without
dispatching an operator, so these are caught where they are called)."""

SYNCING_OPERATORS = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten.masked_select",
        "aten.unique",
        "aten._unique",
        "aten._unique2",
        "aten.unique_dim",
        "aten.unique_consecutive",
        "aten.repeat_interleave.Tensor",
        "aten.is_nonzero",
        "aten.equal",
        "aten.allclose",
    }
)
"""Operators (or single overloads) whose output shape or value needs the device's data on the
host. `nonzero_static`, given its size, needs none."""


def is_syncing(func: Any) -> bool:
    """Whether an ATen operator overload (`aten.nonzero.default`) is one of `SYNCING_OPERATORS`."""
    name = str(func)
    return name in SYNCING_OPERATORS or name.rsplit(".", 1)[0] in SYNCING_OPERATORS


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it, by name, views excluded."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEW_OPERATORS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class _HostReadCalls(TorchFunctionMode):
    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READ_METHODS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


class _SyncingOperatorCalls(TorchDispatchMode):
    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_syncing(func):
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


class HostSyncs:
    """Records, in `calls`, every host read of a device value and every syncing operator inside
    it, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._modes = (_HostReadCalls(self.calls), _SyncingOperatorCalls(self.calls))

    def __enter__(self) -> HostSyncs:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def operators_per_forward(
    forward: Callable[[torch.Tensor], Any], x: torch.Tensor
) -> collections.Counter[str]:
    """The ATen operators (views excluded) that one `forward(x)` dispatches, by name."""
    with torch.inference_mode(), OperatorCount() as count:
        forward(x)
    return count.counts


def host_syncs(forward: Callable[[torch.Tensor], Any], x: torch.Tensor) -> list[str]:
    """The host reads and syncing operators of one `forward(x)`, in order."""
    with torch.no_grad(), HostSyncs() as syncs:
        forward(x)
    return syncs.calls
