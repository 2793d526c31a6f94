"""ATS (docs/methods.md §3.12): the official code's outputs (float64 fixtures), the sampling rule
below the budget (where the official code fails), per-image batching, options and GMACs.

Fixtures: tests/methods/fixtures/ats_*.safetensors, written by `benchmarks/ats_official.py
--record` from adaptivetokensampling/ATS at commit 9271257adc7ea9695c2ccd75e25e3a86432fd65a,
on the shared random DeiT-Tiny and its 4 images, each image run alone (batch 1). Keys: `logits`
[4, 1000], `tokens_per_block` [4, 12], `kept_blk{i}` [4, T] for each ATS block i: the original
token (0 = class token, j = patch j - 1) of each output token in the official order, -1 after an
image's last token.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tokenreduce
from tests.adapters.test_flops import counted_gmacs
from tests.conftest import peaky_vit, reduced_forward, tiny_vit
from tokenreduce.api import describe
from tokenreduce.methods.ats import inverse_transform_samples, token_budget
from tokenreduce.methods.base import make_config

OFFICIAL_COMMIT = "9271257adc7ea9695c2ccd75e25e3a86432fd65a"
HERE = Path(__file__).parent / "fixtures"
SETTINGS = {
    "ats_default": {},
    "ats_blocks1357911_k150": {
        "ats_blocks": (1, 3, 5, 7, 9, 11),
        "num_tokens": (197, 150, 150, 150, 150, 150),
    },
}
BUDGETS = [{}, {"num_tokens": 12}, {"num_tokens": 0.8}]
"""A covering budget (the official rule), a count and a fraction below it (the paper's rule)."""


def original_tokens(source: torch.Tensor) -> torch.Tensor:
    """[B, T] the original token each row of a pruning-only source map [B, T, N0] holds, -1 at
    padding rows."""
    return torch.where(source.any(dim=-1), source.double().argmax(dim=-1), -1)


@pytest.mark.parametrize("batching", ["auto", "masked"])
@pytest.mark.parametrize("name", SETTINGS)
def test_matches_official(fixture_model, images, name, batching):
    """Logits within 1e-10 (measured: 3e-15), token counts and the kept tokens in the official
    order equal, with the four images in one batch (officially each ran alone)."""
    ref = load_file(HERE / f"{name}.safetensors")
    logits, info = reduced_forward(
        fixture_model, images, "ats", trace_source=True, batching=batching, **SETTINGS[name]
    )
    assert torch.equal(info.tokens_per_block, ref["tokens_per_block"])
    blocks = sorted(int(k.removeprefix("kept_blk")) for k in ref if k.startswith("kept_blk"))
    assert blocks == list(SETTINGS[name].get("ats_blocks", range(3, 12)))
    for block in blocks:
        kept, want = original_tokens(info.source_blk[block]), ref[f"kept_blk{block}"]
        assert torch.equal(kept[:, : want.shape[1]], want), f"block {block}"
        assert (kept[:, want.shape[1] :] == -1).all()
    torch.testing.assert_close(logits, ref["logits"], atol=1e-10, rtol=0)


def reference_picks(scores: list[float], samples: int) -> set[int]:
    """The paper's rule for one image, in plain Python: positions (in ascending score) of the
    tokens nearest to `samples` evenly spaced values from the smallest non-zero normalised CDF
    value to 1."""
    scores = sorted(scores)
    cdf = [sum(scores[: i + 1]) for i in range(len(scores))]
    normalized = [(c - cdf[0]) / (cdf[-1] - cdf[0]) for c in cdf]
    start = min(v for v in normalized if v != 0)
    ys = [start + k * (1 - start) / (samples - 1) for k in range(samples)]
    return {min(range(len(cdf)), key=lambda i: abs(y - normalized[i])) for y in ys}


def test_sampling_follows_the_paper_for_any_sample_count():
    """Images with different token counts and sample counts in one padded batch, the official
    count (ref_samples) and fewer; each image's picks are the paper's (plain Python)."""
    torch.manual_seed(0)
    counts, samples = [40, 25, 60], [196.0, 9.0, 30.0]
    scores = torch.zeros(3, 60, dtype=torch.float64)
    for b, n in enumerate(counts):
        scores[b, :n] = torch.rand(n, dtype=torch.float64).pow(4).sort().values
    picked = inverse_transform_samples(
        scores, torch.tensor(counts), torch.tensor(samples, dtype=torch.float64), 196, 196
    )
    for b, (n, m) in enumerate(zip(counts, samples, strict=True)):
        want = reference_picks(scores[b, :n].tolist(), int(m)) | {n - 1}
        assert set(picked[b].nonzero().flatten().tolist()) == want
        assert not picked[b, n:].any()
    assert picked[1].sum() <= 9


def test_two_patch_tokens_keep_the_best():
    """Deviation: the official duplicate removal pads with 1, so an image down to two patch
    tokens loses both; ours keeps the best (it is the one every sample picks). One token stays."""
    scores = torch.tensor([[0.3, 0.7], [1.0, 0.0]], dtype=torch.float64)
    picked = inverse_transform_samples(
        scores, torch.tensor([2, 1]), torch.tensor([196.0, 196.0], dtype=torch.float64), 196, 196
    )
    assert picked.tolist() == [[False, True], [True, False]]


@pytest.mark.parametrize(
    ("num_tokens", "count", "budget"),
    [(197, 150, 150), (100, 150, 100), (0.7, 150, 105), (0.5, 9, 8), (3, 20, 8), (0.9, 5, 5),
     (0.5, 45, 22), (1.0, 60, 60), (1, 60, 60)],
)  # fmt: skip
def test_token_budget_is_the_official_rule(num_tokens, count, budget):
    """Above N: N; <= 1: a fraction of N; at least 8; rounded half to even; at most N."""
    assert token_budget(num_tokens, torch.tensor([count]), 1).tolist() == [budget]


@pytest.mark.parametrize("options", BUDGETS[1:])
def test_counts_stay_within_the_budget(options):
    model = peaky_vit()
    images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    _, info = reduced_forward(model, images, "ats", **options)
    counts = info.tokens_per_block
    budget = options["num_tokens"]
    for block in range(3, 12):
        entering = counts[:, block - 1].double()
        limit = (
            torch.round(budget * entering).clamp(8)
            if budget <= 1
            else torch.full_like(entering, float(budget))
        )
        assert (counts[:, block] <= torch.minimum(limit, entering)).all()
    assert (info.records.samples[:, 0] < 16).all()  # below the budget: K - 1 samples


@pytest.mark.parametrize("batching", ["auto", "ragged", "packed", "masked"])
@pytest.mark.parametrize("options", BUDGETS, ids=["covering", "count", "fraction"])
def test_every_batching_mode_gives_each_image_its_result_alone(options, batching):
    """Logits, counts, sources and records of every image in a mixed batch equal those of the
    image run alone (float64)."""
    model = peaky_vit()
    torch.manual_seed(0)
    images = torch.randn(5, 3, 64, 64, dtype=torch.float64)
    options = dict(options, trace_source=True)
    batched, info = reduced_forward(model, images, "ats", batching=batching, **options)
    counts = info.tokens_per_block
    assert len({tuple(row) for row in counts.tolist()}) > 2, "counts must differ per image"
    for i in range(len(images)):
        alone, single = reduced_forward(model, images[i : i + 1], "ats", **options)
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-9, atol=1e-9)
        assert counts[i].tolist() == single.tokens_per_block[0].tolist()
        assert torch.equal(info.records.samples[i], single.records.samples[0])
        for src, src_alone in zip(info.source_blk, single.source_blk, strict=True):
            n = src_alone.shape[1]
            assert torch.equal(src[i, :n], src_alone[0])
            assert not src[i, n:].any()
    gmacs = tokenreduce.flops.gmacs(model, info).gmacs
    assert len(set(gmacs.tolist())) > 1  # per-image GMACs


def test_masked_cap_drops_the_lowest_scores():
    model = peaky_vit()
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    _, info = reduced_forward(model, images, "ats", batching="masked", max_tokens=6)
    assert info.records.overflow.sum() > 0
    assert info.tokens_per_block[:, 3:].max() <= 6


@pytest.mark.parametrize(("depth", "blocks"), [(4, (1, 2, 3)), (24, tuple(range(6, 24)))])
def test_defined_for_any_depth(depth, blocks):
    """Default ATS blocks L//4 .. L-1 (3..11 for 12 blocks), every token as budget."""
    model = tiny_vit("vit_tiny_patch16_224", img_size=64, depth=depth)
    logits, info = reduced_forward(model, torch.randn(2, 3, 64, 64), "ats")
    assert info.reduce_blocks == blocks
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    assert (info.records.samples == 16).all()  # as many samples as patches


def test_refuses_a_model_without_class_token():
    model = tiny_vit("vit_tiny_patch16_224", class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="method 'ats'.*class token"):
        tokenreduce.apply(model, "ats")


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"num_tokens": 0}, r"num_tokens=0 is not accepted"),
        ({"num_tokens": -3}, r"num_tokens=-3 is not accepted"),
        ({"num_tokens": True}, r"num_tokens=True is not accepted"),
        ({"num_tokens": "100"}, r"num_tokens='100' is not accepted"),
        ({"num_tokens": (100, math.nan)}, r"num_tokens=\(100, nan\) is not accepted"),
        ({"num_tokens": (100, 90)}, r"num_tokens has 2 budgets .* 9 blocks"),
        ({"ats_blocks": (3, 12)}, r"ats_blocks=\(3, 12\).*0\.\.11"),
        ({"ats_blocks": 3}, r"ats_blocks=3 is not accepted"),
        ({"batching": "dense"}, r"batching='dense' is not accepted"),
        ({"max_tokens": 10}, r"max_tokens=10 \(batching='auto'\) is not accepted"),
    ],
)
def test_bad_options(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        tokenreduce.apply(tiny_vit(), "ats", **options)


@pytest.mark.parametrize(
    ("given", "used", "named"),
    [(500, 197, "num_tokens=197"), (4, 8, "num_tokens=8"), ((500, 60), (197, 60), "=197")],
)
def test_budgets_a_model_cannot_honour_are_clamped_with_a_warning(given, used, named, caplog):
    model, blocks = tiny_vit().double(), {"ats_blocks": (3, 6)}
    if not isinstance(given, tuple):
        blocks = {}
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="tokenreduce"):
        clamped, info = reduced_forward(model, images, "ats", num_tokens=given, **blocks)
    messages = [r.getMessage() for r in caplog.records if "num_tokens" in r.getMessage()]
    assert len(messages) == 1 and named in messages[0]
    same, same_info = reduced_forward(model, images, "ats", num_tokens=used, **blocks)
    assert torch.equal(clamped, same)
    assert torch.equal(info.tokens_per_block, same_info.tokens_per_block)


def test_config_defaults_are_the_official_deit_s_setting():
    config = make_config("ats")
    dims = describe(tiny_vit("deit_small_patch16_224"))
    steps = config.schedule(dims)
    assert [i for i, step in enumerate(steps) if step is not None] == list(range(3, 12))
    assert {(step.num_tokens, step.ref_samples) for step in steps if step} == {(197.0, 196)}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("options", [{}, {"num_tokens": 100}])
def test_analytic_gmacs_match_the_flop_counter(deit_small, options, fused):
    for block in deit_small.blocks:
        block.attn.fused_attn = fused
    x = torch.randn(1, 3, 224, 224)
    tokenreduce.apply(deit_small, "ats", **options)
    try:
        counted = counted_gmacs(deit_small, x)
        info = tokenreduce.last_info(deit_small)
        analytic = tokenreduce.flops.gmacs(deit_small, info).mean_total
    finally:
        tokenreduce.remove(deit_small)
        for block in deit_small.blocks:
            block.attn.fused_attn = True
    assert info.tokens_per_block[0, -1] < 197
    assert abs(counted - analytic) / analytic < 0.01, (counted, analytic)
