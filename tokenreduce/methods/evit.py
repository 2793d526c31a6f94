"""EViT: keep the most attended tokens, fuse the rest into one (Liang et al., ICLR 2022).

Official code: youweiliang/evit, evit.py (Attention/Block) and helpers.py (complement_idx).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokenreduce.dims import ModelDims
from tokenreduce.methods.base import (
    BlockRecord,
    MethodConfig,
    Strength,
    check_bool,
    check_keep_rate,
    check_layers_type,
    class_attention_macs,
    register,
    resolve_layers,
)
from tokenreduce.methods.steps import carried, kept_tokens, with_fused_token
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = ["EViTConfig", "KeepRateConfig", "attentive_keep", "keep_count"]


def keep_count(keep_rate: float, num_tokens: int, num_prefix: int) -> int:
    """K = ceil(rho * (N - P)), computed as the official code does (Python float)."""
    return math.ceil(keep_rate * (num_tokens - num_prefix))


def attentive_keep(
    x: torch.Tensor, state: TokenState, cls_attn: torch.Tensor, keep_rate: float, fuse: bool
) -> tuple[torch.Tensor, TokenState, BlockRecord]:
    """Keep the top-K non-prefix tokens by head-mean class attention; optionally fuse the rest.

    Output order: [prefix, kept in descending attention, fused token]. Sizes, sources and
    positions of kept tokens are gathered; the fused token's are the sums (logical OR, size-weighted
    mean) of the dropped ones.
    """
    num_prefix = state.num_prefix
    keep = keep_count(keep_rate, x.shape[1], num_prefix)
    if keep >= x.shape[1] - num_prefix:
        return x, state, BlockRecord()
    score = cls_attn.mean(dim=1)[:, num_prefix:]
    tokens = carried(x, state, state.sizes_like(x))
    kept, idx = kept_tokens(tokens, num_prefix, score, keep)
    if fuse:
        dropped = torch.ones_like(score, dtype=x.dtype).scatter(1, idx, 0.0)
        weight = score.to(x.dtype).scatter(1, idx, 0.0)
        kept = with_fused_token(kept, tokens, num_prefix, dropped, weight)
    return kept.x, kept.in_state(state), BlockRecord()


@dataclass(frozen=True, kw_only=True)
class KeepRateConfig(MethodConfig[BlockRecord]):
    """Shared options of the methods that keep the top ceil(keep_rate * (N - P)) tokens by
    head-mean class attention in each of `layers` (None = (L//4, L//2, 3L//4)): EViT, top-k,
    BAT."""

    requires_class_token: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn"})
    sweep: ClassVar[tuple[dict, ...]] = tuple({"keep_rate": k} for k in (0.9, 0.8, 0.7, 0.6, 0.5))
    strength: ClassVar[Strength] = Strength("keep_rate", False, False, lambda d: (0.01, 1.0))

    keep_rate: float = 0.7
    layers: tuple[int, ...] | None = None
    prop_attn: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_keep_rate(self.name, self.keep_rate)
        check_layers_type(self.name, self.layers)
        check_bool(self.name, "prop_attn", self.prop_attn)

    @property
    def uses_prop_attn(self) -> bool:
        return self.prop_attn

    def validate(self, dims: ModelDims) -> None:
        super().validate(dims)
        resolve_layers(self.name, self.layers, dims.depth)

    def schedule(self, dims: ModelDims) -> list[float | None]:
        layers = resolve_layers(self.name, self.layers, dims.depth)
        return [self.keep_rate if i in layers else None for i in range(dims.depth)]


@register
@dataclass(frozen=True, kw_only=True)
class EViTConfig(KeepRateConfig):
    """EViT: in each of `layers`, keep ceil(keep_rate * (N - P)) tokens by class attention.

    fuse: append one token, the class-attention-weighted sum of the dropped tokens (weights not
    renormalised), as all released EViT models do. prop_attn: EViT has none (off); available to
    weight attention by the fused token's size. layers None = (L//4, L//2, 3L//4).
    """

    name: ClassVar[str] = "evit"

    fuse: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool(self.name, "fuse", self.fuse)

    @property
    def appends_fused_token(self) -> bool:
        return self.fuse and self.keep_rate < 1

    def reduce(
        self, x: torch.Tensor, state: TokenState, attn: AttentionOutputs, step: float
    ) -> tuple[torch.Tensor, TokenState, BlockRecord]:
        return attentive_keep(x, state, attn.cls_attn, step, self.fuse)

    def overhead_macs(
        self, n_in: torch.Tensor, dims: ModelDims, step: float, record: BlockRecord, fused: bool
    ) -> torch.Tensor:
        macs = class_attention_macs(n_in, dims, fused)
        if self.fuse:
            non_prefix = n_in - dims.num_prefix
            keep = torch.ceil(step * non_prefix)
            macs = macs + torch.where(keep < non_prefix, (non_prefix - keep) * dims.embed_dim, 0)
        return macs
