"""PiToMe against the official code's float64 outputs on the fixture DeiT-Tiny, and its rules.

Fixtures: benchmarks/pitome_official.py --record, official hchautran/PiToMe at commit
550b5deed94aadfeac28bfbe381d87e672044a40 (docs/methods.md §3.8).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import tokenreduce
from tests.conftest import FIXTURES, pixels, reduced_forward, require_shared, tiny_vit
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.pitome import (
    PiToMeConfig,
    merge_count,
    output_order,
    pitome_matching,
    pitome_rows,
)
from tokenreduce.ops.merging import gather_and_add, merge_sum
from tokenreduce.ops.packing import gather_rows
from tokenreduce.patch.timm import TimmAdapter

RECORDED = Path(__file__).parent / "fixtures"


def fixture_model(class_token: bool) -> torch.nn.Module:
    weights = load_file(require_shared(FIXTURES / "deit_tiny_random.safetensors"))
    options = {} if class_token else {"class_token": False, "global_pool": "avg", "fc_norm": False}
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **options)
    if not class_token:
        del weights["cls_token"]
        weights["pos_embed"] = weights["pos_embed"][:, 1:]
    model.load_state_dict(weights)
    return model.double().eval()


@pytest.mark.parametrize("trace_source", [True, False])
@pytest.mark.parametrize(
    ("case", "ratio", "class_token"),
    [
        ("pitome_r0.9125", None, True),
        ("pitome_r0.8", 0.8, True),
        ("pitome_nocls_r0.9125", None, False),
    ],
)
def test_pitome_matches_official(images, case, ratio, class_token, trace_source):
    """Token counts, every block's merges and token order (traced sources only), final sizes,
    the final tokens and (with a class token) the logits; with and without traced sources, which
    take the two merge paths (`merged_tokens`; `pitome_rows` and `gather_and_add`). Without a
    class token the logits differ by design: the official model pools the plain mean of its
    tokens, tokenreduce the size-weighted mean (docs/methods.md §1.3), so the plain mean of the
    final tokens is compared instead."""
    ref = load_file(RECORDED / f"{case}.safetensors")
    options = {} if ratio is None else {"ratio": ratio}
    model = fixture_model(class_token)
    tokenreduce.apply(model, "pitome", trace_source=trace_source, **options)
    with torch.no_grad():
        features = model.forward_features(images)
        logits = model(images)
    info = tokenreduce.last_info(model)
    assert torch.equal(info.tokens_per_block, ref["tokens_per_block"])
    for block in range(12 if trace_source else 0):
        owner = info.source_blk[block].to(torch.int8).argmax(dim=1)
        assert torch.equal(owner, ref[f"owner_blk{block}"].long()), f"block {block}"
    torch.testing.assert_close(info.final_size, ref["size_final"], atol=1e-12, rtol=0)
    torch.testing.assert_close(features.mean(dim=1), ref["features_mean"], atol=1e-10, rtol=0)
    if class_token:
        torch.testing.assert_close(logits, ref["logits"], atol=1e-10, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("deit_tiny_patch16_224", {}),
        ("deit_tiny_distilled_patch16_224", {}),
        ("deit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
    ],
)
def test_the_two_merge_paths_agree_bit_for_bit(name, options, dtype, batch):
    """Untraced, PiToMe takes its rows in output order at once (`pitome_rows`,
    `gather_and_add`); with traced sources, the energy-ordered tokens and the matching
    (`merged_tokens`). Logits, token counts and every block's sizes are the same bits, with
    zero, one and two prefix tokens, in its bipartite and its protected blocks."""
    model = tiny_vit(name, img_size=64, **options).to(dtype)
    images = torch.randn(batch, 3, 64, 64, dtype=dtype)
    lean, lean_info = reduced_forward(model, images, "pitome", ratio=0.8)
    traced, info = reduced_forward(model, images, "pitome", ratio=0.8, trace_source=True)
    assert torch.equal(lean, traced)
    assert torch.equal(lean_info.tokens_per_block, info.tokens_per_block)
    assert lean_info.tokens_per_block[0, -1] < info.tokens_in
    for size, size_traced in zip(lean_info.sizes, info.sizes, strict=True):
        assert (size is None) == (size_traced is None)
        assert size is None or torch.equal(size, size_traced)


@pytest.mark.parametrize("bsm", [True, False])
@pytest.mark.parametrize("prefix", [0, 1, 2, 3])
def test_rows_in_output_order_equal_the_matching_bit_for_bit(prefix, bsm):
    """`pitome_rows` + `gather_and_add` on the input rows [prefix, T tokens] against the generic
    path (the tokens in energy order with the prefix last, `pitome_matching`, `merge_sum` and
    its permutation): the same rows in the same order, each destination's additions in the same
    order, for every r and both parities of T, one image and three."""
    torch.manual_seed(prefix)
    for tokens in range(4, 12):
        for r in range(1, tokens // 2 + 1):
            for batch in (1, 3):
                sim = torch.randn(batch, tokens, tokens)
                order = torch.rand(batch, tokens).argsort(dim=1)
                y = torch.randn(batch, prefix + tokens, 5)
                prefix_rows = torch.arange(prefix).expand(batch, prefix)
                ordered = gather_rows(y, torch.cat([order + prefix, prefix_rows], dim=1))
                generic = merge_sum(ordered, pitome_matching(sim, order, r, prefix, bsm))
                lean = gather_and_add(y, *pitome_rows(sim, order, r, prefix, bsm))
                assert torch.equal(lean, generic), (tokens, r, batch)


def test_schedule_rules():
    """Margin 0.75 - 0.75 l / L, bipartite matching in the first ceil(L/2) blocks, any depth."""
    for depth, bsm_blocks in ((4, 2), (5, 3), (12, 6), (24, 12)):
        dims = TimmAdapter.describe(tiny_vit(depth=depth))
        steps = PiToMeConfig().schedule(dims)
        assert [s.bsm for s in steps] == [i < bsm_blocks for i in range(depth)]
        assert [s.margin for s in steps] == [0.75 - 0.75 * (i / depth) for i in range(depth)]
        assert PiToMeConfig(ratio=1.0).schedule(dims) == [None] * depth
    assert merge_count(196, 0.9125) == 17 and merge_count(11, 0.9125) == 0


@pytest.mark.parametrize("bsm", [True, False])
@pytest.mark.parametrize(
    ("tokens", "r", "prefix"), [(196, 17, 1), (179, 15, 1), (12, 6, 0), (9, 3, 2), (10, 4, 3)]
)
def test_output_order_is_a_permutation(tokens, r, prefix, bsm):
    order = output_order(tokens, r, prefix, bsm)
    assert sorted(order) == list(range(tokens + prefix - r))


@pytest.mark.parametrize("depth", [4, 24])
def test_any_depth_and_prefix_untouched(depth):
    model = tiny_vit(depth=depth)
    x = torch.randn(2, 3, 224, 224)
    tokenreduce.apply(model, "pitome", trace_source=True)
    with torch.no_grad():
        model(x)
    info = tokenreduce.last_info(model)
    tokenreduce.remove(model)
    counts, t = [], 196
    for _ in range(depth):
        t -= merge_count(t, 0.9125)
        counts.append(t + 1)
    assert info.tokens_per_block[0].tolist() == counts
    for source in info.source_blk:
        assert source[:, 0, 0].all() and source[:, 0, 1:].sum() == 0  # class token alone, first
        assert (source.sum(dim=1) == 1).all()  # every original token in exactly one token


def test_distillation_token_is_protected():
    model = tiny_vit("deit_tiny_distilled_patch16_224")
    logits, info = reduced_forward(
        model, torch.randn(2, 3, 224, 224), "pitome", trace_source=True, ratio=0.7
    )
    assert torch.isfinite(logits).all()
    for source in info.source_blk:
        assert source[:, :2, :2].equal(torch.eye(2, dtype=torch.bool).expand(2, 2, 2))
        assert source[:, :2, 2:].sum() == 0


def test_ratio_one_is_the_dense_model():
    model = tiny_vit()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        dense = model(x)
        tokenreduce.apply(model, "pitome", ratio=1.0)
        assert torch.equal(model(x), dense)
    tokenreduce.remove(model)


@pytest.mark.parametrize(
    "options",
    [
        {"ratio": 0.4},
        {"ratio": 1.5},
        {"ratio": True},
        {"ratio": "0.9"},
        {"margin": float("nan")},
        {"alpha": None},
        {"prop_attn": 1},
    ],
)
def test_invalid_options_are_refused_in_one_line(options):
    with pytest.raises(InvalidOptionError) as error:
        PiToMeConfig(**options)
    assert "\n" not in str(error.value) and "pitome" in str(error.value)


def analytic_total(model: torch.nn.Module) -> float:
    return tokenreduce.flops.gmacs(model, tokenreduce.last_info(model)).mean_total


@pytest.mark.parametrize("fused", [True, False])
def test_gmacs_match_flop_counter_on_deit_small(deit_small, fused):
    """The similarity of all non-prefix tokens is a matmul the counter sees: the total (network
    and overhead) is compared."""
    from tests.adapters.test_flops import counted_gmacs

    for block in deit_small.blocks:
        block.attn.fused_attn = fused
    tokenreduce.apply(deit_small, "pitome")
    try:
        counted = counted_gmacs(deit_small, torch.randn(1, 3, 224, 224))
        analytic = analytic_total(deit_small)
    finally:
        tokenreduce.remove(deit_small)
        for block in deit_small.blocks:
            block.attn.fused_attn = True
    assert abs(counted - analytic) / analytic < 0.01, (counted, analytic)


def test_gmacs_match_flop_counter_on_eva02():
    from tests.adapters.test_flops import counted_gmacs

    model = tiny_vit("eva02_tiny_patch14_224", depth=3)
    tokenreduce.apply(model, "pitome")
    counted = counted_gmacs(model, torch.randn(1, 3, 224, 224))
    analytic = analytic_total(model)
    assert abs(counted - analytic) / analytic < 0.01, (counted, analytic)


def test_gmacs_match_flop_counter_on_transformers_and_open_clip():
    """A small transformers ViT and an open_clip tower (4 blocks, 16 patches), ratio 0.7; the
    open_clip tower counted on the math attention kernel (nn.MultiheadAttention's fast path is
    one op the counter does not see)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    pytest.importorskip("transformers")
    open_clip = pytest.importorskip("open_clip")
    from tests.adapters.test_hf_adapter import build

    x = pixels(2)
    hf = build("ViTForImageClassification", "eager", num_labels=5)
    torch.manual_seed(0)
    tower = open_clip.transformer.VisionTransformer(
        image_size=32, patch_size=8, width=64, layers=4, heads=4, mlp_ratio=4.0, output_dim=32
    ).double().eval()  # fmt: skip
    for model, call in ((hf, lambda m: m(pixel_values=x)), (tower, lambda m: m(x))):
        tokenreduce.apply(model, "pitome", ratio=0.7)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            call(model)
        counted = counter.get_total_flops() / 2 / 2 / 1e9  # FLOPs of 2 images -> MACs per image
        analytic = analytic_total(model)
        tokenreduce.remove(model)
        assert abs(counted - analytic) / analytic < 0.01, (type(model).__name__, counted, analytic)


def test_deit_small_reference_counts_and_gmacs(deit_small):
    """docs/methods.md §5: ratio 0.9125 on DeiT-S."""
    tokenreduce.apply(deit_small, "pitome")
    with torch.no_grad():
        deit_small(torch.randn(1, 3, 224, 224))
    info = tokenreduce.last_info(deit_small)
    tokenreduce.remove(deit_small)
    counts = [180, 165, 151, 138, 127, 116, 106, 97, 89, 82, 75, 69]
    assert info.tokens_per_block[0].tolist() == counts
    assert round(tokenreduce.flops.gmacs(deit_small, info).mean, 3) == 2.764
