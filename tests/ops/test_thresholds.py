"""Threshold masks of the learned methods: strict at inference, straight-through in training."""

from __future__ import annotations

import torch

from tokenreduce.ops.thresholds import threshold_mask


def test_threshold_mask_is_strict_and_soft_forward_equals_hard():
    score = torch.tensor([0.2, 0.5, 0.7])
    assert threshold_mask(score, 0.5, 0.1, soft=False).tolist() == [False, False, True]
    soft = threshold_mask(score, torch.tensor(0.5, requires_grad=True), 0.1, soft=True)
    assert soft.tolist() == [0.0, 0.0, 1.0]
    assert soft.requires_grad


def test_soft_sigmoid_tends_to_the_hard_decision_as_tau_goes_to_zero():
    score = torch.linspace(-1, 1, 101, dtype=torch.float64)
    hard = (score > 0.1).double()
    gaps = [
        (torch.sigmoid((score - 0.1) / tau) - hard)[(score - 0.1).abs() > 1e-9].abs().max()
        for tau in (1.0, 0.1, 0.01, 1e-4)
    ]
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False))
    assert gaps[-1] < 1e-12
