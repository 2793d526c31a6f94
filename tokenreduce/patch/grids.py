"""Patch grids: a block's output put back on the original token grid (docs/methods.md §1.8), and
the grid positions of an unreduced sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from tokenreduce.errors import InvalidOptionError
from tokenreduce.ops.owners import fill_from_nearest

__all__ = [
    "PRUNED_RULES",
    "PatchGrid",
    "check_pruned_rule",
    "grid_positions",
    "grid_tokens",
]


class PatchGrid(NamedTuple):
    """A block's output on the original token grid.

    features: [B, N0, C] (prefix first) each original token's feature: that of the token holding
    it, or, once its token left the sequence (pruned, fused), the feature it had then. held:
    [B, N0] bool, whether a token of the block's output still holds it.
    """

    features: torch.Tensor
    held: torch.Tensor


PRUNED_RULES = ("exit", "zero", "nearest")
"""What a patch grid gives the original tokens whose token left the sequence: "exit", the
feature it had then (through the final norm when the grid is normed); "zero"; or "nearest", the
feature of the nearest patch on the grid that a token still holds (docs/methods.md §1.8)."""


def check_pruned_rule(pruned: object) -> None:
    if pruned not in PRUNED_RULES:
        raise InvalidOptionError(
            f"pruned={pruned!r} is not accepted; accepted: {' or '.join(map(repr, PRUNED_RULES))}"
        )


def grid_tokens(
    grid: PatchGrid,
    norm: nn.Module | None,
    pruned: str,
    grid_size: tuple[int, int],
    num_prefix: int,
) -> torch.Tensor:
    """The [B, N0, C] features of a `PatchGrid` (prefix first, then the `grid_size` patches row by
    row), through `norm` when given, the tokens no longer held as `pruned` says."""
    features = grid.features if norm is None else norm(grid.features)
    if pruned == "zero":
        return features.masked_fill(~grid.held.unsqueeze(-1), 0.0)
    if pruned == "nearest":
        return fill_from_nearest(features, grid.held, grid_size, num_prefix)
    return features


def grid_positions(grid_size: tuple[int, int], num_prefix: int, batch: int) -> torch.Tensor:
    """(row, column) of every token of an unreduced sequence [B, P + H * W, 2], prefix rows 0."""
    rows, cols = grid_size
    grid = torch.stack(
        torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1
    ).reshape(-1, 2)
    position = torch.cat([torch.zeros(num_prefix, 2, dtype=torch.long), grid])
    return position.to(torch.float32).expand(batch, -1, -1)
