"""MCTF against the official code (mlvlab/MCTF, commit 2004da0cad3231fa74cbd60b6042b0bd133aacde,
fixtures recorded by benchmarks/mctf_official.py in float64), and its semantics beyond them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tokenreduce
from tests.adapters.test_flops import counted_gmacs
from tests.conftest import reduced_forward, tiny_vit
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.mctf import merge_count
from tokenreduce.ops.attention import PooledAttention

HERE = Path(__file__).parent / "fixtures"

SETTINGS = {
    "default": {},
    "fast": {"r": 0.35, "activate_layer": (3, 6, 9)},
    "osa0": {"one_step_ahead": 0},
    "osa2_unidir_size": {"one_step_ahead": 2, "bidirection": False, "pooling_type": 0, "r": 12},
    "max": {"pooling_type": 2, "tau_sim": 2, "tau_info": 10, "tau_size": 0},
    "mean_noprop": {"pooling_type": 3, "prop_attn": False},
}
"""The recorded settings (benchmarks/mctf_official.py SETTINGS) as our options; "default" is the
released DeiT evaluation (r 16 on blocks 1..11, one-step-ahead attention, tau 1/20/40,
bidirectional, attention-weighted pooling, proportional attention)."""


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_matches_official(fixture_model, images, name):
    """Logits within 1e-10 (measured: at most 3.4e-15), tokens per block and every block's
    token-to-row assignment (the official source map) equal."""
    ref = load_file(HERE / f"mctf_{name}.safetensors")
    logits, info = reduced_forward(
        fixture_model, images, "mctf", trace_source=True, **SETTINGS[name]
    )
    assert torch.equal(info.tokens_per_block, ref["tokens_per_block"])
    for block in range(12):
        owner = info.source_blk[block].to(torch.int8).argmax(dim=1).to(torch.int32)
        assert torch.equal(owner, ref[f"owner_blk{block}"]), f"block {block}"
    torch.testing.assert_close(logits, ref["logits"], atol=1e-10, rtol=0)


def test_merge_count_follows_the_official_rule():
    assert merge_count(16, 197, 1) == 16
    assert merge_count(0.35, 197, 1) == 68
    assert merge_count(200, 197, 1) == 98  # at most half the non-prefix tokens
    assert merge_count(16, 21, 1) == 10  # t - r < 10: r = t - 10
    assert merge_count(16, 10, 1) == 0
    assert merge_count(16, 8, 1) == 0  # deviation: the official r = -2 crashes


@pytest.mark.parametrize("one_step_ahead", [0, 1, 2])
def test_each_image_alone_equals_the_batch(one_step_ahead):
    model = tiny_vit(img_size=96).double()
    x = torch.randn(3, 3, 96, 96, dtype=torch.float64)
    options = dict(r=5, one_step_ahead=one_step_ahead)
    batched, _ = reduced_forward(model, x, "mctf", **options)
    alone = torch.cat(
        [reduced_forward(model, x[i : i + 1], "mctf", **options)[0] for i in range(3)]
    )
    torch.testing.assert_close(batched, alone, atol=1e-12, rtol=0)


@pytest.mark.parametrize("depth", [4, 24])
def test_defaults_run_at_any_depth(depth):
    model = tiny_vit(depth=depth, img_size=96)
    _, info = reduced_forward(model, torch.randn(2, 3, 96, 96), "mctf")
    counts = info.tokens_per_block[0].tolist()
    assert counts[:4] == [37, 21, 11, 10] and counts[-1] == 10  # at least 10 tokens stay
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))


def test_prefix_stays_first_without_a_class_token_and_with_two():
    """P = 0 (average pooling) runs; P = 2 (distilled DeiT): class and distillation tokens keep
    rows 0 and 1 and are never fused, in every mode."""
    plain = tiny_vit("vit_tiny_patch16_224", img_size=64, class_token=False, global_pool="avg")
    _, info = reduced_forward(plain, torch.randn(2, 3, 64, 64), "mctf", r=3)
    assert info.tokens_per_block[0, -1] < 16
    distilled = tiny_vit("deit_tiny_distilled_patch16_224", img_size=96)
    eye = torch.eye(38, dtype=torch.bool)
    for mode in (0, 1, 2):
        for bidirection in (True, False):
            _, info = reduced_forward(
                distilled,
                torch.randn(2, 3, 96, 96),
                "mctf",
                trace_source=True,
                r=4,
                one_step_ahead=mode,
                bidirection=bidirection,
            )
            for source in info.source_blk:
                assert torch.equal(source[:, :2], eye[:2].expand(2, -1, -1))
                assert not source[:, 2:, :2].any()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"one_step_ahead": 0},
        {"one_step_ahead": 2},
        {"r": 0.35, "activate_layer": (3, 6, 9)},
        {"tau_sim": 0, "pooling_type": 2},
    ],
)
def test_gmacs_match_flop_counter_on_deit_small(deit_small, options):
    x = torch.randn(1, 3, 224, 224)
    tokenreduce.apply(deit_small, "mctf", **options)
    try:
        counted = counted_gmacs(deit_small, x)
        report = tokenreduce.flops.gmacs(deit_small, tokenreduce.last_info(deit_small))
    finally:
        tokenreduce.remove(deit_small)
    assert abs(counted - report.mean_total) / report.mean_total < 0.01, (counted, report)


def test_gmacs_match_flop_counter_on_eva():
    model = tiny_vit("eva02_tiny_patch14_224", depth=3)
    x = torch.randn(1, 3, 224, 224)
    for mode in (0, 1):
        tokenreduce.apply(model, "mctf", r=12, one_step_ahead=mode)
        counted = counted_gmacs(model, x)
        analytic = tokenreduce.flops.gmacs(model, tokenreduce.last_info(model)).mean_total
        tokenreduce.remove(model)
        assert abs(counted - analytic) / analytic < 0.01, (mode, counted, analytic)


def assert_total_gmacs_match(model: torch.nn.Module, counted: float) -> None:
    """Network plus overhead GMACs (MCTF's probe is part of its overhead) within 1%."""
    analytic = tokenreduce.flops.gmacs(model, tokenreduce.last_info(model)).mean_total
    tokenreduce.remove(model)
    assert abs(analytic - counted) / counted < 0.01, (analytic, counted)


def test_gmacs_match_flop_counter_with_grouped_query_attention():
    """The probe's k projection is counted at the keys' width (2 key heads for 6 query heads)."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    model = Eva(
        img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=6, attn_type="rope",
        num_kv_heads=2, qkv_fused=False, num_classes=10, use_rot_pos_emb=True,
    ).eval()  # fmt: skip
    tokenreduce.apply(model, "mctf")
    counted = counted_gmacs(model, torch.randn(1, 3, 64, 64))
    analytic = tokenreduce.flops.gmacs(model, tokenreduce.last_info(model)).mean_total
    assert abs(counted - analytic) / analytic < 0.002, (counted, analytic)


def test_gmacs_match_flop_counter_on_transformers_and_open_clip():
    transformers = pytest.importorskip("transformers")
    from torch.utils.flop_counter import FlopCounterMode

    from tests.adapters.test_hf_adapter import build
    from tests.conftest import pixels

    x = pixels(2)
    model = build("ViTForImageClassification", "eager", num_labels=5)
    assert transformers is not None
    tokenreduce.apply(model, "mctf", r=3)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=x)
    assert_total_gmacs_match(model, counter.get_total_flops() / 2 / 2 / 1e9)
    pytest.importorskip("open_clip")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tests.adapters.test_openclip_adapter import tower

    model = tower()
    tokenreduce.apply(model, "mctf", r=3)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    assert_total_gmacs_match(model, counter.get_total_flops() / 2 / 2 / 1e9)


def test_nothing_fused_is_the_dense_model():
    """r = 0: the probe's attention is the block's own (one-step-ahead) and nothing is fused:
    the dense logits within float64 rounding, in every mode."""
    model = tiny_vit(img_size=64).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        dense = model(x)
    for mode in (0, 1, 2):
        logits, info = reduced_forward(model, x, "mctf", r=0, one_step_ahead=mode)
        assert (info.tokens_per_block == 17).all()
        torch.testing.assert_close(logits, dense, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"r": -1}, "option r=-1 is not accepted"),
        ({"r": 1.5}, "option r=1.5 is not accepted"),
        ({"tau_sim": -1}, "option tau_sim=-1 is not accepted"),
        ({"pooling_type": 4}, "option pooling_type=4 is not accepted"),
        ({"one_step_ahead": 3}, "option one_step_ahead=3 is not accepted"),
        ({"bidirection": 1}, "bidirection=1 must be True or False"),
        ({"activate_layer": (1, -2)}, "option activate_layer=\\(1, -2\\) is not accepted"),
        ({"activate_layer": (12,)}, "names a block the model does not have"),
        (
            {"activate_layer": (3, 3, 6)},
            r"activate_layer=\(3, 3, 6\) is not accepted; accepted: None or a tuple of distinct",
        ),
    ],
)
def test_bad_options_are_refused_in_one_line(options, match):
    with pytest.raises(InvalidOptionError, match=match) as error:
        tokenreduce.apply(tiny_vit(), "mctf", **options)
    assert "\n" not in str(error.value)


def test_precise_mode_is_refused_on_rotary_models():
    model = tiny_vit("eva02_tiny_patch14_224", depth=2)
    with pytest.raises(InvalidOptionError, match="one_step_ahead=2 is not accepted on a model"):
        tokenreduce.apply(model, "mctf", one_step_ahead=2)


def test_too_large_r_warns_once_with_the_merges_made(caplog):
    tokenreduce.apply(tiny_vit(img_size=64), "mctf", r=8)
    assert caplog.text.count("mctf: option r=8") == 1
    assert "using r=[7, 0, 0," in caplog.text


def test_pooled_attention_applied_equals_its_matrix():
    """The fused attention applied without forming it (`PooledAttention.attend`) equals its
    [B, H, N', N'] matrix times the values, and that matrix's rows still sum to 1."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, tokens, num_out, dim = 2, 3, 9, 5, 4
    probs = torch.rand(batch, heads, tokens, tokens, generator=generator, dtype=torch.float64)
    probs = probs / probs.sum(-1, keepdim=True)
    # every output receives at least one token; images differ
    destination = torch.stack([torch.arange(tokens) % num_out, torch.arange(tokens).flip(0) // 2])
    weight = torch.rand(batch, tokens, 1, generator=generator, dtype=torch.float64) + 0.1
    pooled = PooledAttention(probs, destination, weight, num_out)
    matrix = pooled.materialized()
    assert matrix.shape == (batch, heads, num_out, num_out)
    torch.testing.assert_close(
        matrix.sum(-1), torch.ones(batch, heads, num_out, dtype=torch.float64)
    )
    v = torch.randn(batch, heads, num_out, dim, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(pooled.attend(v), matrix @ v, atol=1e-14, rtol=0)


def test_training_dropout_acts_on_the_fused_matrix(fixture_model, images):
    """With attention dropout in training, the pooled probabilities are formed and dropped out;
    with p = 0 in training mode the output equals evaluation's."""
    model = fixture_model
    tokenreduce.apply(model, "mctf")
    try:
        with torch.no_grad():
            evaluated = model(images)
            model.train()
            trained = model(images)
            for block in model.blocks:
                block.attn.attn_drop.p = 0.5
            torch.manual_seed(0)
            dropped = model(images)
    finally:
        for block in model.blocks:
            block.attn.attn_drop.p = 0.0
        model.eval()
        tokenreduce.remove(model)
    torch.testing.assert_close(trained, evaluated, atol=1e-12, rtol=0)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, evaluated)
