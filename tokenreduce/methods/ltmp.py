"""LTMP: learned thresholds for merging, then pruning, in every block (Bonnaerens & Dambre,
TMLR 2023). Official code: Mxbonn/ltmp, `ltmp/timm/lt_mergeprune*.py`, `tools/train.py`.

Per image, an A token merges into its most similar B token when their cosine similarity is above
the block's merge threshold, and a token is pruned when the attention it receives (mean over
heads and queries) is not above the prune threshold; counts differ per image (docs/methods.md §3.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.base import BlockRecord, Strength, matching_macs, register
from tokenreduce.methods.learned import (
    LearnedConfig,
    LearnedRecord,
    Step,
    ThresholdSource,
    ThresholdValues,
    check_threshold_values,
)
from tokenreduce.ops.merging import (
    bipartite_scores,
    mean_position,
    order_index,
    prefix_first_order,
    rows_in_order,
    split_rows,
    split_size_column,
    with_size_column,
)
from tokenreduce.ops.owners import follow, gather_destinations
from tokenreduce.ops.packing import merge_into_slots
from tokenreduce.ops.selection import keep_best_
from tokenreduce.ops.thresholds import threshold_mask
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = [
    "LTMPConfig",
    "LTMPRecord",
    "best_partners",
    "merge_and_prune_one_image",
    "merge_into_partners",
]


def best_partners(
    key_mean: torch.Tensor, num_prefix: int, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each A token's (even positions) best cosine similarity to a B token (odd positions) and
    that partner. key_mean: [B, N, d] (zero rows score 0). Prefix and padding rows get -inf
    and are never partners. Returns (similarity [B, N_A], partner [B, N_A])."""
    scores = bipartite_scores(key_mean, num_prefix)
    if valid is not None:
        scores.masked_fill_(~valid[:, ::2, None] | ~valid[:, None, 1::2], -math.inf)
    return scores.max(dim=-1)


def merge_into_partners(
    y: torch.Tensor, weight: torch.Tensor, partner: torch.Tensor, mode: str
) -> torch.Tensor:
    """cat([A rows, B rows with the weighted A rows reduced in]) for y [B, N, C]; weight [B, N_A]
    is 0/1 (sum) or selects rows (amax: unselected rows do not take part)."""
    y_a, y_b = y[:, ::2], y[:, 1::2]
    index = partner.unsqueeze(-1).expand(-1, -1, y.shape[-1])
    if mode == "sum":
        y_b = y_b.scatter_add(1, index, y_a * weight.unsqueeze(-1))
    else:
        moving = y_a.masked_fill(weight.unsqueeze(-1) <= 0, -math.inf)
        y_b = y_b.scatter_reduce(1, index, moving, reduce="amax")
    return torch.cat([y_a, y_b], dim=1)


def merge_and_prune_one_image(
    x: torch.Tensor,
    size: torch.Tensor | None,
    importance: torch.Tensor,
    key_mean: torch.Tensor,
    merge_threshold: float | torch.Tensor,
    prune_threshold: float | torch.Tensor,
    num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """LTMP's inference merge, then prune, of one image in as few operations as it takes: at
    batch 1 on a CPU each costs more than its arithmetic.

    Each A token (even positions) whose best cosine similarity to a B token (odd positions) is
    above `merge_threshold` is added into that token, which takes the larger importance of the
    two; then a token stays when its importance is above `prune_threshold`, the prefix always,
    and the best patch token when no other would (docs/methods.md §1.6). The merged A rows are
    added into their partners' rows in place, then the kept rows are gathered once: the same
    values bit for bit as `LTMPConfig.reduce`'s batched slot maps (each B row: its own row, then
    the A rows merged into it in row order).

    x: [1, N, C]; size: [1, N, 1] (None: every size 1); importance: [1, N] the attention each
    token receives; key_mean: [1, N, d]. Returns x [1, M, C] and size [1, M, 1] in the order
    [prefix, other A tokens, other B tokens], the number of tokens merged and pruned.
    """
    num_tokens = x.shape[1]
    similarity, partner = best_partners(key_mean, num_prefix, None)
    merge, partner, importance = similarity[0] > merge_threshold, partner[0], importance[0]
    importance_a = importance[::2]
    importance_b = importance[1::2].scatter_reduce(
        0, partner, torch.where(merge, importance_a, -math.inf), reduce="amax"
    )
    importance = torch.cat([importance_a.masked_fill(merge, -math.inf), importance_b])
    num_a = merge.shape[0]
    importance.narrow(0, 0, math.ceil(num_prefix / 2)).fill_(math.inf)
    order = prefix_first_order(num_tokens, num_a, num_prefix)
    if num_prefix > 1:  # prefix tokens at odd positions are in B
        importance.narrow(0, num_a, num_prefix // 2).fill_(math.inf)
        importance = importance[order_index(order, x.device)]
    keep = importance > prune_threshold  # merged away (-inf) never stays
    weighted = with_size_column(x, size)[0]  # a new tensor: merged into in place
    moving = merge.nonzero().squeeze(1)
    weighted[1::2].index_add_(
        0, partner.index_select(0, moving), weighted[::2].index_select(0, moving)
    )
    kept = keep.nonzero().squeeze(1)
    if kept.shape[0] == num_prefix:  # no patch token kept: the best one stays
        keep = keep_best_(keep.unsqueeze(0), importance.unsqueeze(0), num_prefix)[0]
        kept = keep.nonzero().squeeze(1)
    rows = rows_in_order(num_tokens, order, x.device).index_select(0, kept)
    x, size = split_size_column(weighted.index_select(0, rows).unsqueeze(0))
    merged = moving.shape[0]
    return x, size, merged, num_tokens - kept.shape[0] - merged


@dataclass(frozen=True)
class LTMPRecord(LearnedRecord):
    """merged: [B] tokens merged away; pruned: [B] tokens pruned (inference only)."""

    merged: torch.Tensor | None = None
    pruned: torch.Tensor | None = None


@register
@dataclass(frozen=True, kw_only=True)
class LTMPConfig(LearnedConfig[LTMPRecord]):
    """LTMP: in each of `layers` (None = every block) merge, then prune, by learned thresholds.

    merge_thresholds / prune_thresholds: one number for every layer or one per layer (None:
    1 and 0, which keep every token). thresholds: a file from `tokenreduce train` or a [2, S]
    tensor (rows merge, prune) setting both. tau: soft-mask temperature in training (0.5, the
    official training script). Proportional attention is always on, as in the official code.
    """

    name: ClassVar[str] = "ltmp"
    merges: ClassVar[bool] = True
    record_type: ClassVar[type[BlockRecord]] = LTMPRecord
    needs: ClassVar[frozenset[str]] = frozenset({"received", "key_mean"})
    kinds: ClassVar[tuple[str, ...]] = ("merge_thresholds", "prune_thresholds")
    train_init: ClassVar[dict[str, float]] = {"merge_thresholds": 0.9, "prune_thresholds": 0.0}
    train_lr: ClassVar[dict[str, float]] = {"merge_thresholds": 5e-3, "prune_thresholds": 5e-6}
    clamp: ClassVar[tuple[float, float | None]] = (0.0, 1.0)
    sweep: ClassVar[tuple[dict, ...]] = tuple(
        {"merge_thresholds": t} for t in (0.95, 0.9, 0.85, 0.8, 0.75)
    )
    strength: ClassVar[Strength] = Strength("merge_thresholds", False, False, lambda d: (0.0, 1.0))

    thresholds: ThresholdSource | None = None
    merge_thresholds: ThresholdValues | None = None
    prune_thresholds: ThresholdValues | None = None
    tau: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.thresholds is not None:
            if self.merge_thresholds is not None or self.prune_thresholds is not None:
                raise InvalidOptionError(
                    "ltmp: option thresholds sets both merge_thresholds and prune_thresholds; "
                    "accepted: thresholds alone, or the two vectors without thresholds"
                )
            if not isinstance(self.thresholds, (str, Path, torch.Tensor)):
                raise InvalidOptionError(
                    f"ltmp: option thresholds={self.thresholds!r} is not accepted; accepted: a "
                    "path to a file written by tokenreduce train, or a [2, S] tensor (numbers go "
                    "to merge_thresholds and prune_thresholds)"
                )
            for key, value in self.load_thresholds(self.thresholds).items():
                object.__setattr__(self, key, value)
            object.__setattr__(self, "thresholds", None)
        for kind in self.kinds:
            if getattr(self, kind) is not None:
                object.__setattr__(
                    self, kind, check_threshold_values(self.name, kind, getattr(self, kind))
                )
        self.check_ranges()

    @property
    def uses_prop_attn(self) -> bool:
        return True

    def default_layers(self, dims: ModelDims) -> tuple[int, ...]:
        return tuple(range(dims.depth))

    def identity_values(self) -> dict[str, float]:
        return {"merge_thresholds": 1.0, "prune_thresholds": 0.0}

    def reduce(
        self, x: torch.Tensor, state: TokenState, attn: AttentionOutputs, step: Step
    ) -> tuple[torch.Tensor, TokenState, LTMPRecord]:
        prefix = state.num_prefix
        soft = state.mask is not None
        if x.shape[1] == 1:  # one patch token and no prefix: it stays, with no B token to merge
            zero = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            overflow = None if self.max_tokens is None else zero
            return x, state, LTMPRecord(overflow=overflow, merged=zero, pruned=zero)
        if self.one_image_on_cpu(x, state):
            x, size, merged, pruned = merge_and_prune_one_image(
                x,
                state.size,
                attn.received,
                attn.key_mean,
                step["merge_thresholds"],
                step["prune_thresholds"],
                prefix,
            )
            counts = torch.tensor([[merged], [pruned]])
            state = state.with_tokens(
                size=size, source=None, valid=None, mask=None, position=None, owner=None
            )
            return x, state, LTMPRecord(merged=counts[0], pruned=counts[1])
        valid = None if soft else state.valid
        # each op costs tens of microseconds at batch 1, so the decisions stay on small [B, N]
        # maps and every C-wide row moves once
        importance = attn.received
        key_mean = attn.key_mean
        if soft:  # masked tokens get zero keys: similarity 0 to every token
            key_mean = key_mean * state.mask.detach().unsqueeze(-1)
        elif valid is not None:
            importance = importance.masked_fill(~valid, -math.inf)
        similarity, partner = best_partners(key_mean, prefix, valid)
        merge = threshold_mask(similarity, step["merge_thresholds"], self.tau, soft)
        moving = merge.detach().to(x.dtype) if soft else merge
        merging = merge.detach() > 0 if soft else merge

        # Importance merges into B (max over members) and is reordered to [prefix, A, B]; a
        # token is kept when important enough, the prefix always (importance inf). Rows and
        # sizes merge below: in training by a sum into B, at inference straight into their
        # packed slots.
        num_a = merge.shape[1]
        order = prefix_first_order(x.shape[1], num_a, prefix)

        def reorder(y: torch.Tensor) -> torch.Tensor:
            return y if order is None else y[:, order_index(order, y.device)]

        importance_a = importance[:, ::2]
        importance_b = importance[:, 1::2].scatter_reduce(
            1, partner, torch.where(merging, importance_a, -math.inf), reduce="amax"
        )
        if not soft:  # merged away: importance -inf like padding, so never kept
            importance_a = importance_a.masked_fill(merge, -math.inf)
        importance = torch.cat([importance_a, importance_b], dim=1)
        importance.narrow(1, 0, math.ceil(prefix / 2)).fill_(math.inf)
        if prefix > 1:  # prefix tokens at odd positions are in B
            importance.narrow(1, num_a, prefix // 2).fill_(math.inf)
        importance = reorder(importance)
        prune = threshold_mask(importance, step["prune_thresholds"], self.tau, soft)
        source, position = state.source, state.position
        destination_positions = position is not None and state.destination_positions

        if soft:
            if source is not None:
                source = reorder(merge_into_partners(source, moving, partner, "amax"))
            size = state.sizes_like(x)
            weighted = merge_into_partners(
                torch.cat([x * size, size], dim=-1), moving, partner, "sum"
            )
            weighted = reorder(weighted)
            if destination_positions:  # B tokens keep theirs, merged A tokens drop out
                position = reorder(torch.cat([position[:, ::2], position[:, 1::2]], dim=1))
            elif position is not None:
                moment = merge_into_partners(position * size, moving, partner, "sum")
                position = mean_position(reorder(moment), weighted[..., -1:])
            mask_a = state.mask[:, ::2]
            mask_a = torch.where(mask_a != 0, 1.0 - merge, mask_a)  # merged away: 0
            mask = reorder(torch.cat([mask_a, state.mask[:, 1::2]], dim=1))
            # the best active patch token stays (no image pools over nothing); added detached,
            # so every mask keeps its value and gradient where a patch token stays anyway
            best = importance.masked_fill(mask.detach() == 0, -math.inf)[:, prefix:].argmax(dim=1)
            forced = torch.zeros_like(prune).scatter(1, best.unsqueeze(1) + prefix, 1.0)
            prune = prune + (forced * (1.0 - prune)).detach()
            mask = torch.where(mask != 0, prune, mask)
            x = weighted[..., :-1] / weighted[..., -1:]
            # every token stays, so no padding; and a training forward builds no patch grids
            state = state.with_tokens(
                size=weighted[..., -1:],
                source=source,
                valid=None,
                mask=mask,
                position=position,
                owner=None,
            )
            return x, state, LTMPRecord()

        keep = prune  # importance -inf (merged away, padding) is never above a finite threshold
        keep_best_(keep, importance, prefix)  # the best patch token stays (docs/methods.md §1.6)
        batch, num_tokens = x.shape[:2]
        packing, overflow = self.pack(keep, importance, prefix, state.batching)
        # each input token's flat output slot (`nowhere`: gone): its own, and for a merged A
        # token its partner's, which its rows are added into
        length = packing.index.shape[1]
        nowhere = batch * length
        slots = gather_destinations(packing.index, num_tokens, packing.valid, True, nowhere)
        own = slots.gather(1, split_rows(num_tokens, order, x.device).expand(batch, -1))
        moved = torch.where(merging, own[:, 1::2].gather(1, partner), nowhere)
        size = state.size
        if destination_positions:
            (position,) = merge_into_slots((position,), own, None, length)
        elif position is not None:
            moment = position if size is None else position * size
            (moment,) = merge_into_slots((moment,), own, moved, length)
        # the size rides as a last column, so that one merge moves rows and sizes; padding
        # slots hold nothing (size 0), and without padding every slot holds a token
        (weighted,) = merge_into_slots(
            (with_size_column(x, size),), own, moved, length, packing.valid is None
        )
        x, merged_size = split_size_column(weighted, empty_rows=packing.valid is not None)
        if source is not None:  # rows of disjoint 0/1 sources: their sum is their OR
            (source,) = merge_into_slots((source,), own, moved, length, packing.valid is None)
        if position is not None and not destination_positions:
            position = mean_position(moment, merged_size)
        owner = state.owner
        if owner is not None:  # the owner map counts rows per image
            slot = own.clone()
            slot[:, ::2] = torch.where(merging, moved, own[:, ::2])
            owner = follow(owner, torch.where(slot < nowhere, slot % length, -1))
        merged = merge.sum(dim=1)
        if valid is None and packing.valid is None:  # every image keeps `length` of its tokens
            pruned = (num_tokens - length) - merged
        else:  # real, not merged away (importance above -inf), and not kept
            pruned = ((importance > -math.inf) > keep).sum(dim=1)
        record = LTMPRecord(overflow=overflow, merged=merged, pruned=pruned)
        state = state.with_tokens(
            size=merged_size,
            source=source,
            valid=packing.valid,
            mask=None,
            position=position,
            owner=owner,
            counts=packing.counts,
        )
        return x, state, record

    def one_image_on_cpu(self, x: torch.Tensor, state: TokenState) -> bool:
        """Whether `reduce` takes `merge_and_prune_one_image`: inference on one image on the CPU,
        not masked (static shapes) and nothing traced (sources, positions, owners)."""
        return (
            x.shape[0] == 1
            and x.device.type == "cpu"
            and state.mask is None
            and not state.batching.static
            and state.valid is None
            and state.source is None
            and state.position is None
            and state.owner is None
        )

    def overhead_macs(
        self, n_in: torch.Tensor, dims: ModelDims, step: Step, record: LTMPRecord, fused: bool
    ) -> torch.Tensor:
        return dims.num_heads * n_in * n_in + matching_macs(n_in, dims)
