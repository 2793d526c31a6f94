"""The shared reduction steps (methods/steps.py) on hand-made tokens: every carried tensor
follows a keep, a merge and a fused token, and the state takes every per-token field."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from tokenreduce.methods.steps import (
    Tokens,
    carried,
    kept_rows,
    kept_tokens,
    merged_tokens,
    with_fused_token,
)
from tokenreduce.ops import bipartite_soft_matching
from tokenreduce.state import TokenState


def five_tokens(batch: int = 2) -> tuple[torch.Tensor, TokenState]:
    """A prefix and 4 tokens per image, each with distinct features, sizes 1..5, a source map
    over 5 original tokens, grid positions and the identity owner map."""
    x = torch.arange(batch * 5 * 3, dtype=torch.float64).view(batch, 5, 3)
    state = TokenState(
        num_prefix=1,
        size=torch.arange(1.0, 6.0, dtype=torch.float64).view(1, 5, 1).repeat(batch, 1, 1),
        source=torch.eye(5, dtype=torch.float64).expand(batch, -1, -1),
        position=torch.arange(10.0, dtype=torch.float64).view(1, 5, 2).repeat(batch, 1, 1),
        owner=torch.arange(5).expand(batch, -1),
    )
    return x, state


def test_kept_rows_gathers_every_carried_tensor_and_pads_with_nothing():
    x, state = five_tokens()
    rows = torch.tensor([[0, 3, 1], [0, 2, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    kept = kept_rows(carried(x, state, state.size), rows, valid)
    assert torch.equal(kept.x[0], x[0, [0, 3, 1]])
    assert torch.equal(kept.x[1], torch.stack([x[1, 0], x[1, 2], torch.zeros(3, dtype=x.dtype)]))
    assert kept.size[:, :, 0].tolist() == [[1, 4, 2], [1, 3, 0]]  # padding: size 0
    assert torch.equal(kept.source[0], state.source[0, [0, 3, 1]])
    assert not kept.source[1, 2].any() and not kept.position[1, 2].any()
    assert kept.valid is valid
    assert kept.owner.tolist() == [[0, 2, -1, 1, -1], [0, -1, 1, -1, -1]]


def test_kept_tokens_keeps_the_prefix_then_the_best_in_descending_score():
    x, state = five_tokens(batch=1)
    score = torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    kept, idx = kept_tokens(carried(x, state, state.size), 1, score, 2)
    assert idx.tolist() == [[1, 2]]
    assert kept.size[0, :, 0].tolist() == [1, 3, 4]
    assert kept.owner.tolist() == [[0, -1, 1, 2, -1]]
    assert kept.valid is None


def test_merged_tokens_carry_sizes_sources_positions_and_owners():
    x, state = five_tokens(batch=1)
    metric = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [0, 1], [0, 1]]])
    matching = bipartite_soft_matching(metric, 1, num_prefix=1)
    merged = merged_tokens(matching, carried(x, state, state.size), False)
    # token 2 (A, size 3) merges into token 3 (B, size 4): [0, 4 (A kept), 1, 3 + 2]
    assert merged.size[0, :, 0].tolist() == [1, 5, 2, 7]
    assert merged.source[0, 3].tolist() == [0, 0, 1, 1, 0]
    position = (3 * state.position[0, 2] + 4 * state.position[0, 3]) / 7
    torch.testing.assert_close(merged.position[0, 3], position)
    assert merged.owner.tolist() == [[0, 2, 3, 3, 1]]
    destination = merged_tokens(matching, carried(x, state, state.size), True)
    assert torch.equal(destination.position[0, 3], state.position[0, 3])


def test_fused_token_sums_the_dropped_and_holds_none_of_them():
    x, state = five_tokens(batch=1)
    tokens = carried(x, state, state.size)
    score = torch.tensor([[0.1, 0.4, 0.3, 0.2]], dtype=torch.float64)
    kept, idx = kept_tokens(tokens, 1, score, 2)
    dropped = torch.ones_like(score).scatter(1, idx, 0.0)  # tokens 1 and 4
    fused = with_fused_token(kept, tokens, 1, dropped, score * dropped)
    assert fused.x.shape[1] == 4
    torch.testing.assert_close(fused.x[0, -1], 0.1 * x[0, 1] + 0.2 * x[0, 4])
    assert fused.size[0, -1, 0] == 2 + 5
    assert fused.source[0, -1].tolist() == [0, 1, 0, 0, 1]
    moment = 2 * state.position[0, 1] + 5 * state.position[0, 4]
    torch.testing.assert_close(fused.position[0, -1], moment / 7)
    assert torch.equal(fused.owner, kept.owner)  # tokens 1 and 4 left the sequence
    assert fused.valid is None
    padded = with_fused_token(tokens._replace(valid=torch.ones(1, 5, dtype=torch.bool)), tokens,
                              1, torch.zeros_like(dropped), torch.zeros_like(dropped))  # fmt: skip
    assert padded.valid.tolist() == [[True] * 5 + [False]]  # it fused nothing


def test_the_state_takes_every_per_token_field():
    x, state = five_tokens()
    per_token = {f.name for f in dataclasses.fields(TokenState)} - {
        "num_prefix", "position_rule", "exited", "batching", "counts", "_key_biases", "carry",
        "attention",
    }  # fmt: skip
    keywords = dict(inspect.signature(TokenState.with_tokens).parameters)
    del keywords["self"]
    # the host counts of `valid` are optional, and reset by every call that does not give them
    assert keywords.pop("counts").default is None
    assert set(keywords) == per_token
    assert all(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in keywords.values())
    counted = dataclasses.replace(state, counts=(5, 5))
    fields = dict(size=None, source=None, valid=None, mask=None, position=None, owner=None)
    assert counted.with_tokens(**fields).counts is None
    assert set(Tokens._fields) == per_token - {"mask"} | {"x"}
    with pytest.raises(TypeError):
        state.with_tokens(size=state.size, source=None, position=None, owner=None, valid=None)
    out = carried(x, state, state.size).in_state(dataclasses.replace(state, mask=torch.ones(2, 5)))
    assert out.mask is None and out.owner is state.owner
