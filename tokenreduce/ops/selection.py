"""Keeping a subset of tokens by score, with an optional fused token for the rest (EViT)."""

from __future__ import annotations

import torch

from tokenreduce.ops.packing import gather_rows, index_range

__all__ = [
    "fuse_rows",
    "gather_tokens",
    "keep_rows",
    "keep_top_tokens",
    "prefix_and_rows",
    "top_rows",
]


def gather_tokens(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx [B, K] of y [B, N, C] -> [B, K, C]."""
    # whole rows by index_select: a gather with the index expanded over C reads one index per
    # element, 3-5x slower on the CPU
    return gather_rows(y, idx)


def prefix_and_rows(idx: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Row indices [B, P + K] of `keep_rows(y, idx, P)`: the prefix rows, then P + idx [B, K]."""
    if not num_prefix:
        return idx
    prefix = index_range(num_prefix, idx.device).expand(idx.shape[0], -1)
    return torch.cat([prefix, idx + num_prefix], dim=1)


def keep_rows(y: torch.Tensor, idx: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """The prefix rows of y [B, N, C], then its non-prefix rows idx [B, K] -> [B, P + K, C]."""
    return gather_rows(y, prefix_and_rows(idx, num_prefix))


def top_rows(score: torch.Tensor, keep: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `keep` non-prefix tokens with the largest score [B, N - P], in descending score:
    their indices [B, keep] into the non-prefix part, and the rows [B, P + keep] of the prefix
    and of them among all N tokens (`prefix_and_rows`)."""
    idx = score.topk(keep, dim=-1, largest=True, sorted=True).indices
    return idx, prefix_and_rows(idx, num_prefix)


def keep_top_tokens(
    y: torch.Tensor, score: torch.Tensor, keep: int, num_prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix tokens, then the `keep` non-prefix tokens of y [B, N, C] with the largest score.

    score: [B, N - P] over the non-prefix tokens. Kept tokens come in descending score order.
    Returns the new tokens [B, P + keep, C] and the kept indices [B, keep] into the non-prefix part.
    """
    idx, rows = top_rows(score, keep, num_prefix)
    return gather_rows(y, rows), idx


def fuse_rows(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One token per image: the rows of y [B, M, C] summed with weight [B, M] (zero at the rows
    not fused; EViT: raw class attention, used as given). Returns [B, 1, C]."""
    return weight.to(y.dtype).unsqueeze(1) @ y
