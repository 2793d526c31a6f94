"""`patch.calls.run`: a block's submodules called without `module(x)`'s bookkeeping, with the
same results, and `module(x)` itself wherever a hook or a compiled module could tell."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tokenreduce
from tests.conftest import peaky_vit
from tokenreduce.patch.calls import plain_call, run


@pytest.mark.parametrize(
    "module",
    [nn.Identity(), nn.Dropout(0.3).eval(), nn.Dropout(0.0).train(), nn.LayerNorm(8), nn.GELU()],
    ids=["identity", "dropout-eval", "dropout-p0-train", "layernorm", "gelu"],
)
def test_run_equals_the_module_call(module):
    x = torch.randn(2, 5, 8)
    assert torch.equal(run(module, x), module(x))


def test_dropout_in_training_still_drops():
    torch.manual_seed(0)
    out = run(nn.Dropout(0.5).train(), torch.ones(1000))
    assert (out == 0).any() and (out == 2).any()


def _forward_hook(module: nn.Module):
    return module.register_forward_hook(lambda m, args, out: None)


def _forward_pre_hook(module: nn.Module):
    return module.register_forward_pre_hook(lambda m, args: None)


def _backward_hook(module: nn.Module):
    return module.register_full_backward_hook(lambda m, grad_in, grad_out: None)


def _backward_pre_hook(module: nn.Module):
    return module.register_full_backward_pre_hook(lambda m, grad_out: None)


def _global_forward_hook(module: nn.Module):
    return nn.modules.module.register_module_forward_hook(lambda m, args, out: None)


def _global_forward_pre_hook(module: nn.Module):
    return nn.modules.module.register_module_forward_pre_hook(lambda m, args: None)


def _global_backward_hook(module: nn.Module):
    return nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None)


def _global_backward_pre_hook(module: nn.Module):
    return nn.modules.module.register_module_full_backward_pre_hook(lambda m, go: None)


@pytest.mark.parametrize(
    "register",
    [
        _forward_hook,
        _forward_pre_hook,
        _backward_hook,
        _backward_pre_hook,
        _global_forward_hook,
        _global_forward_pre_hook,
        _global_backward_hook,
        _global_backward_pre_hook,
    ],
)
def test_any_hook_takes_the_module_call(register):
    module = nn.Linear(3, 3)
    assert plain_call(module)
    handle = register(module)
    try:
        assert not plain_call(module)
    finally:
        handle.remove()
    assert plain_call(module)


def test_a_forward_hook_sees_the_call_and_changes_the_output():
    module = nn.Identity()
    handle = module.register_forward_hook(lambda m, args, out: out + 1)
    assert torch.equal(run(module, torch.zeros(3)), torch.ones(3))
    handle.remove()


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # still in torch
def test_a_compiled_module_an_overridden_call_and_tracers_take_the_module_call():
    module = nn.Linear(3, 3)
    module.compile()
    assert not plain_call(module)

    class Wrapped(nn.Linear):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    assert not plain_call(Wrapped(3, 3))
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(plain_call(self))
            return x

    probe = Probe()
    torch.jit.trace(probe, torch.zeros(3), check_trace=False)
    torch.fx.symbolic_trace(probe)
    assert seen == [False, False]
    assert plain_call(probe)


@pytest.mark.parametrize("method", ["tome", "ltmp"])
def test_hooks_on_every_submodule_of_a_reduced_block_are_called(method):
    """A forward hook on any submodule of the blocks (norms, layer scales, drop paths, dropouts,
    the MLP and its layers, the output projection) sees every block's call, and the outputs are
    those without hooks."""
    model = peaky_vit()
    options = {"r": 4} if method == "tome" else {"merge_thresholds": 0.5}
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    tokenreduce.apply(model, method, **options)
    seen: dict[str, int] = {}
    with torch.no_grad():
        plain = model(images)
        handles = [
            module.register_forward_hook(
                lambda m, args, out, name=name: seen.__setitem__(name, seen.get(name, 0) + 1)
            )
            for block in model.blocks
            for name, module in block.named_modules()
            # q, k and v come from the packed projection's weights; attention drops no
            # probability; the MLP is left unhooked so that its layers run one by one
            if name not in ("", "attn", "attn.qkv", "attn.attn_drop", "mlp")
        ]
        hooked = model(images)
    for handle in handles:
        handle.remove()
    tokenreduce.remove(model)
    expected = {"norm1", "ls1", "drop_path1", "attn.proj_drop", "mlp.fc1", "mlp.act", "mlp.drop2"}
    assert expected <= set(seen)
    assert all(count == len(model.blocks) for count in seen.values()), seen
    assert torch.equal(hooked, plain)
