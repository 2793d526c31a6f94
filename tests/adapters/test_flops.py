"""Analytic GMACs: reference values of docs/measurement.md and a FlopCounterMode cross-check."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

import tokenreduce
from tests.conftest import tiny_vit


@pytest.mark.parametrize(
    "name,expected",
    [
        ("deit_tiny_patch16_224", 1.254),
        ("deit_small_patch16_224", 4.599),
        ("deit_base_patch16_224", 17.564),
    ],
)
def test_dense_gmacs(name, expected):
    assert round(tokenreduce.flops.dense_gmacs(tiny_vit(name)), 3) == expected


@pytest.mark.parametrize(
    "method,options,expected,counts",
    [
        ("tome", {"r": 13}, 2.703, [184, 171, 158, 145, 132, 119, 106, 93, 80, 67, 54, 41]),
        ("evit", {"keep_rate": 0.7}, 3.029, [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3),
        ("topk", {"keep_rate": 0.7}, 2.997, [197] * 3 + [139] * 3 + [98] * 3 + [69] * 3),
        ("ppt", {"r": 50}, 2.941, [197] * 3 + [147] * 3 + [97] * 3 + [49] * 3),
    ],
)
def test_method_gmacs_and_counts(deit_small, method, options, expected, counts):
    tokenreduce.apply(deit_small, method, **options)
    with torch.no_grad():
        deit_small(torch.randn(2, 3, 224, 224))
    info = tokenreduce.last_info(deit_small)
    report = tokenreduce.flops.gmacs(deit_small, info)
    tokenreduce.remove(deit_small)
    assert info.tokens_per_block.tolist() == [counts, counts]
    assert [round(g, 3) for g in report.gmacs.tolist()] == [expected, expected]
    assert (report.overhead_gmacs > 0).all()


def test_tome_schedules():
    from tokenreduce.methods.tome import parse_r

    assert parse_r(12, 13) == [13] * 12
    assert parse_r(4, [5, 3]) == [5, 3, 0, 0]
    assert parse_r(5, (8, -1.0)) == [16, 12, 8, 4, 0]
    model = tokenreduce.apply(tiny_vit(), "tome", r=(8, -1.0))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    steps = [197 - n for n in tokenreduce.last_info(model).tokens_per_block[0].tolist()]
    assert steps == [sum(parse_r(12, (8, -1.0))[: i + 1]) for i in range(12)]


def _fused_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """torch's own SDPA formula (the one it registers for the CUDA kernels), from shapes."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def fused_attention_formulas() -> dict:
    """Formulas for the fused attention ops this torch's FlopCounterMode cannot count.

    Some torch releases (2.14) register no formula for the CPU flash kernel, and the counter then
    counts its attention matmuls as 0; the same shape formula torch uses for its GPU kernels
    counts them independently of our analytic model.
    """
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is None or cpu_flash in flop_registry:
        return {}
    return {cpu_flash: _fused_attention_flops}


def counted_gmacs(model, x):
    # with gradients on: this torch's module tracker inside FlopCounterMode fails on a module
    # given a no-grad view of a parameter (timm's AttentionPoolLatent latent queries)
    counter = FlopCounterMode(display=False, custom_mapping=fused_attention_formulas())
    with counter:
        model(x)
    return counter.get_total_flops() / 2e9 / x.shape[0]


def test_fused_attention_is_counted_as_the_explicit_path(deit_small):
    """The counter sees the fused kernel's work: fused and explicit attention count the same."""
    x = torch.randn(1, 3, 224, 224)
    counts = {}
    for fused in (True, False):
        for block in deit_small.blocks:
            block.attn.fused_attn = fused
        counter = FlopCounterMode(display=False, custom_mapping=fused_attention_formulas())
        with torch.no_grad(), counter:
            out = deit_small(x)
        counts[fused] = (counter.get_total_flops(), out)
    for block in deit_small.blocks:
        block.attn.fused_attn = True
    assert counts[True][0] == counts[False][0] > 0
    torch.testing.assert_close(counts[True][1], counts[False][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    "method,options",
    [
        (None, {}),
        ("tome", {"r": 13}),
        ("evit", {}),
        ("topk", {}),
        ("ppt", {}),
        ("ppt", {"threshold": 1.0}),
        ("bat", {}),
        ("diffrate", {}),
        ("tofu", {"r": 13}),
        ("gtp", {}),
    ],
)
def test_analytic_matches_flop_counter(deit_small, method, options, fused):
    for block in deit_small.blocks:
        block.attn.fused_attn = fused
    x = torch.randn(1, 3, 224, 224)
    if method is None:
        analytic = tokenreduce.flops.dense_gmacs(deit_small)
    else:
        tokenreduce.apply(deit_small, method, **options)
    counted = counted_gmacs(deit_small, x)
    if method is not None:
        analytic = tokenreduce.flops.gmacs(deit_small, tokenreduce.last_info(deit_small)).mean_total
        tokenreduce.remove(deit_small)
    for block in deit_small.blocks:
        block.attn.fused_attn = True
    assert abs(counted - analytic) / analytic < 0.01, (counted, analytic)
