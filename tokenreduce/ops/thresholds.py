"""Learned threshold decisions (official: LTMP `threshold_masking.py`)."""

from __future__ import annotations

import torch

__all__ = ["threshold_mask"]


def threshold_mask(
    score: torch.Tensor, threshold: torch.Tensor | float, tau: float, soft: bool
) -> torch.Tensor:
    """Keep where score > threshold (strict), docs/methods.md §2.6.

    soft=False: a bool tensor. soft=True (training): a float tensor whose forward values are the
    hard 0/1 decisions and whose gradient is that of sigmoid((score - threshold) / tau)
    (straight-through), so that the threshold learns.
    """
    if not soft:
        return score > threshold
    smooth = torch.sigmoid((score - threshold) / tau)
    hard = (smooth > 0.5).to(smooth.dtype)
    return smooth + (hard - smooth).detach()
