"""AS-ViT: prune tokens whose head-importance-weighted class attention is below a learned
threshold (Liu, Wu, Guo, arXiv 2209.13802).

No official code exists; every choice the paper leaves open is a named option
(docs/methods.md §3.6).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.base import (
    BlockRecord,
    Strength,
    check_bool,
    clamped,
    class_attention_macs,
    register,
)
from tokenreduce.methods.learned import (
    LearnedConfig,
    LearnedRecord,
    Step,
    ThresholdSource,
    ThresholdValues,
    check_threshold_values,
)
from tokenreduce.methods.steps import carried, kept_rows, with_fused_token
from tokenreduce.ops.thresholds import threshold_mask
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = ["HEAD_WEIGHTS", "ASViTConfig", "ASViTRecord", "head_weighted_scores"]


HEAD_WEIGHTS = ("out_norm", "uniform")


def head_weighted_scores(
    cls_attn: torch.Tensor, values: torch.Tensor, active: torch.Tensor, head_weight: str
) -> torch.Tensor:
    """Token scores normalised to mean 1 over the active non-prefix tokens of each image.

    cls_attn: [B, H, N'] class-attention row over the non-prefix tokens; values: [B, H, N', d];
    active: [B, N'] bool. Head h weighs w_h = ||o_h|| / sum ||o||, o_h = sum_j A_h[0, j] v_hj
    (its share of the class token's update; "uniform": 1/H). S_j = sum_h w_h A_h[0, j];
    returns n_active * S_j / sum_active S [B, N'], -inf at inactive tokens.
    """
    attn = cls_attn * active[:, None, :]
    if head_weight == "out_norm":
        out = (attn.unsqueeze(-2).to(values.dtype) @ values).squeeze(-2)
        weight = out.norm(dim=-1).to(attn.dtype)
        weight = weight / weight.sum(dim=-1, keepdim=True)
    else:
        weight = attn.new_full(attn.shape[:2], 1.0 / attn.shape[1])
    score = (weight.unsqueeze(-1) * attn).sum(dim=1)
    count = active.sum(dim=1, keepdim=True)
    score = count * score / score.sum(dim=-1, keepdim=True)
    return score.masked_fill(~active, -torch.inf)


@dataclass(frozen=True)
class ASViTRecord(LearnedRecord):
    """fused: [B] whether the image's fused token exists (some token was pruned); with fuse."""

    fused: torch.Tensor | None = None


@register
@dataclass(frozen=True, kw_only=True)
class ASViTConfig(LearnedConfig[ASViTRecord]):
    """AS-ViT: in each of `layers` (None = (L//4, L//2, 3L//4)) keep the non-prefix tokens whose
    mean-1 head-weighted class-attention score is above that layer's threshold.

    thresholds: one number for every layer, one per layer, a tensor, or a file from
    `tokenreduce train`; 0 keeps every token. min_keep: the best tokens always kept (at least
    one: no image loses its last patch token; 0 is taken as 1, with a warning). fuse: add
    one token, the class-attention-weighted sum of the pruned ones as EViT (inference only).
    head_weight: "out_norm" (each head's share of the class token's update) or "uniform".
    """

    name: ClassVar[str] = "asvit"
    record_type: ClassVar[type[BlockRecord]] = ASViTRecord
    requires_class_token: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn", "values"})
    kinds: ClassVar[tuple[str, ...]] = ("thresholds",)
    train_init: ClassVar[dict[str, float]] = {"thresholds": 0.0}
    train_lr: ClassVar[dict[str, float]] = {"thresholds": 1e-3}
    sweep: ClassVar[tuple[dict, ...]] = tuple(
        {"thresholds": t} for t in (0.25, 0.5, 0.75, 1.0, 1.25)
    )
    strength: ClassVar[Strength] = Strength("thresholds", False, True, lambda d: (0.0, 4.0))

    thresholds: ThresholdValues | ThresholdSource = 0.0
    tau: float = 0.1
    min_keep: int = 1
    fuse: bool = False
    head_weight: str = "out_norm"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.thresholds, (str, Path, torch.Tensor)):
            for key, value in self.load_thresholds(self.thresholds).items():
                object.__setattr__(self, key, value)
        else:
            value = check_threshold_values(self.name, "thresholds", self.thresholds)
            object.__setattr__(self, "thresholds", value)
        self.check_ranges()
        check_bool(self.name, "fuse", self.fuse)
        is_count = isinstance(self.min_keep, int) and not isinstance(self.min_keep, bool)
        if not is_count or self.min_keep < 0:
            raise InvalidOptionError(
                f"asvit: option min_keep={self.min_keep!r} is not accepted; accepted: an int >= 0"
            )
        if self.head_weight not in HEAD_WEIGHTS:
            raise InvalidOptionError(
                f"asvit: option head_weight={self.head_weight!r} is not accepted; accepted: "
                f"{list(HEAD_WEIGHTS)}"
            )

    @property
    def appends_fused_token(self) -> bool:
        return self.fuse

    def fused_token(self, records: ASViTRecord, slot: int) -> torch.Tensor | bool:
        return records.fused[:, slot] if records.fused is not None else False

    def identity_values(self) -> dict[str, float]:
        return {"thresholds": 0.0}

    def clamped_options(self, dims: ModelDims) -> list[str]:
        messages = super().clamped_options(dims)
        if self.min_keep == 0:
            why = "would let an image lose every patch token, and every image keeps one"
            messages.append(clamped(self.name, "min_keep", 0, why, 1))
        elif self.min_keep > dims.num_patches:
            why = f"is more than the {dims.num_patches} patch tokens this model holds"
            messages.append(clamped(self.name, "min_keep", self.min_keep, why, dims.num_patches))
        return messages

    def reduce(
        self, x: torch.Tensor, state: TokenState, attn: AttentionOutputs, step: Step
    ) -> tuple[torch.Tensor, TokenState, ASViTRecord]:
        prefix = state.num_prefix
        soft = state.mask is not None
        if soft:
            active = state.mask[:, prefix:].detach() > 0
        elif state.valid is not None:
            active = state.valid[:, prefix:]
        else:
            active = torch.ones_like(x[:, prefix:, 0], dtype=torch.bool)
        cls_attn = attn.cls_attn[:, :, prefix:]
        score = head_weighted_scores(cls_attn, attn.values[:, :, prefix:], active, self.head_weight)
        keep = threshold_mask(score, step["thresholds"], self.tau, soft)
        # at least the best token stays, so that no image loses its last patch token
        best = score.topk(min(max(self.min_keep, 1), score.shape[1]), dim=-1).indices
        forced = torch.zeros_like(active).scatter(1, best, True) & active
        keep = keep.masked_fill(forced, 1) if soft else keep | forced
        if soft:
            if self.fuse:
                raise InvalidOptionError(
                    "asvit: option fuse=True applies at inference only; train with fuse=False "
                    "and set fuse=True on the trained thresholds"
                )
            mask = torch.cat([state.mask[:, :prefix], state.mask[:, prefix:] * keep], dim=1)
            state = state.with_tokens(
                size=state.size,
                source=state.source,
                valid=state.valid,
                mask=mask,
                position=state.position,
                owner=state.owner,
            )
            return x, state, ASViTRecord()
        return self._prune(x, state, keep & active, score, cls_attn)

    def _prune(
        self,
        x: torch.Tensor,
        state: TokenState,
        keep: torch.Tensor,
        score: torch.Tensor,
        cls_attn: torch.Tensor,
    ) -> tuple[torch.Tensor, TokenState, ASViTRecord]:
        """Remove the tokens not kept: [prefix, kept in original order, fused], padded."""
        prefix = state.num_prefix
        tokens = carried(x, state, state.sizes_like(x))
        keep_all = torch.cat([keep.new_ones(keep.shape[0], prefix), keep], dim=1)
        rank = torch.cat([score.new_full((score.shape[0], prefix), torch.inf), score], dim=1)
        if self.fuse:
            dropped = (~keep & (score > -torch.inf)).to(x.dtype)
            weight = cls_attn.mean(dim=1).to(x.dtype) * dropped
            tokens = with_fused_token(tokens, tokens, prefix, dropped, weight)
            keep_all = torch.cat([keep_all, dropped.sum(dim=1, keepdim=True) > 0], dim=1)
            rank = torch.cat([rank, rank.new_full((rank.shape[0], 1), -torch.inf)], dim=1)
        packing, overflow = self.pack(keep_all, rank, prefix, state.batching)
        record = ASViTRecord(overflow=overflow, fused=keep_all[:, -1] if self.fuse else None)
        tokens = kept_rows(tokens, packing.index, packing.valid)
        return tokens.x, tokens.in_state(state, packing.counts), record

    def overhead_macs(
        self, n_in: torch.Tensor, dims: ModelDims, step: Step, record: ASViTRecord, fused: bool
    ) -> torch.Tensor:
        return (
            class_attention_macs(n_in, dims, fused) + n_in * dims.attn_dim + dims.num_heads * n_in
        )
