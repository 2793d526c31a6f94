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


def test_a_hook_or_a_compiled_module_takes_the_module_call():
    module = nn.Identity()
    assert plain_call(module)
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(1))
    assert not plain_call(module)
    run(module, torch.zeros(3))
    assert seen == [1]
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(2))
    try:
        assert not plain_call(module)
    finally:
        handle.remove()
    assert plain_call(module)
    module.compile()
    assert not plain_call(module)


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
            # q, k and v come from the packed projection's weights; attention drops no probability
            if name not in ("", "attn", "attn.qkv", "attn.attn_drop")
        ]
        hooked = model(images)
    for handle in handles:
        handle.remove()
    tokenreduce.remove(model)
    assert {"norm1", "ls1", "drop_path1", "mlp", "mlp.fc1", "mlp.drop2", "attn.proj_drop"} <= set(
        seen
    )
    assert all(count == len(model.blocks) for count in seen.values()), seen
    assert torch.equal(hooked, plain)
