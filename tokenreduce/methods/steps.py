"""Reduction steps several methods share, each carrying the token state along: merge by a
bipartite matching (ToMe, PPT's pooling) and keep the top-scoring tokens (EViT, top-k, PPT's
pruning)."""

from __future__ import annotations

import torch

from tokenreduce.ops import merge_positions, merge_source, merge_wavg
from tokenreduce.ops.merging import Matching, matching_destinations
from tokenreduce.ops.owners import follow, follow_rows
from tokenreduce.ops.packing import gather_rows
from tokenreduce.ops.selection import top_rows
from tokenreduce.state import TokenState

Tokens = tuple[torch.Tensor | None, ...]
"""A step's output: tokens, sizes, positions, source map, owner map (the last three None where
the forward does not carry them)."""


def merged_tokens(matching: Matching, x: torch.Tensor, state: TokenState) -> Tokens:
    """x [B, N, C] and what its tokens carry, merged by `matching` (size-weighted average)."""
    owner = state.owner
    if owner is not None:
        owner = follow(owner, matching_destinations(matching, x.shape[1]))
    x, size = merge_wavg(matching, x, state.size)
    position = merge_positions(
        matching, state.position, state.size, size, state.destination_positions
    )
    return x, size, position, merge_source(matching, state.source), owner


def kept_tokens(
    x: torch.Tensor, state: TokenState, size: torch.Tensor, score: torch.Tensor, keep: int
) -> tuple[Tokens, torch.Tensor]:
    """The prefix and the `keep` highest-`score` ([B, N - P]) tokens of x [B, N, C], in
    descending score, with what they carry (size: the state's sizes, materialised). Also returns
    idx [B, keep], the kept positions among the non-prefix tokens."""
    num_prefix, num_tokens = state.num_prefix, x.shape[1]
    idx, rows = top_rows(score, keep, num_prefix)

    def kept(y: torch.Tensor | None) -> torch.Tensor | None:
        return None if y is None else gather_rows(y, rows)

    x = gather_rows(x, rows)
    owner = state.owner
    if owner is not None:
        owner = follow_rows(owner, rows, num_tokens)
    return (x, kept(size), kept(state.position), kept(state.source), owner), idx
