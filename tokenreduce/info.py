"""What one forward pass of a reduced model did."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic

import torch

from tokenreduce.methods.base import MethodConfig, RecordT

__all__ = ["ReductionInfo"]


@dataclass(frozen=True)
class ReductionInfo(Generic[RecordT]):
    """Record of the last forward pass.

    tokens_per_block: LongTensor [B, L], tokens per image (prefix included) after each block.
    tokens_in: int, tokens entering block 0 (N0, prefix included).
    steps: per block, the argument of its reduction step, or None where it does not reduce.
    sizes: per block, the size vector [B, N, 1] after it (None while all sizes are still 1).
    source_blk: with trace_source, per block a bool map [B, T, N0] from current to original
        tokens (column 0 = first prefix token); otherwise None.
    fused_attention: per block, whether its attention ran through the fused kernel.
    records: the method's record (its config's `record_type`, e.g. `PPTRecord` with `policy`
        and `score_variance`, `LTMPRecord` with `merged` and `pruned`), each field stacked over
        the reducing blocks to [B, S]; fields a forward does not record are None.
    kept_fraction: learned methods in training only, [B, L] mean key mask after each block, with
        its straight-through gradient (the budget loss reads it).
    """

    config: MethodConfig[RecordT]
    tokens_per_block: torch.Tensor
    tokens_in: int
    steps: tuple[Any, ...]
    sizes: list[torch.Tensor | None]
    source_blk: list[torch.Tensor] | None
    fused_attention: tuple[bool, ...]
    records: RecordT
    kept_fraction: torch.Tensor | None = None

    @property
    def method(self) -> str:
        return self.config.name

    @property
    def reduce_blocks(self) -> tuple[int, ...]:
        return tuple(i for i, step in enumerate(self.steps) if step is not None)

    @property
    def final_size(self) -> torch.Tensor | None:
        return self.sizes[-1] if self.sizes else None
