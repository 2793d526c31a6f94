"""Per-image token counts in a batch: compact each image's kept tokens to the front and pad.

Padding follows methods.md §1.6: padding slots sit after the real tokens and are marked invalid
(the adapter gives them size 0, so they are never a key, a merge partner or counted).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Packing(NamedTuple):
    """Where each output slot comes from and which slots are real.

    index: [B, T] positions into the input sequence; valid: [B, T] bool; overflow: [B] kept
    tokens dropped because the image kept more than T (only with a static cap).
    """

    index: torch.Tensor
    valid: torch.Tensor
    overflow: torch.Tensor


def pack_kept(keep: torch.Tensor, length: int | None, score: torch.Tensor | None = None) -> Packing:
    """Compact the kept tokens of each image to the front, in their current order.

    keep: [B, N] bool. length: T, the output length; None = the batch's largest kept count,
    which reads one number from the device (the packed path). When an image keeps more than a
    static T, its lowest-`score` [B, N] surplus tokens are dropped (ties: the later one).
    """
    kept = keep.sum(dim=1)
    if length is None:
        length = int(kept.max())
    elif score is not None and length < keep.shape[1]:
        ranked = score.masked_fill(~keep, -torch.inf).argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(ranked).scatter_(
            1, ranked, torch.arange(keep.shape[1], device=keep.device).expand_as(ranked)
        )
        keep = keep & (rank < length)
    order = (~keep).to(torch.uint8).argsort(dim=1, stable=True)[:, :length]
    count = keep.sum(dim=1)
    valid = torch.arange(length, device=keep.device) < count[:, None]
    return Packing(order, valid, kept - count)


def gather_packed(y: torch.Tensor, packing: Packing, fill: float = 0.0) -> torch.Tensor:
    """Rows of y [B, N, C] in packed order, padding slots set to `fill`: [B, T, C]."""
    out = y.gather(1, packing.index.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
    return out.masked_fill(~packing.valid.unsqueeze(-1), fill)
