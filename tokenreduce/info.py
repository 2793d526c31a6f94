"""What one forward pass of a reduced model did."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenreduce.methods.base import MethodConfig


@dataclass(frozen=True)
class ReductionInfo:
    """Record of the last forward pass.

    tokens_per_block: LongTensor [B, L], tokens per image (prefix included) after each block.
    tokens_in: int, tokens entering block 0 (N0, prefix included).
    steps: per block, the argument of its reduction step, or None where it does not reduce.
    sizes: per block, the size vector [B, N, 1] after it (None while all sizes are still 1).
    source_blk: with trace_source, per block a bool map [B, T, N0] from current to original
        tokens (column 0 = first prefix token); otherwise None.
    fused_attention: per block, whether its attention ran through the fused kernel.
    records: method-specific per-reducing-block values stacked to [B, S] (PPT: policy,
        score_variance; LTMP: merged, pruned); also readable as attributes, e.g. `info.policy`.
    kept_fraction: learned methods in training only, [B, L] mean key mask after each block, with
        its straight-through gradient (the budget loss reads it).
    """

    config: MethodConfig
    tokens_per_block: torch.Tensor
    tokens_in: int
    steps: tuple
    sizes: list[torch.Tensor | None]
    source_blk: list[torch.Tensor] | None
    fused_attention: tuple[bool, ...]
    records: dict[str, torch.Tensor] = field(default_factory=dict)
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

    def __getattr__(self, name: str) -> torch.Tensor:
        records = self.__dict__.get("records", {})
        if name in records:
            return records[name]
        raise AttributeError(
            f"ReductionInfo has no field {name!r}; method-specific fields: {sorted(records)}"
        )
