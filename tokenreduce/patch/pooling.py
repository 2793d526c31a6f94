"""Pooling over reduced tokens: each token weighs as the patches it holds, padding and masked
tokens weigh nothing. No method leaves an image without a patch token (docs/methods.md §1.6),
so a pooling of patch tokens always has one to pool.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenreduce.ops.attention import padding_bias, size_bias
from tokenreduce.state import TokenState

__all__ = [
    "pooling_key_bias",
    "pooling_weights",
    "weighted_mean",
    "weighted_pool",
]


def pooling_weights(state: TokenState, x: torch.Tensor) -> torch.Tensor:
    """What each token of x [B, N, C] weighs in a pooling: [B, N, 1] in x's dtype, its size (0
    at padding), times the training mask of a learned method (masked tokens weigh 0)."""
    weight = state.sizes_like(x)
    if state.mask is not None:
        weight = weight * state.mask.unsqueeze(-1)
    return weight.to(x.dtype)


def pooling_key_bias(
    state: TokenState, size: torch.Tensor, weight: torch.Tensor, prop_attn: bool, dtype: torch.dtype
) -> torch.Tensor | None:
    """Key bias [B, 1, 1, N] of an attention pooling over tokens with these sizes and weights
    ([B, N, 1], `pooling_weights`): log(size) with proportional attention, -inf where a token
    weighs 0 (padding, masked in training); None when neither applies."""
    bias = size_bias(size, dtype) if prop_attn else None
    if state.valid is None and state.mask is None:
        return bias
    padding = padding_bias(weight.detach()[..., 0] > 0, dtype)
    return padding if bias is None else bias + padding


def weighted_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of the tokens x [B, N, C] weighted by weight [B, N, 1] (`pooling_weights`): [B, C]."""
    return (x * weight).sum(dim=1) / weight.sum(dim=1)


def weighted_pool(
    x: torch.Tensor,
    state: TokenState | None,
    pool_type: str,
    num_prefix: int,
    include_prefix: bool,
    attn_pool: nn.Module | None,
    prop_attn: bool,
) -> torch.Tensor | None:
    """Pooling that accounts for token sizes, padding and training masks, or None when the
    family's own pooling is exact (nothing was reduced, or a pooling that sizes do not change).

    x: final tokens [B, N, C]. attn_pool: an attention-pooling module taking `attn_mask` (timm's
    AttentionPoolLatent); it gets log(size) as key bias with proportional attention, and -inf at
    padding. Otherwise "avg" is the size-weighted mean, "max" the max over real tokens and
    "avgmax" the mean of the two. A pooling of patch tokens only always has one to pool: the
    methods with per-image counts keep each image's best patch token (docs/methods.md §1.6).
    """
    if state is None or (state.size is None and state.mask is None):
        return None
    size = state.sizes_like(x)
    if size.shape[:2] != x.shape[:2]:
        return None
    if attn_pool is None and pool_type not in ("avg", "avgmax", "max"):
        return None
    weight = pooling_weights(state, x)
    if not include_prefix:
        x, size, weight = x[:, num_prefix:], size[:, num_prefix:], weight[:, num_prefix:]
    if attn_pool is not None:
        return attn_pool(x, attn_mask=pooling_key_bias(state, size, weight, prop_attn, x.dtype))

    def real_max() -> torch.Tensor:
        return x.masked_fill(~(weight.detach() > 0), -torch.inf).amax(dim=1)

    if pool_type == "max":
        return real_max()
    mean = weighted_mean(x, weight)
    return mean if pool_type == "avg" else 0.5 * (real_max() + mean)
