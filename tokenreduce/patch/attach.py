"""Putting a reduction on a model and taking it off: the model's class is swapped for a subclass
made at run time whose members run through the engine; parameters and modules are untouched, so
`detach` gives back the original model bit for bit. Pickling stores the original model and the
config and applies the reduction again on load.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tokenreduce.methods.base import MethodConfig
from tokenreduce.patch.base import ModelAdapter
from tokenreduce.patch.engine import Engine

__all__ = ["attach", "detach", "engine_of", "reducing_class"]

ENGINE_ATTR = "_tokenreduce"
"""Name of the attribute of a reduced module that holds its engine."""


def engine_of(model: nn.Module) -> Engine | None:
    """The engine a reduction put on this model (or on this base model of a wrapper), or None."""
    return getattr(model, ENGINE_ATTR, None)


def attach(model: nn.Module, engine: Engine) -> None:
    """Put `engine` on the model: each module the family reduces gets the engine and the
    reducing subclass of its class."""
    for module in engine.adapter.reduced_modules(model):
        if engine_of(module) is not None:  # a base model restored from a pickle carries its own
            _restore_class(module)
        setattr(module, ENGINE_ATTR, engine)
        module.__class__ = reducing_class(type(module), type(engine.adapter))


def detach(model: nn.Module) -> None:
    """Take the reduction off: every reduced module is its original class again, and the
    trainable parameters of a learned method's training are removed."""
    engine = engine_of(model)
    engine.set_trainable(model, None)
    for module in engine.adapter.reduced_modules(model):
        _restore_class(module)


def _restore_class(module: nn.Module) -> None:
    module.__class__ = type(module).__bases__[0]
    delattr(module, ENGINE_ATTR)


def restore_reduced(
    cls: type[nn.Module],
    state: dict[str, Any],
    config: MethodConfig,
    adapter_class: type[ModelAdapter],
) -> nn.Module:
    """A pickled reduced model: the original model of class `cls`, `config` applied again."""
    model = cls.__new__(cls)
    model.__setstate__(state)
    attach(model, Engine(model, config, adapter_class))
    return model


def _reduce_ex(self: nn.Module, protocol: int) -> tuple:
    # the reducing class is made at run time, so pickle (torch.save, deepcopy) stores the
    # original model and the config, and re-applies the reduction when it loads them
    # (the original class is the reducing class's base: an adapter may reduce a submodule too)
    engine = engine_of(self)
    state = {k: v for k, v in self.__dict__.items() if k != ENGINE_ATTR}
    original = type(self).__bases__[0]
    return (restore_reduced, (original, state, engine.config, type(engine.adapter)))


_REDUCING_CLASSES: dict[tuple[type, type], type] = {}


def reducing_class(cls: type[nn.Module], adapter_class: type[ModelAdapter]) -> type[nn.Module]:
    """A subclass of the model's class with the adapter's reducing members (made once per class)."""
    key = (cls, adapter_class)
    if key not in _REDUCING_CLASSES:
        members = {**adapter_class.reducing_members(cls), "__reduce_ex__": _reduce_ex}
        members["__module__"] = __name__
        _REDUCING_CLASSES[key] = type(f"TokenReduce{cls.__name__}", (cls,), members)
    return _REDUCING_CLASSES[key]
