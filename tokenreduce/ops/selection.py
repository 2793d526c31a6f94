"""Keeping a subset of tokens by score, with an optional fused token for the rest (EViT)."""

from __future__ import annotations

import torch

from tokenreduce.ops.packing import index_range

__all__ = [
    "fuse_rows",
    "keep_best_",
    "prefix_and_rows",
    "top_rows",
]


def prefix_and_rows(idx: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Row indices [B, P + K]: the prefix rows, then P + idx, idx [B, K] into the non-prefix
    tokens."""
    if not num_prefix:
        return idx
    prefix = index_range(num_prefix, idx.device).expand(idx.shape[0], -1)
    return torch.cat([prefix, idx + num_prefix], dim=1)


def top_rows(score: torch.Tensor, keep: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `keep` non-prefix tokens with the largest score [B, N - P], in descending score:
    their indices [B, keep] into the non-prefix part, and the rows [B, P + keep] of the prefix
    and of them among all N tokens (`prefix_and_rows`)."""
    idx = score.topk(keep, dim=-1, largest=True, sorted=True).indices
    return idx, prefix_and_rows(idx, num_prefix)


def fuse_rows(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One token per image: the rows of y [B, M, C] summed with weight [B, M] (zero at the rows
    not fused; EViT: raw class attention, used as given). Returns [B, 1, C]."""
    return weight.to(y.dtype).unsqueeze(1) @ y


def keep_best_(keep: torch.Tensor, score: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Set, in place, each image's highest-`score` non-prefix token in keep [B, N] (bool), so
    that no image loses its last patch token (docs/methods.md §1.6); returns keep.

    score [B, N]: -inf where a token cannot be kept (padding, merged away). Where keep is
    `score > threshold` and an image keeps some non-prefix token, its best one is kept already:
    nothing changes. Two operations, no host sync (the static path compiles with it)."""
    best = score[:, num_prefix:].argmax(dim=1, keepdim=True)
    keep[:, num_prefix:].scatter_(1, best, True)
    return keep
