"""Token maps: which image patches each remaining token stands for, after each reducing block.

Merged groups are drawn in their mean colour with borders, pruned patches (and patches folded
into a fused "rest" token, as EViT's) in grey, as in the ToMe, EViT and PPT papers' figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokenreduce.errors import InvalidOptionError
from tokenreduce.info import ReductionInfo

__all__ = ["BORDER", "PRUNED_GREY", "draw_saliency", "draw_token_maps", "patch_owners", "token_map"]


PRUNED_GREY = 0.82
BORDER = 0.08


def patch_owners(source: torch.Tensor, num_prefix: int, fused_last: bool) -> torch.Tensor:
    """For each original patch, the index of the current token holding it, -1 when pruned.

    source: bool [T, N0] (current tokens x original tokens, prefix columns first). A patch held
    only by a fused last token counts as pruned. Returns LongTensor [N0 - P].
    """
    held = source[:, num_prefix:]
    if fused_last:
        held = held[:-1]
    owner = held.to(torch.uint8).argmax(dim=0)
    return torch.where(held.any(dim=0), owner, -1)


def token_map(image: torch.Tensor, owners: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """An RGB array [H, W, 3]: each group of patches in the mean colour of its pixels, group
    borders dark, pruned patches grey. image: [3, H, W] in [0, 1]; owners: [gh * gw]."""
    gh, gw = grid
    height, width = image.shape[1:]
    ph, pw = height // gh, width // gw
    patch_colour = F.avg_pool2d(image[None, :, : gh * ph, : gw * pw].float(), (ph, pw))
    patch_colour = patch_colour[0].flatten(1).T
    groups = int(owners.max()) + 1 if owners.numel() else 0
    one_hot = F.one_hot(owners.clamp(min=0), max(groups, 1)).float() * (owners >= 0)[:, None]
    group_colour = (one_hot.T @ patch_colour) / one_hot.sum(0).clamp(min=1)[:, None]
    colour = torch.where(
        (owners >= 0)[:, None], group_colour[owners.clamp(min=0)], torch.full((1, 3), PRUNED_GREY)
    )
    pixels = colour.reshape(gh, gw, 3).repeat_interleave(ph, 0).repeat_interleave(pw, 1)
    owner_px = owners.reshape(gh, gw).repeat_interleave(ph, 0).repeat_interleave(pw, 1)
    edge = torch.zeros_like(owner_px, dtype=torch.bool)
    edge[:, :-1] |= owner_px[:, :-1] != owner_px[:, 1:]
    edge[:-1, :] |= owner_px[:-1, :] != owner_px[1:, :]
    pixels[edge] = BORDER
    return pixels.numpy()


def _shown_blocks(reduce_blocks: Sequence[int], max_columns: int) -> list[int]:
    """At most `max_columns` reducing blocks, evenly spaced, always including the last."""
    blocks = list(reduce_blocks)
    if len(blocks) <= max_columns:
        return blocks
    picks = np.linspace(0, len(blocks) - 1, max_columns).round().astype(int)
    return [blocks[i] for i in sorted(set(picks.tolist()))]


def draw_token_maps(
    images: torch.Tensor,
    info: ReductionInfo,
    grid: tuple[int, int],
    path: str | Path,
    title: str = "",
    row_labels: Sequence[str] | None = None,
    max_columns: int = 4,
) -> Path:
    """Write a PNG grid: one row per image, the input then the token map after each reducing
    block (at most `max_columns`, evenly spaced). images: [B, 3, H, W] in [0, 1]; info from a
    forward with `trace_source=True` on the same images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if info.source_blk is None:
        raise InvalidOptionError(
            f"method {info.method!r} ran without trace_source=True; token maps need the sources"
        )
    blocks = _shown_blocks(info.reduce_blocks, max_columns)
    num_prefix = info.source_blk[0].shape[2] - grid[0] * grid[1]
    rows, cols = images.shape[0], 1 + len(blocks)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.1 * rows + 0.4), squeeze=False)
    for b in range(rows):
        axes[b, 0].imshow(images[b].permute(1, 2, 0).numpy())
        axes[b, 0].set_title(row_labels[b] if row_labels else "input", fontsize=8)
        for col, block in enumerate(blocks, start=1):
            tokens = int(info.tokens_per_block[b, block])
            # padding slots (per-image counts) follow the real tokens: the fused one is the
            # last real token
            source = info.source_blk[block][b][:tokens]
            fused = info.config.fused_token(info.records, info.reduce_blocks.index(block))
            if isinstance(fused, torch.Tensor):
                fused = bool(fused[b])
            owners = patch_owners(source, num_prefix, fused)
            axes[b, col].imshow(token_map(images[b], owners, grid))
            axes[b, col].set_title(f"after block {block}: {tokens} tok", fontsize=8)
    return _save_figure(fig, axes, title, path)


def draw_saliency(
    images: torch.Tensor,
    dense: torch.Tensor,
    reduced: Sequence[tuple[str, torch.Tensor]],
    path: str | Path,
    title: str = "",
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Write a PNG grid of saliency maps: one row per image, the input, the dense model's map,
    then each reduced model's map with its Pearson CC to the dense one.

    images: [B, 3, H, W] in [0, 1]; dense: [B, 1, H, W]; reduced: (label, maps [B, 1, H, W])
    per method.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenreduce.dense import saliency_agreement

    rows, cols = images.shape[0], 2 + len(reduced)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.1 * rows + 0.4), squeeze=False)
    scores = [saliency_agreement(maps, dense)["cc"] for _, maps in reduced]
    for b in range(rows):
        axes[b, 0].imshow(images[b].permute(1, 2, 0).numpy())
        axes[b, 0].set_title(row_labels[b] if row_labels else "input", fontsize=8)
        axes[b, 1].imshow(dense[b, 0].float().numpy(), cmap="magma", vmin=0, vmax=1)
        axes[b, 1].set_title("dense", fontsize=8)
        for col, ((label, maps), cc) in enumerate(zip(reduced, scores, strict=True), start=2):
            axes[b, col].imshow(maps[b, 0].float().numpy(), cmap="magma", vmin=0, vmax=1)
            axes[b, col].set_title(f"{label}: CC {cc[b]:.3f}", fontsize=8)
    return _save_figure(fig, axes, title, path)


def _save_figure(fig: Any, axes: np.ndarray, title: str, path: str | Path) -> Path:
    """Axes off, the title, a tight layout; the figure written to `path` (PNG) and closed."""
    import matplotlib.pyplot as plt

    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
