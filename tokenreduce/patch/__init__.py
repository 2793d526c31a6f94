"""Model adapters. Only this package knows model classes; pick the adapter for a model here."""

from __future__ import annotations

from torch import nn

from tokenreduce.patch.timm import TimmAdapter


def adapter_for(model: nn.Module) -> type[TimmAdapter]:
    """The adapter class for a model, or TypeError naming what is supported."""
    TimmAdapter.check_supported(model)
    return TimmAdapter


def attached_adapter(model: nn.Module) -> TimmAdapter | None:
    """The adapter a reduction installed on this model, if any."""
    return getattr(model, TimmAdapter.ATTR, None)


__all__ = ["TimmAdapter", "adapter_for", "attached_adapter"]
