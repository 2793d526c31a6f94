"""Per-image token counts in a batch: compact each image's kept tokens to the front and pad, and
the flat (ragged) layout of the real tokens alone.

Padding follows docs/methods.md §1.6: padding slots sit after the real tokens and are marked invalid
(the adapter gives them size 0, so they are never a key, a merge partner or counted).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

__all__ = [
    "Packing",
    "RaggedLayout",
    "cached_index",
    "gather_rows",
    "index_range",
    "merge_into_slots",
    "pack_kept",
    "row_offsets",
]


def cached_index(build: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Cache an index tensor that depends only on `build`'s hashable arguments (lengths, orders,
    a device): built once outside inference mode, so that it serves inference and training
    alike, and afresh under torch.compile, which does not look into caches. Callers only read
    it."""

    @functools.lru_cache(maxsize=64)
    def cached(*args: Any) -> torch.Tensor:
        with torch.inference_mode(False):
            return build(*args)

    @functools.wraps(build)
    def index(*args: Any) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return build(*args)
        return cached(*args)

    return index


@cached_index
def _range(length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(length, device=device)


@cached_index
def row_offsets(batch: int, stride: int, start: int, device: torch.device) -> torch.Tensor:
    """[B, 1]: start + b * stride for each image b, the first row of each image's rows in a
    flattened [B * stride, C] batch (plus start). Read only."""
    return torch.arange(batch, device=device).unsqueeze(1) * stride + start


def index_range(n: int, device: torch.device) -> torch.Tensor:
    """torch.arange(n) on `device` as a view of a cached range (a power of two long, so that the
    varying counts of per-image methods share a few): no kernel per call. Read only."""
    if not isinstance(n, int):  # symbolic (torch.export's dynamic batch): its length is unknown
        return torch.arange(n, device=device)
    return _range(1 << max(n - 1, 0).bit_length(), device)[:n]


class Packing(NamedTuple):
    """Where each output slot comes from and which slots are real.

    index: [B, T] positions into the input sequence; valid: [B, T] bool, or None when every slot
    is real (every image kept the same number of tokens: no padding at all); overflow: [B] kept
    tokens dropped because the image kept more than T, None without a static T (nothing is);
    counts: each image's real slots, where the packing read them on the host (with `valid`,
    without a static T), else None.
    """

    index: torch.Tensor
    valid: torch.Tensor | None
    overflow: torch.Tensor | None
    counts: list[int] | None = None


def pack_kept(keep: torch.Tensor, length: int | None, score: torch.Tensor | None = None) -> Packing:
    """Compact the kept tokens of each image to the front, in their current order.

    keep: [B, N] bool. length: T, the output length; None = the batch's largest kept count,
    which reads the B counts from the device once (the packed path); when every image keeps the
    same count there is no padding and `valid` is None. When an image keeps more than a static T,
    its lowest-`score` [B, N] surplus tokens are dropped (ties: the later one).
    """
    static = length is not None
    if not static and keep.shape[0] == 1:  # one image: its kept positions, no padding
        return Packing(keep[0].nonzero().view(1, -1), None, None)
    kept = keep.sum(dim=1)
    uniform = False
    if not static:
        counts = kept.tolist() or [keep.shape[1]]  # an empty batch keeps its (empty) shape
        length, uniform = max(counts), min(counts) == max(counts)
    elif score is not None and length < keep.shape[1]:
        ranked = score.masked_fill(~keep, -torch.inf).argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(ranked).scatter_(
            1, ranked, torch.arange(keep.shape[1], device=keep.device).expand_as(ranked)
        )
        keep = keep & (rank < length)
    order = (~keep).to(torch.uint8).argsort(dim=1, stable=True)[:, :length]
    count = keep.sum(dim=1) if static else kept
    valid = None if uniform else torch.arange(length, device=keep.device) < count[:, None]
    if static:
        return Packing(order, valid, kept - count)
    return Packing(order, valid, None, None if uniform else counts)


def gather_rows(y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per image, the rows of y [B, N, C] at index [B, T]: [B, T, C] (one row copy each)."""
    batch, tokens, channels = y.shape
    if batch == 1:
        return y[0].index_select(0, index[0]).unsqueeze(0)
    offset = row_offsets(batch, tokens, 0, index.device)
    flat = y.reshape(batch * tokens, channels).index_select(0, (index + offset).view(-1))
    return flat.view(batch, index.shape[1], channels)


def merge_into_slots(
    tensors: tuple[torch.Tensor, ...],
    own: torch.Tensor,
    moved: torch.Tensor | None,
    length: int,
    every_slot_owned: bool = False,
) -> list[torch.Tensor]:
    """Rows of each y [B, N, C] of `tensors` into `length` output slots per image.

    own: [B, N] flat slots b * length + t, or B * length for none; each slot is the own slot of
    at most one row. moved: [B, ceil(N / 2)] the same for the rows at even positions (bipartite
    set A), or None. Row i is copied to slot own[b, i], and an even row also added to slot
    moved[b, i // 2]. Returns one [B, length, C] per tensor, zero where no row arrives
    (every_slot_owned: the caller knows that every slot is some row's own, so nothing is zeroed
    first). A slot holds its own row plus the rows moved into it, added in row order (on the CPU
    the order of `scatter_add`): two passes over the rows into one flat buffer (its spare last
    row takes the rows going nowhere), no per-image loop.
    """
    batch = own.shape[0]
    rows = batch * length
    own = own.view(-1)
    merged = []
    for y in tensors:
        channels = y.shape[-1]
        out = (
            y.new_empty(rows + 1, channels) if every_slot_owned else y.new_zeros(rows + 1, channels)
        )
        flat = y.reshape(-1, channels)
        out.index_copy_(0, own, flat)
        if moved is not None:  # from contiguous rows: index_add_ is 2-4x slower from strided
            out.index_add_(0, moved.view(-1), y[:, ::2].reshape(-1, channels).contiguous())
        merged.append(out[:rows].view(batch, length, channels))
    return merged


class RaggedLayout:
    """The real tokens of a padded batch as one flat [M, C] tensor (M = total real tokens).

    Per-token work (norms, linear layers, MLP) runs on the flat rows, so each image pays for its
    own tokens only; `pad` rebuilds the padded [B, T, C] view for what needs image boundaries
    (attention, a method's decisions, pooling). Building the layout reads each image's count from
    the device once, unless the caller knows them.

    valid: [B, T] bool, the real slots of the padded batch. counts: the real slots of each image,
    when already read on the host.
    """

    def __init__(self, valid: torch.Tensor, counts: list[int] | None = None) -> None:
        self.batch, self.length = valid.shape
        self.valid = valid
        self.counts = valid.sum(dim=1).tolist() if counts is None else counts
        # the number of real rows is known: no second read for the index
        self.index = torch.nonzero_static(valid.reshape(-1), size=sum(self.counts)).squeeze(1)

    def pad(self, flat: torch.Tensor) -> torch.Tensor:
        """[M, C] real rows -> [B, T, C] with zeros at padding slots."""
        out = flat.new_zeros(self.batch * self.length, flat.shape[-1])
        out.index_copy_(0, self.index, flat)
        return out.view(self.batch, self.length, -1)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] padded -> [M, C] real rows."""
        return x.reshape(self.batch * self.length, -1).index_select(0, self.index)
