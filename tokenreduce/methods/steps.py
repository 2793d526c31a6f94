"""Reduction steps several methods share, each carrying everything the tokens carry: keep some
rows (EViT, top-k, PPT's pruning, BAT, AS-ViT, LTMP), merge by a bipartite matching (ToMe,
PPT's pooling, BAT's attentive tokens) and fuse some tokens into one (EViT, AS-ViT).

A step takes and returns `Tokens`, the tokens with every per-token field of their state, so that
no field can be left behind; a method hands its final `Tokens` to the state with `in_state`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from tokenreduce.ops import fuse_rows, mean_position, merge_positions, merge_source, merge_wavg
from tokenreduce.ops.merging import Matching, matching_destinations
from tokenreduce.ops.owners import follow, follow_rows
from tokenreduce.ops.packing import gather_rows
from tokenreduce.ops.selection import top_rows
from tokenreduce.state import TokenState

__all__ = ["Tokens", "carried", "kept_rows", "kept_tokens", "merged_tokens", "with_fused_token"]


class Tokens(NamedTuple):
    """Tokens x [B, N, C] and the per-token fields of their `TokenState` (see there): size
    [B, N, 1] (None: every size 1), source [B, N, N0], valid [B, N], position [B, N, 2] and owner
    [B, N0] (rows of x), each None where the forward does not carry it."""

    x: torch.Tensor
    size: torch.Tensor | None
    source: torch.Tensor | None
    valid: torch.Tensor | None
    position: torch.Tensor | None
    owner: torch.Tensor | None

    def in_state(self, state: TokenState, counts: Sequence[int] | None = None) -> TokenState:
        """`state` with these tokens' fields (counts: `valid`'s per-image counts, when read on
        the host)."""
        # mask None: only a learned method's training forward has a key mask, and it keeps
        # every token, changing the mask alone (docs/methods.md §2.7)
        return state.with_tokens(
            size=self.size,
            source=self.source,
            valid=self.valid,
            mask=None,
            position=self.position,
            owner=self.owner,
            counts=counts,
        )


def carried(x: torch.Tensor, state: TokenState, size: torch.Tensor | None) -> Tokens:
    """x [B, N, C] with what its tokens carry, sizes `size`: the state's (a merge adds them
    up, implicit or not), or `state.sizes_like(x)` where a step's output keeps them."""
    return Tokens(x, size, state.source, state.valid, state.position, state.owner)


def kept_rows(tokens: Tokens, rows: torch.Tensor, valid: torch.Tensor | None = None) -> Tokens:
    """The rows [B, T] of x and of every tensor its tokens carry; the owner map follows.

    valid: [B, T] bool, False at padding slots, which hold zeros (size 0) and no original token;
    None when every slot is a real token. `rows` name real tokens only, so `valid` is the
    output's padding, whatever the input's."""
    padding = None if valid is None else ~valid.unsqueeze(-1)

    def kept(y: torch.Tensor | None) -> torch.Tensor | None:
        if y is None:
            return None
        y = gather_rows(y, rows)
        return y if padding is None else y.masked_fill(padding, 0.0)

    owner = follow_rows(tokens.owner, rows, tokens.x.shape[1], valid)
    return Tokens(
        kept(tokens.x), kept(tokens.size), kept(tokens.source), valid, kept(tokens.position), owner
    )


def kept_tokens(
    tokens: Tokens, num_prefix: int, score: torch.Tensor, keep: int
) -> tuple[Tokens, torch.Tensor]:
    """The prefix and the `keep` highest-`score` ([B, N - P]) tokens, in descending score. Also
    returns idx [B, keep], the kept positions among the non-prefix tokens."""
    idx, rows = top_rows(score, keep, num_prefix)
    return kept_rows(tokens, rows), idx


def merged_tokens(matching: Matching, tokens: Tokens, destination_positions: bool) -> Tokens:
    """The tokens (no padding) merged by `matching`: size-weighted average, sizes summed,
    sources OR-ed, positions by the state's `position_rule` (`destination_positions`)."""
    owner = tokens.owner
    if owner is not None:
        owner = follow(owner, matching_destinations(matching, tokens.x.shape[1]))
    x, size = merge_wavg(matching, tokens.x, tokens.size)
    position = merge_positions(matching, tokens.position, tokens.size, size, destination_positions)
    return Tokens(x, size, merge_source(matching, tokens.source), None, position, owner)


def with_fused_token(
    kept: Tokens, tokens: Tokens, num_prefix: int, dropped: torch.Tensor, weight: torch.Tensor
) -> Tokens:
    """`kept` with one more token per image, last: the non-prefix tokens of `tokens` (sizes
    explicit) that `dropped` [B, N - P] marks 1 (0 elsewhere), fused.

    Its feature is their sum weighted by `weight` [B, N - P] (zero where not dropped; EViT and
    AS-ViT: class attention, not renormalised), its size the sum of theirs, its source their OR,
    its position their size-weighted mean. It holds none of them in the owner map: they left
    the sequence (docs/methods.md §1.8), and `kept`'s owner map stays. Where `kept` is padded,
    the fused token is real when it fused some token."""

    def fused(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return fuse_rows(y[:, num_prefix:], w)

    size = fused(tokens.size, dropped)
    source = position = valid = None
    if tokens.source is not None:
        source = torch.cat([kept.source, fused(tokens.source, dropped).clamp_max(1.0)], dim=1)
    if tokens.position is not None:
        moment = fused(tokens.position * tokens.size, dropped)
        position = torch.cat([kept.position, mean_position(moment, size)], dim=1)
    if kept.valid is not None:
        valid = torch.cat([kept.valid, dropped.sum(dim=1, keepdim=True) > 0], dim=1)
    x = torch.cat([kept.x, fused(tokens.x, weight)], dim=1)
    return Tokens(x, torch.cat([kept.size, size], dim=1), source, valid, position, kept.owner)
