"""Top-k pruning: keep the most attended tokens, drop the rest (the plain baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokenreduce.dims import ModelDims
from tokenreduce.methods.base import BlockRecord, class_attention_macs, register
from tokenreduce.methods.evit import KeepRateConfig, attentive_keep
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = ["TopKConfig"]


@register
@dataclass(frozen=True, kw_only=True)
class TopKConfig(KeepRateConfig):
    """Top-k: in each of `layers`, keep ceil(keep_rate * (N - P)) tokens with the largest
    head-mean class attention, in descending order; drop the rest (= EViT without fusing).
    """

    name: ClassVar[str] = "topk"

    def reduce(
        self, x: torch.Tensor, state: TokenState, attn: AttentionOutputs, step: float
    ) -> tuple[torch.Tensor, TokenState, BlockRecord]:
        return attentive_keep(x, state, attn.cls_attn, step, fuse=False)

    def overhead_macs(
        self, n_in: torch.Tensor, dims: ModelDims, step: float, record: BlockRecord, fused: bool
    ) -> torch.Tensor:
        return class_attention_macs(n_in, dims, fused)
