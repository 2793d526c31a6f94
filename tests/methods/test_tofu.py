"""ToFu (docs/methods.md §3.11): no official code exists, so the mechanism is tested directly
(MLERP on hand-computed cases, pruning blocks = ToMe's matching without averaging, token counts
= ToMe's), and the whole model against the public re-implementation Westlake-AI/OpenToMe
(commit 4b791cbc6bcef55040236c1852ff2f4102d82725; fixtures recorded by
benchmarks/tofu_reference.py), float64.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tokenreduce
from tests.conftest import reduced_forward, tiny_vit
from tokenreduce.methods.steps import Tokens, merged_tokens
from tokenreduce.methods.tofu import ToFuStep, mlerp_tokens, pruned_tokens
from tokenreduce.ops import Matching, bipartite_soft_matching, merge_tokens, merge_wavg
from tokenreduce.patch import attached_engine

TOFU = sys.modules["tokenreduce.methods.tofu"]
HERE = Path(__file__).resolve().parent / "fixtures"


def tokens_of(x: torch.Tensor, size: torch.Tensor | None = None) -> Tokens:
    return Tokens(x, size, None, None, None, None)


def one_merge(batch: int = 1) -> Matching:
    """Four tokens (A = rows 0, 2; B = rows 1, 3), no prefix: A0 merges into B0, A1 stays.
    Output rows: [A1, B0 (+A0), B1]."""
    index = torch.tensor([[0]] * batch)
    return Matching(unm_idx=index + 1, src_idx=index, dst_idx=index, order=None)


# --- MLERP, hand-computed --------------------------------------------------------------------


def test_mlerp_of_two_orthogonal_tokens():
    x = torch.tensor([[[3.0, 0.0], [0.0, 4.0], [1.0, 1.0], [2.0, -1.0]]], dtype=torch.float64)
    out = mlerp_tokens(one_merge(), tokens_of(x), False)
    # average (1.5, 2), norm 2.5, rescaled to the larger norm 4: (2.4, 3.2)
    expected = torch.tensor([[[1.0, 1.0], [2.4, 3.2], [2.0, -1.0]]], dtype=torch.float64)
    torch.testing.assert_close(out.x, expected, rtol=0, atol=1e-15)
    assert out.size.flatten().tolist() == [1.0, 2.0, 1.0]


def test_mlerp_weights_the_average_by_size():
    x = torch.tensor([[[3.0, 0.0], [0.0, 4.0], [1.0, 1.0], [2.0, -1.0]]], dtype=torch.float64)
    size = torch.tensor([[[1.0], [3.0], [2.0], [1.0]]], dtype=torch.float64)
    out = mlerp_tokens(one_merge(), tokens_of(x, size), False)
    # average (3·1 + 0·3, 0·1 + 4·3) / 4 = (0.75, 3), rescaled to norm 4
    average = torch.tensor([0.75, 3.0], dtype=torch.float64)
    torch.testing.assert_close(out.x[0, 1], average / average.norm() * 4, rtol=0, atol=1e-15)
    assert out.size.flatten().tolist() == [2.0, 4.0, 1.0]


def test_mlerp_of_two_equal_norm_tokens_is_slerp_at_one_half():
    """The paper's starting point: SLERP of x1, x2 (equal norms) at t = 1/2."""
    x = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [2.0, -1.0]]], dtype=torch.float64)
    out = mlerp_tokens(one_merge(), tokens_of(x), False)
    angle = math.pi / 2
    slerp = (math.sin(angle / 2) / math.sin(angle)) * (x[0, 0] + x[0, 1])
    torch.testing.assert_close(out.x[0, 1], slerp, rtol=0, atol=1e-15)


def test_mlerp_keeps_the_largest_member_norm_and_toMe_s_direction():
    torch.manual_seed(0)
    x = torch.randn(3, 17, 8, dtype=torch.float64)
    size = torch.randint(1, 5, (3, 17, 1)).double()
    matching = bipartite_soft_matching(torch.randn(3, 17, 4, dtype=torch.float64), 6, 1)
    out = mlerp_tokens(matching, tokens_of(x, size), False)
    tome, tome_size = merge_wavg(matching, x, size)
    norm = x.norm(dim=-1, keepdim=True)
    largest = merge_tokens(norm, matching, "amax")
    torch.testing.assert_close(out.x.norm(dim=-1, keepdim=True), largest, rtol=0, atol=1e-13)
    # same direction as ToMe's average, same sizes
    cosine = (out.x * tome).sum(-1) / (out.x.norm(dim=-1) * tome.norm(dim=-1))
    torch.testing.assert_close(cosine, torch.ones_like(cosine), rtol=0, atol=1e-14)
    assert torch.equal(out.size, tome_size)
    # a token that received nothing (unmerged A, prefix, B without partners) is unchanged
    received = merge_tokens(torch.ones_like(norm), matching, "sum") > 1
    torch.testing.assert_close(
        out.x[~received.expand_as(out.x)], tome[~received.expand_as(tome)], rtol=0, atol=1e-14
    )


def test_mlerp_equals_toMe_s_average_when_the_members_are_equal():
    """Equal norms alone are not enough (the average of two directions is shorter); equal norms
    and directions are: then the average has the members' norm."""
    row = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x = torch.stack([row, row, torch.ones(3, dtype=torch.float64), -row]).unsqueeze(0)
    out = mlerp_tokens(one_merge(), tokens_of(x), False)
    tome, _ = merge_wavg(one_merge(), x, None)
    torch.testing.assert_close(out.x, tome, rtol=0, atol=1e-15)


def test_mlerp_of_tokens_that_cancel_is_zero():
    x = torch.tensor([[[1.0, 2.0], [-1.0, -2.0], [1.0, 1.0], [2.0, -1.0]]], dtype=torch.float64)
    out = mlerp_tokens(one_merge(), tokens_of(x), False)
    assert torch.equal(out.x[0, 1], torch.zeros(2, dtype=torch.float64))


# --- pruning blocks ---------------------------------------------------------------------------


def test_pruning_is_toMe_s_matching_without_averaging():
    torch.manual_seed(1)
    x = torch.randn(2, 21, 6, dtype=torch.float64)
    size = torch.randint(1, 4, (2, 21, 1)).double()
    source = torch.eye(21, dtype=torch.float64).expand(2, -1, -1)
    for num_prefix in (0, 1, 2):
        matching = bipartite_soft_matching(torch.randn(2, 21, 4), 7, num_prefix)
        out = pruned_tokens(matching, Tokens(x, size, source, None, None, None))
        assert torch.equal(out.x, merge_tokens(x, matching, "destination"))
        assert torch.equal(out.size, merge_tokens(size, matching, "destination"))
        # a dropped token is represented by nothing afterwards
        merged = merged_tokens(matching, tokens_of(x, size), False)
        assert out.x.shape == merged.x.shape
        assert out.source.sum().item() == 2 * (21 - 7)


def test_a_whole_model_of_pruning_blocks_carries_no_sizes():
    model = tiny_vit(depth=4)
    _, info = reduced_forward(model, torch.randn(2, 3, 224, 224), "tofu", r=9, switch_block=4)
    assert info.final_size is None or bool((info.final_size == 1).all())


# --- schedule, counts, options ----------------------------------------------------------------


@pytest.mark.parametrize("depth", [4, 12, 24])
def test_default_switch_and_toMe_s_token_counts(depth):
    model = tiny_vit(depth=depth)
    images = torch.randn(2, 3, 224, 224)
    _, info = reduced_forward(model, images, "tofu")
    _, tome = reduced_forward(model, images, "tome")
    assert torch.equal(info.tokens_per_block, tome.tokens_per_block)
    assert [step.mlerp for step in info.steps] == [i > depth // 2 for i in range(depth)]


def test_switch_block_and_r_schedules():
    engine = attached_engine(
        tokenreduce.apply(tiny_vit(depth=5), "tofu", r=(8, -1.0), switch_block=2)
    )
    assert list(engine.steps) == [
        ToFuStep(16, False), ToFuStep(12, False), ToFuStep(8, True), ToFuStep(4, True), None
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"r": -1}, r"tofu: option r=-1 .*accepted"),
        ({"r": [1] * 13}, r"13 per-block values.*12 blocks"),
        ({"switch_block": -1}, r"tofu: option switch_block=-1 .*accepted: None"),
        ({"switch_block": 2.0}, r"switch_block=2.0"),
        ({"switch_block": True}, r"switch_block=True"),
        ({"prop_attn": 1}, r"prop_attn=1 must be True or False"),
    ],
)
def test_bad_options(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        tokenreduce.apply(tiny_vit(), "tofu", **options)


def test_a_switch_past_the_last_block_is_clamped_with_one_warning(caplog):
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="tokenreduce"):
        clamped, _ = reduced_forward(tiny_vit(depth=4).double(), images, "tofu", switch_block=9)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "tofu: option switch_block=9 is past the model's last block (4 blocks: every block "
        "prunes); using switch_block=4 instead"
    ]
    given, _ = reduced_forward(tiny_vit(depth=4).double(), images, "tofu", switch_block=4)
    assert torch.equal(clamped, given)


def test_overhead_counts_the_matching_and_the_norms():
    engine = attached_engine(tokenreduce.apply(tiny_vit(depth=4), "tofu"))
    dims, config = engine.dims, engine.config
    n = torch.tensor([197])
    prune = config.overhead_macs(n, dims, ToFuStep(13, False), None, False)
    merge = config.overhead_macs(n, dims, ToFuStep(13, True), None, False)
    assert prune.item() == 99 * 98 * 64
    assert merge.item() == 99 * 98 * 64 + 2 * 197 * 192 + 197 * 192 + 2 * 184 * 192


# --- against the OpenToMe re-implementation (float64) -----------------------------------------


def destinations(info, block: int) -> torch.Tensor:
    """[B, N_in]: the output row of each input token of `block`, -1 where it was dropped, from
    the source maps."""
    cur = info.source_blk[block]
    if block == 0:
        batch, _, num_original = cur.shape
        prev = torch.eye(num_original, dtype=torch.bool).expand(batch, -1, -1)
    else:
        prev = info.source_blk[block - 1]
    first = prev.float().argmax(dim=-1)  # one original token of each input row
    hit = cur.float().gather(2, first.unsqueeze(1).expand(-1, cur.shape[1], -1))
    return torch.where(hit.any(dim=1), hit.argmax(dim=1), -1)


def reference_merge(matching: Matching, tokens: Tokens, destination_positions: bool) -> Tokens:
    """The re-implementation's "tofu" merge (the deviations of docs/methods.md §3.11): the
    unweighted average of the members divided by the destination's norm before the merge, times
    the largest member norm."""
    merged = merged_tokens(matching, tokens._replace(size=None), destination_positions)
    norm = torch.linalg.vector_norm(tokens.x, dim=-1, keepdim=True)
    before = merge_tokens(norm, matching, "destination")
    return merged._replace(x=merged.x / before * merge_tokens(norm, matching, "amax"))


def test_pruning_blocks_equal_the_reference(fixture_model, images):
    ref = load_file(HERE / "tofu_ref_prune_r13.safetensors")
    logits, info = reduced_forward(
        fixture_model, images, "tofu", trace_source=True, r=13, switch_block=12
    )
    assert torch.equal(info.tokens_per_block, ref["tokens_per_block"])
    for block in range(12):
        assert torch.equal(destinations(info, block), ref[f"destination_blk{block}"]), block
    torch.testing.assert_close(logits, ref["logits"], atol=1e-10, rtol=0)


@pytest.mark.parametrize("r", [13, 8])
def test_default_equals_the_reference_up_to_its_merge(fixture_model, images, r, monkeypatch):
    """Our default switch with the re-implementation's merge and no sizes in attention (what it
    computes): equal logits and decisions in every block."""
    ref = load_file(HERE / f"tofu_ref_default_r{r}.safetensors")
    monkeypatch.setattr(TOFU, "mlerp_tokens", reference_merge)
    logits, info = reduced_forward(
        fixture_model, images, "tofu", trace_source=True, r=r, prop_attn=False
    )
    assert torch.equal(info.tokens_per_block, ref["tokens_per_block"])
    for block in range(12):
        assert torch.equal(destinations(info, block), ref[f"destination_blk{block}"]), block
    torch.testing.assert_close(logits, ref["logits"], atol=1e-10, rtol=0)


@pytest.mark.parametrize("r", [13, 8])
def test_our_mlerp_decides_as_the_reference_until_its_first_merge(fixture_model, images, r):
    """Our own default: the same decisions through the first MLERP block (block 7, matched before
    it merges); the merges themselves differ (the reference's norm and weights, §3.11)."""
    ref = load_file(HERE / f"tofu_ref_default_r{r}.safetensors")
    logits, info = reduced_forward(fixture_model, images, "tofu", trace_source=True, r=r)
    assert torch.equal(info.tokens_per_block, ref["tokens_per_block"])
    for block in range(8):
        assert torch.equal(destinations(info, block), ref[f"destination_blk{block}"]), block
    assert (logits - ref["logits"]).abs().max() > 1e-3
