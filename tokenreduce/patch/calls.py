"""Calling a block's submodules the way `module(x)` does, without its bookkeeping where it has
nothing to do.

A reducing block runs its submodules one by one (norms, projections, layer scales, drop paths,
dropouts). At batch 1 on a CPU every operation costs about its dispatch, and `module(x)` adds
about 1.3 µs of hook checks to each call, and an `nn.Dropout` outside training 3 µs more to
return its input: some 40 µs per block of a timm ViT, as much as a dozen small tensor
operations. `run` takes the same result by the shortest way, and `module(x)` itself wherever
anything could see the difference: a hook on the module or a global one, a compiled module, a
TorchScript trace, a tracer that replaces `nn.Module.__call__` (torch.fx, and with it
`torch.export`, which record each module call).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as torch_module

__all__ = ["plain_call", "run"]

_MODULE_CALL = nn.Module.__call__


def plain_call(module: nn.Module) -> bool:
    """Whether `module(x)` is exactly `module.forward(x)`: no hook on the module or registered
    globally, not compiled (`nn.Module.compile`), no TorchScript trace running (the checks of
    `nn.Module.__call__`), and `__call__` itself neither overridden by the module's class nor
    replaced by a tracer (torch.fx)."""
    return not (
        type(module).__call__ is not _MODULE_CALL
        or module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or module._compiled_call_impl is not None
        or torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
        or torch._C._get_tracing_state()
    )


def run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, the same result: x itself for an identity (`nn.Identity`, an `nn.Dropout`
    outside training or with p = 0), else `module.forward(x)`, and `module(x)` where
    `plain_call` says the two could differ."""
    if not plain_call(module):
        return module(x)
    kind = type(module)
    if kind is nn.Identity or (kind is nn.Dropout and (not module.training or module.p == 0)):
        return x
    return module.forward(x)
