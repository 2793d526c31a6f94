"""Public entry points: apply, remove, last_info, describe, patch_features, methods."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError
from tokenreduce.info import ReductionInfo
from tokenreduce.methods.base import MethodConfig, make_config, method_names
from tokenreduce.patch import adapter_for, attached_engine
from tokenreduce.patch.attach import attach, detach
from tokenreduce.patch.engine import Engine
from tokenreduce.patch.grids import check_images, check_pruned_rule
from tokenreduce.recipe import is_recipe_path, recipe_config

__all__ = ["apply", "compile", "describe", "last_info", "methods", "patch_features", "remove"]


def apply(model: nn.Module, method: str | MethodConfig, **options: Any) -> nn.Module:
    """Add a token reduction to `model` in place and return it.

    method: a registered name ("tome", "evit", "topk", "ppt", ...), a config dataclass, or a
    recipe file from `tokenreduce tune --out` (refused when tuned for another model); options
    override config fields. A reduction applied earlier is replaced (and kept when the new one
    is refused).
    """
    if is_recipe_path(method):
        method = recipe_config(method, describe(model))
    config = make_config(method, **options)
    adapter_class = adapter_for(model)
    config.validate(adapter_class.describe(model))  # a refused config leaves the model as it was
    if attached_engine(model) is not None:
        remove(model)
    attach(model, Engine(model, config, adapter_class))
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: the model is again its original class, bit for bit."""
    if attached_engine(model) is None:
        raise InvalidOptionError(f"model {type(model).__name__} has no token reduction to remove")
    detach(model)
    return model


def last_info(model: nn.Module) -> ReductionInfo:
    """What the last forward pass of `model` in this thread did."""
    engine = attached_engine(model)
    if engine is None:
        raise InvalidOptionError(
            f"model {type(model).__name__} has no token reduction; call tokenreduce.apply first"
        )
    return engine.last_info()


def compile(model: nn.Module, mode: str | None = "auto", backend: str = "inductor") -> nn.Module:
    """The reduced model compiled as one graph: `torch.compile(model, fullgraph=True)`.

    Only a static reduction compiles whole (every fixed-count method; LTMP and AS-ViT with
    batching="masked"): one that reads per-image counts on the host is refused. mode: passed to
    torch.compile; "auto" captures CUDA graphs on a CUDA model ("reduce-overhead") and uses the
    default elsewhere. The first calls compile (once per input shape).
    """
    if not (callable(backend) or backend in torch._dynamo.list_backends(exclude_tags=())):
        raise InvalidOptionError(
            f"compile: backend={backend!r} is not a torch.compile backend; accepted: "
            f"{', '.join(torch._dynamo.list_backends())}, or a callable"
        )
    if backend == "inductor":
        modes = ["auto", None, *torch._inductor.list_mode_options()]
        if mode not in modes:
            raise InvalidOptionError(
                f"compile: mode={mode!r} is not accepted; accepted: {', '.join(map(repr, modes))}"
            )
    elif mode not in ("auto", None):
        raise InvalidOptionError(
            f"compile: mode={mode!r} applies to the inductor backend only; accepted with "
            f"backend={backend!r}: None"
        )
    engine = attached_engine(model)
    if engine is None:
        raise InvalidOptionError(
            f"model {type(model).__name__} has no token reduction; call tokenreduce.apply first "
            "(or torch.compile the dense model)"
        )
    if not engine.static:
        raise InvalidOptionError(
            f"{engine.config.name}: batching={engine.batching.value!r} reads each image's token "
            "count on the host, so the model cannot compile as one graph; accepted: "
            "batching='masked' (static shapes), or torch.compile(model) with graph breaks"
        )
    if mode == "auto":
        on_cuda = any(p.is_cuda for p in model.parameters())
        mode = "reduce-overhead" if on_cuda and backend == "inductor" else None
    compiled = torch.compile(model, fullgraph=True, mode=mode, backend=backend)
    # the reduced forward's own image check would raise inside the graph, where dynamo reports
    # its failure to trace the raise instead; a hook of the wrapper runs before the graph
    compiled.register_forward_pre_hook(partial(_check_compiled_images, model), with_kwargs=True)
    return compiled


def _check_compiled_images(
    model: nn.Module, compiled: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> None:
    """The reduced forward's image check, run on a compiled model's call before its graph."""
    images = args[0] if args else kwargs.get("pixel_values", kwargs.get("x"))
    interpolated = kwargs.get("interpolate_pos_encoding")  # transformers: any size then
    size = None if interpolated else adapter_for(model).fixed_input_size(model)
    check_images(model, images, size, min_batch=0)


def describe(model: nn.Module) -> ModelDims:
    """The facts of a supported model, reduced or not: its family, depth, width, heads, prefix
    and patch counts, input and grid size, and the MAC coefficients the GMACs model reads."""
    return adapter_for(model).describe(model)


def patch_features(model: nn.Module, images: torch.Tensor, pruned: str = "exit") -> torch.Tensor:
    """Final features of every original token, prefix first: [B, P + H * W, C] (what the
    unreduced model's `forward_features` returns), for dense heads on a reduced model.

    A merged token's feature goes to every patch it holds; a patch whose token was pruned (or
    fused) gets the feature that token had when it left, through the final norm
    (pruned="exit"), zeros (pruned="zero"), or the feature of the nearest patch on the grid that
    a token still holds (pruned="nearest"). docs/methods.md §1.8.
    """
    check_pruned_rule(pruned)
    adapter = adapter_for(model)
    check_images(model, images, adapter.fixed_input_size(model))
    return adapter.grid_features(model, images, pruned)


def methods() -> list[str]:
    """Names of the registered methods."""
    return method_names()
