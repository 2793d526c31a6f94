"""Which current token holds each original token: the compact map that puts a reduced sequence
back on the original token grid (ToMe's "unmerge", generalised to pruning and padding).

`owner` [B, N0] is the row of the current sequence that holds each original token (prefix
included), or -1 once the token has left the sequence (pruned, or folded into a fused token). A
reduction step moves every current row to at most one new row; that step is a `destination` map
[B, N] (new row of each current row, -1 for rows that leave), and the owner map follows it with
one gather: O(N0) per reducing block, never an N x N0 source matrix.
"""

from __future__ import annotations

import torch

from tokenreduce.ops.packing import gather_rows, index_range

__all__ = [
    "fill_from_nearest",
    "follow",
    "follow_rows",
    "gather_destinations",
    "held_features",
    "record_exits",
]


def follow(owner: torch.Tensor | None, destination: torch.Tensor) -> torch.Tensor | None:
    """The owner map [B, N0] after a step that sends current row i to destination[b, i] [B, N]
    (-1: the row leaves the sequence); None stays None."""
    if owner is None:
        return None
    moved = destination.gather(1, owner.clamp_min(0))
    return torch.where(owner >= 0, moved, -1)


def gather_destinations(
    index: torch.Tensor,
    num_rows: int,
    valid: torch.Tensor | None = None,
    flat: bool = False,
    missing: int = -1,
) -> torch.Tensor:
    """The destination map [B, num_rows] of a gather whose new row t is old row index[b, t]
    ([B, T]); old rows not gathered get `missing`, and so do padding slots (valid [B, T] False).
    flat: number the new rows across the batch, b * T + t (rows of the flat [B * T, C] output)."""
    batch, slots = index.shape
    if flat:
        new_rows = index_range(batch * slots, index.device).view(batch, slots)
    else:
        new_rows = index_range(slots, index.device).expand(batch, slots)
    if valid is not None:  # padding slots write into a spare column that is cut off
        index = index.masked_fill(~valid, num_rows)
    destination = index.new_full((batch, num_rows + 1), missing)
    destination.scatter_(1, index, new_rows)
    return destination[:, :num_rows]


def follow_rows(
    owner: torch.Tensor | None,
    index: torch.Tensor,
    num_rows: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The owner map after a gather of rows index [B, T] out of num_rows (see
    `gather_destinations`); None stays None."""
    if owner is None:
        return None
    return follow(owner, gather_destinations(index, num_rows, valid))


def held_features(
    x: torch.Tensor, owner: torch.Tensor, exited: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every original token's feature: the row of x [B, N, C] that holds it, or its row of
    `exited` [B, N0, C] (zeros when None) once it left the sequence.

    Returns (features [B, N0, C], held [B, N0] bool: still held by a token of x).
    """
    held = owner >= 0
    features = gather_rows(x, owner.clamp_min(0))
    if exited is None:
        exited = torch.zeros_like(features)
    return torch.where(held.unsqueeze(-1), features, exited), held


def record_exits(
    x: torch.Tensor,
    owner_before: torch.Tensor,
    owner_after: torch.Tensor,
    exited: torch.Tensor | None,
) -> torch.Tensor:
    """`exited` [B, N0, C] (zeros when None) with the tokens that a step removed set to the
    feature their row of x [B, N, C], the step's input, had."""
    leaving = (owner_after < 0) & (owner_before >= 0)
    features, _ = held_features(x, owner_before, exited)
    if exited is None:
        exited = torch.zeros_like(features)
    return torch.where(leaving.unsqueeze(-1), features, exited)


def fill_from_nearest(
    features: torch.Tensor, held: torch.Tensor, grid_size: tuple[int, int], num_prefix: int
) -> torch.Tensor:
    """Each patch that no token holds takes the feature of the nearest held patch on the grid.

    features: [B, P + H * W, C] (prefix first, patches row by row); held: [B, P + H * W] bool;
    grid_size: (H, W). Distance is Euclidean in patch units; ties go to the earlier patch. An
    image with no held patch keeps its features. Works once per grid: [B, HW, HW] distances.
    """
    rows, cols = grid_size
    index = torch.arange(rows * cols, device=features.device, dtype=torch.int32)
    row, col = index // cols, index % cols
    squared = (row[:, None] - row[None, :]) ** 2 + (col[:, None] - col[None, :]) ** 2
    patches, held_patches = features[:, num_prefix:], held[:, num_prefix:]
    squared = squared.expand(len(held), -1, -1).masked_fill(
        ~held_patches[:, None, :], torch.iinfo(squared.dtype).max
    )
    nearest = squared.argmin(dim=-1)
    filled = patches.gather(1, nearest.unsqueeze(-1).expand_as(patches))
    own = held_patches | ~held_patches.any(dim=1, keepdim=True)
    patches = torch.where(own.unsqueeze(-1), patches, filled)
    return torch.cat([features[:, :num_prefix], patches], dim=1)
