"""Model adapters. Only this package knows model classes.

An adapter class serves one model family (`patch.base.ModelAdapter`: the hooks the engine in
`patch.engine` runs a family's blocks through). `adapter_for` asks each registered adapter, in
turn, whether a model is its own (`supports`), the way einops picks a backend; the adapter that
says yes then checks the model in detail (`check_supported`). `patch.attach` puts an `Engine`
on the model; `attached_engine` finds it.

The modules, one concept each: base (the family interface), engine (the block loop, token state
and ragged layout), attention (`attend` and what a block's attention is asked for), pooling,
grids (patch grids), attach (attach / detach and pickling), and one module per family.
"""

from __future__ import annotations

import importlib
from typing import TypeVar

from torch import nn

from tokenreduce.errors import InvalidOptionError, UnsupportedModelError
from tokenreduce.patch.attach import engine_of
from tokenreduce.patch.base import ModelAdapter
from tokenreduce.patch.engine import Engine
from tokenreduce.patch.eva import EvaAdapter
from tokenreduce.patch.grids import PRUNED_RULES, check_pruned_rule
from tokenreduce.patch.timm import TimmAdapter

__all__ = [
    "ADAPTERS",
    "LAZY_ADAPTERS",
    "PRUNED_RULES",
    "Engine",
    "EvaAdapter",
    "ModelAdapter",
    "TimmAdapter",
    "adapter_for",
    "attached_engine",
    "check_pruned_rule",
    "register_adapter",
    "register_lazy_adapter",
]


BUILT_IN = (TimmAdapter, EvaAdapter)
ADAPTERS: list[type[ModelAdapter]] = list(BUILT_IN)
"""Registered adapter classes, asked in order."""

AdapterT = TypeVar("AdapterT", bound=type[ModelAdapter])

LAZY_ADAPTERS: dict[str, str] = {}
"""Adapters of optional families, by the top-level module of the model classes they serve:
"package.module:AdapterClass", imported (and registered) the first time a model of that
family is seen, so that the core never imports an optional dependency."""

LAZY_EXTRAS: dict[str, str] = {}
"""The tokenreduce extra each lazily imported family needs, by top-level module."""


def register_adapter(adapter: AdapterT) -> AdapterT:
    """Add an adapter class for another model family (usable as a class decorator). It is asked
    before those registered earlier, so a family built on timm classes is not taken for timm's."""
    if adapter not in ADAPTERS:
        ADAPTERS.insert(0, adapter)
    return adapter


def register_lazy_adapter(family: str, target: str, extra: str | None = None) -> None:
    """Serve models whose class lives in top-level module `family` (e.g. "transformers") by the
    adapter `target` ("package.module:AdapterClass"), imported when such a model first comes.
    extra: the tokenreduce extra that installs what the adapter needs (named when the import
    fails)."""
    module, _, name = target.partition(":")
    if not module or not name.isidentifier():
        raise InvalidOptionError(
            f"target={target!r} is not accepted; accepted: 'package.module:AdapterClass'"
        )
    LAZY_ADAPTERS[family] = target
    if extra is not None:
        LAZY_EXTRAS[family] = extra


def _import_lazy_adapter(model: nn.Module) -> None:
    families = {cls.__module__.split(".")[0] for cls in type(model).__mro__}
    for family in sorted(families & LAZY_ADAPTERS.keys()):
        module, _, name = LAZY_ADAPTERS[family].partition(":")
        try:
            imported = importlib.import_module(module)
        except ImportError as err:
            if family not in LAZY_EXTRAS:
                raise
            raise UnsupportedModelError(
                f"{type(model).__name__} ({family}) needs tokenreduce's optional extra "
                f"'{LAZY_EXTRAS[family]}': pip install 'tokenreduce[{LAZY_EXTRAS[family]}]' "
                f"({err})"
            ) from err
        register_adapter(getattr(imported, name))
        del LAZY_ADAPTERS[family]  # only once imported: a failed import is raised again


register_lazy_adapter("transformers", "tokenreduce.patch.hf:HFAdapter", extra="hf")
register_lazy_adapter("open_clip", "tokenreduce.patch.openclip:OpenCLIPAdapter", extra="openclip")


def adapter_for(model: nn.Module) -> type[ModelAdapter]:
    """The adapter class for a model; UnsupportedModelError (a TypeError) naming the model's
    class and what each adapter supports when none is."""
    _import_lazy_adapter(model)
    for adapter in ADAPTERS:
        if adapter.supports(model):
            adapter.check_supported(model)
            return adapter
    # the built-in families, then the others by name: one line whatever the process imported
    others = sorted((a for a in ADAPTERS if a not in BUILT_IN), key=lambda a: a.__name__)
    described = [*BUILT_IN, *others]
    supported = "; ".join(adapter.SUPPORTED for adapter in described)
    if LAZY_ADAPTERS:
        supported += "; " + "; ".join(
            f"{family} models (tokenreduce[{LAZY_EXTRAS.get(family, family)}])"
            for family in sorted(LAZY_ADAPTERS)
        )
    raise UnsupportedModelError(
        f"unsupported model class {type(model).__name__}; supported: {supported}"
    )


def attached_engine(model: nn.Module) -> Engine | None:
    """The engine a reduction installed on this model, if any."""
    return engine_of(model)
