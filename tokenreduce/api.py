"""Public entry points: apply, remove, last_info, methods."""

from __future__ import annotations

from typing import Any

from torch import nn

from tokenreduce.errors import InvalidOptionError
from tokenreduce.info import ReductionInfo
from tokenreduce.methods.base import MethodConfig, make_config, method_names
from tokenreduce.patch import adapter_for, attached_adapter


def apply(model: nn.Module, method: str | MethodConfig, **options: Any) -> nn.Module:
    """Add a token reduction to `model` in place and return it.

    method: a registered name ("tome", "evit", "topk", "ppt", ...) or a config dataclass;
    options override config fields. A reduction applied earlier is replaced (and kept when the
    new one is refused).
    """
    config = make_config(method, **options)
    adapter_class = adapter_for(model)
    config.validate(adapter_class.describe(model))  # a refused config leaves the model as it was
    if attached_adapter(model) is not None:
        remove(model)
    adapter_class(model, config).attach(model)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: the model is again its original class, bit for bit."""
    adapter = attached_adapter(model)
    if adapter is None:
        raise InvalidOptionError(f"model {type(model).__name__} has no token reduction to remove")
    adapter.detach(model)
    return model


def last_info(model: nn.Module) -> ReductionInfo:
    """What the last forward pass of `model` in this thread did."""
    adapter = attached_adapter(model)
    if adapter is None:
        raise InvalidOptionError(
            f"model {type(model).__name__} has no token reduction; call tokenreduce.apply first"
        )
    return adapter.last_info()


def methods() -> list[str]:
    """Names of the registered methods."""
    return method_names()
