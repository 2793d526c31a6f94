"""Model adapters. Only this package knows model classes.

An adapter class serves one model family. `adapter_for` asks each registered adapter, in turn,
whether a model is its own (`supports`), the way einops picks a backend; the adapter that says
yes then checks the model in detail (`check_supported`) and runs its reducing forward.
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from tokenreduce.errors import UnsupportedModelError
from tokenreduce.patch.timm import ADAPTER_ATTR, TimmAdapter

ADAPTERS: list[type[TimmAdapter]] = [TimmAdapter]
"""Registered adapter classes, asked in order."""

AdapterT = TypeVar("AdapterT", bound=type[TimmAdapter])


def register_adapter(adapter: AdapterT) -> AdapterT:
    """Add an adapter class for another model family (usable as a class decorator). It is asked
    before those registered earlier, so a family built on timm classes is not taken for timm's."""
    if adapter not in ADAPTERS:
        ADAPTERS.insert(0, adapter)
    return adapter


def adapter_for(model: nn.Module) -> type[TimmAdapter]:
    """The adapter class for a model; UnsupportedModelError (a TypeError) naming the model's
    class and what each adapter supports when none is."""
    for adapter in ADAPTERS:
        if adapter.supports(model):
            adapter.check_supported(model)
            return adapter
    supported = "; ".join(adapter.SUPPORTED for adapter in ADAPTERS)
    raise UnsupportedModelError(
        f"unsupported model class {type(model).__name__}; supported: {supported}"
    )


def attached_adapter(model: nn.Module) -> TimmAdapter | None:
    """The adapter a reduction installed on this model, if any."""
    return getattr(model, ADAPTER_ATTR, None)


__all__ = ["ADAPTERS", "TimmAdapter", "adapter_for", "attached_adapter", "register_adapter"]
