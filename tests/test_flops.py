"""Analytic GMACs: reference values of measurement.md and a FlopCounterMode cross-check."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

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


@pytest.fixture(scope="module")
def deit_small():
    return tiny_vit("deit_small_patch16_224")


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


def counted_gmacs(model, x):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2e9 / x.shape[0]


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
