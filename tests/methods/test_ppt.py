"""PPT semantics beyond the fixtures: branch selection, equivalence with ToMe, static shapes."""

from __future__ import annotations

import math

import pytest
import torch

import tokenreduce
from tests.conftest import tiny_vit
from tokenreduce.state import TokenState


def forward(model, x):
    with torch.no_grad():
        return model(x), tokenreduce.last_info(model)


def test_threshold_zero_prunes_and_infinity_pools():
    x = torch.randn(3, 3, 224, 224)
    model = tiny_vit()
    _, info = forward(tokenreduce.apply(model, "ppt", threshold=0.0), x)
    assert (info.records.policy == 1).all()
    pooled, info = forward(tokenreduce.apply(model, "ppt", threshold=math.inf), x)
    assert (info.records.policy == 0).all()
    tome, _ = forward(tokenreduce.apply(model, "tome", r=[0, 0, 0, 50, 0, 0, 50, 0, 0, 50]), x)
    torch.testing.assert_close(pooled, tome, atol=1e-5, rtol=1e-5)


def test_pruning_branch_equals_topk_by_ppt_score():
    model = tokenreduce.apply(tiny_vit(), "ppt", threshold=0.0, r=20, trace_source=True)
    _, info = forward(model, torch.randn(2, 3, 224, 224))
    assert info.tokens_per_block[0].tolist() == [197] * 3 + [177] * 3 + [157] * 3 + [137] * 3
    assert info.records.score_variance.shape == (2, 3) and (info.records.score_variance > 0).all()


def test_policy_and_variance_shapes_for_custom_layers():
    model = tokenreduce.apply(tiny_vit(), "ppt", layers=(1, 5), r=(10, 20))
    _, info = forward(model, torch.randn(4, 3, 224, 224))
    assert info.records.policy.shape == (4, 2) and info.records.policy.dtype == torch.long
    assert info.tokens_per_block[0].tolist() == [197, 187, 187, 187, 187, 167] + [167] * 6


@pytest.mark.parametrize("method", ["ppt", "evit", "tome", "topk", "bat"])
def test_reducing_block_compiles_without_graph_breaks(method):
    model = tiny_vit()
    tokenreduce.apply(model, method, trace_source=True)
    engine = tokenreduce.patch.attached_engine(model)
    block_index = engine.steps.index(next(s for s in engine.steps if s is not None))
    block, step = model.blocks[block_index], engine.steps[block_index]
    state = TokenState(
        num_prefix=1, size=torch.rand(2, 197, 1) + 1, source=torch.eye(197).expand(2, -1, -1)
    )
    x = torch.randn(2, 197, 192)

    def run(x, size, source):
        out, new_state, record, _, _ = engine.block_forward(
            block, x, TokenState(num_prefix=1, size=size, source=source), step
        )
        return out, new_state.size, new_state.source, record

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = compiled(x, state.size, state.source)
        want = run(x, state.size, state.source)
    torch.testing.assert_close(got[0], want[0])


@pytest.mark.parametrize("precision", ["bf16-autocast", "fp16-autocast", "half"])
def test_ppt_runs_in_low_precision(precision):
    model = tiny_vit()
    x = torch.randn(2, 3, 224, 224)
    tokenreduce.apply(model, "ppt", threshold=1.55e-4)
    with torch.no_grad():
        reference = model(x)
        if precision == "half":
            out = model.half()(x.half())
        else:
            dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
            with torch.autocast("cpu", dtype=dtype):
                out = model(x)
    info = tokenreduce.last_info(model)
    assert torch.isfinite(out).all()
    assert info.tokens_per_block[0, -1] == 49
    assert torch.nn.functional.cosine_similarity(out.float(), reference, dim=-1).min() > 0.9


def test_compiled_model_matches_eager():
    model = tokenreduce.apply(tiny_vit(), "ppt", threshold=1.55e-4)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")(x)
    torch.testing.assert_close(compiled, eager)
    assert tokenreduce.last_info(model).tokens_per_block[0, -1] == 49
