"""Rotary position embeddings at any token position, for timm's rotary modules.

Every rotary embedding timm builds for Eva models rotates by angles that are linear in a token's
coordinates, and those coordinates are affine in its (row, column) on the patch grid:
RotaryEmbeddingCat (EVA-02, Perception Encoder, naver RoPE-ViT axial), RotaryEmbeddingDinoV3
(0.5-centred, normalised coordinates) and RotaryEmbeddingMixed (per-depth, per-head learned
frequencies). So the embedding of a merged token at a fractional grid position is well defined.
`RotaryPositions.embed` gives each token timm's own table row while it sits on a grid point
(bit-exact for kept and pruned tokens) and the embedding computed at its position otherwise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from timm.layers.pos_embed_sincos import (
    RotaryEmbeddingCat,
    RotaryEmbeddingDinoV3,
    RotaryEmbeddingMixed,
    _build_grid,
    get_mixed_grid,
)
from torch import nn

from tokenreduce.errors import InvalidOptionError, UnsupportedModelError

__all__ = ["ROTARY_MODULES", "RotaryPositions", "RotaryTable", "check_rotary_module"]


ROTARY_MODULES = (RotaryEmbeddingCat, RotaryEmbeddingDinoV3, RotaryEmbeddingMixed)


def check_rotary_module(rope: nn.Module, model_name: str = "") -> None:
    """UnsupportedModelError unless `rope` is a rotary module whose angles this file knows."""
    if not isinstance(rope, ROTARY_MODULES):
        owner = f" of {model_name}" if model_name else ""
        raise UnsupportedModelError(
            f"unsupported rotary embedding {type(rope).__name__}{owner}; supported: "
            + ", ".join(m.__name__ for m in ROTARY_MODULES)
        )


class RotaryTable(NamedTuple):
    """timm's rotary embedding of an unreduced patch grid, as the model's forward built it.

    table: [H * W, E] (E = 2 x head_dim: sin then cos), or [depth, heads, H * W, E] for
    per-depth embeddings. grid_size: (H, W) of this input.
    """

    table: torch.Tensor
    grid_size: tuple[int, int]


class CoordinateMap(NamedTuple):
    """The module's coordinates as an affine function of (row, column): origin + r dr + c dc."""

    origin: torch.Tensor
    step_row: torch.Tensor
    step_col: torch.Tensor


class RotaryPositions:
    """The rotary embedding of tokens at any grid position, for one timm rotary module."""

    def __init__(self, rope: nn.Module) -> None:
        check_rotary_module(rope)
        self.rope = rope
        self.per_depth = isinstance(rope, RotaryEmbeddingMixed)
        self.rotate_half = bool(getattr(rope, "rotate_half", False))
        self._maps: dict[tuple, CoordinateMap] = {}
        self._bases: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def check_forward(self, training: bool) -> None:
        """Training-time coordinate augmentation moves every grid point at random; positions of
        merged tokens would not follow it."""
        if training and getattr(self.rope, "aug_active", False):
            raise InvalidOptionError(
                f"{type(self.rope).__name__} has training-time coordinate augmentation "
                "(shift/jitter/rescale_coords), which a model with token reduction does not "
                "follow; accepted: model.eval(), or a rotary embedding without augmentation"
            )

    def coordinates(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """The module's coordinates of every grid point [H, W, 2], as timm builds them."""
        rope = self.rope
        if isinstance(rope, RotaryEmbeddingMixed):
            t_x, t_y = get_mixed_grid(list(grid_size), grid_indexing=rope.grid_indexing)
            return torch.stack([t_x, t_y], dim=-1).reshape(*grid_size, 2)
        if isinstance(rope, RotaryEmbeddingDinoV3):
            grid_type, ref_shape = "centered", None
        else:
            grid_type, ref_shape = rope.grid_type, rope.ref_feat_shape
        return _build_grid(
            list(grid_size),
            grid_type=grid_type,
            ref_feat_shape=ref_shape,
            grid_offset=rope.grid_offset,
            grid_indexing=rope.grid_indexing,
            normalize_coords=rope.normalize_coords,
        )

    def coordinate_map(self, grid_size: tuple[int, int], like: torch.Tensor) -> CoordinateMap:
        """origin, step_row, step_col [2] on `like`'s device and dtype (cached: no copy to the
        device per block). Not cached while torch.export traces: its tensors are fake."""
        key = (grid_size, like.device, like.dtype)
        if key not in self._maps or torch.compiler.is_exporting():
            grid = self.coordinates(grid_size).to(torch.float64)
            origin = grid[0, 0]
            step_row = grid[1, 0] - origin if grid_size[0] > 1 else torch.zeros_like(origin)
            step_col = grid[0, 1] - origin if grid_size[1] > 1 else torch.zeros_like(origin)
            coord_map = CoordinateMap(*(c.to(like) for c in (origin, step_row, step_col)))
            if torch.compiler.is_exporting():
                return coord_map
            self._maps[key] = coord_map
        return self._maps[key]

    def frequencies(self, depth_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Angle per unit of each coordinate, [F] (or [heads, F] per depth): angles = c0 f0 + c1 f1
        over the F angles timm evaluates before laying them out."""
        rope = self.rope
        if isinstance(rope, RotaryEmbeddingMixed):
            return rope.freqs[0, depth_index], rope.freqs[1, depth_index]
        if isinstance(rope, RotaryEmbeddingDinoV3):
            per_axis = 2 * math.pi / rope.periods
        else:
            per_axis = rope.bands
        zeros = torch.zeros_like(per_axis)
        return torch.cat([per_axis, zeros]), torch.cat([zeros, per_axis])

    def angle_basis(
        self, grid_size: tuple[int, int], depth_index: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Angles in timm's layout as an affine function of (row, column): origin [.., 1, E / 2]
        and steps [.., 2, E / 2], so that angles(p) = origin + p @ steps, on `like`'s device and
        dtype. Cached per grid unless the frequencies are per depth (learned parameters) or
        torch.export traces (its tensors are fake)."""
        key = (grid_size, depth_index, like.dtype, like.device)
        cached = not self.per_depth and not torch.compiler.is_exporting()
        if cached and key in self._bases:
            return self._bases[key]
        freq_a, freq_b = self.frequencies(depth_index)
        coord_map = self.coordinate_map(grid_size, freq_a)

        def angles(coords: torch.Tensor) -> torch.Tensor:
            return self._layout(coords[0] * freq_a + coords[1] * freq_b)

        origin, step_row, step_col = (angles(c) for c in coord_map)
        steps = torch.stack([step_row, step_col], dim=-2)
        basis = origin.unsqueeze(-2).to(like), steps.to(like)
        if cached:
            self._bases[key] = basis
        return basis

    def embed(self, position: torch.Tensor, rotary: RotaryTable, depth_index: int) -> torch.Tensor:
        """The embedding of tokens at `position` [B, N, 2] (row, column): [B, 1, N, E], or
        [B, heads, N, E] per depth, in the table's dtype."""
        table = rotary.table[depth_index] if self.per_depth else rotary.table
        rows, cols = rotary.grid_size
        on_grid = (position == position.round()).all(dim=-1)
        index = (position[..., 0] * cols + position[..., 1]).round().long()
        index = index.clamp(0, rows * cols - 1)
        gathered = table[:, index].transpose(0, 1) if self.per_depth else table[index].unsqueeze(1)
        origin, steps = self.angle_basis(rotary.grid_size, depth_index, position)
        angles = origin + position.unsqueeze(1) @ steps
        computed = torch.cat([angles.sin(), angles.cos()], dim=-1).to(table.dtype)
        return torch.where(on_grid[:, None, :, None], gathered, computed)

    def _layout(self, values: torch.Tensor) -> torch.Tensor:
        """timm's layout of per-angle values: [a, b, .., a, b, ..] (half) or [a, a, b, b, ..]."""
        if self.rotate_half:
            return torch.cat([values, values], dim=-1)
        return values.repeat_interleave(2, dim=-1)
