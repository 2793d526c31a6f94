"""ToFu: Token Fusion, pruning in the early blocks and MLERP merging in the later ones (Kim, Gao,
Hsu, Shen, Jin, WACV 2024, arXiv 2312.01026).

No official code was published. This is a reconstruction from the paper (ToMe's bipartite soft
matching in every block; pruning where the network responds non-linearly to interpolated
inputs, the early blocks; MLERP merging, which keeps the norm, in the later blocks) and from the
public re-implementation in Westlake-AI/OpenToMe (`opentome/timm/tofu.py`), whose block switch
this follows. Every choice is listed in docs/methods.md §3.11.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.base import (
    BlockRecord,
    MethodConfig,
    Strength,
    check_bool,
    clamped,
    matching_macs,
    register,
)
from tokenreduce.methods.steps import Tokens, carried, kept_rows, merged_tokens
from tokenreduce.methods.tome import _check_r, check_r_fits, clamped_r, parse_r
from tokenreduce.ops import Matching, bipartite_soft_matching, merge_tokens
from tokenreduce.ops.merging import order_index
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = ["ToFuConfig", "ToFuStep", "default_switch_block", "mlerp_tokens", "pruned_tokens"]


class ToFuStep(NamedTuple):
    """One reducing block's step: r tokens removed, by MLERP merging (`mlerp`) or by pruning."""

    r: int
    mlerp: bool


def default_switch_block(depth: int) -> int:
    """First MLERP block when `switch_block` is None: depth // 2 + 1 (7 of 12 blocks), the rule of
    the OpenToMe re-implementation (blocks i <= depth // 2 prune)."""
    return depth // 2 + 1


def pruned_tokens(matching: Matching, tokens: Tokens) -> Tokens:
    """ToMe's matching applied as pruning: the merged A tokens are dropped, every B token stays
    as it is (its size, source and position too), output order that of `merge_tokens`
    ([kept A, B], prefix first).

    tokens: no padding. The dropped tokens' patches are owned by nothing afterwards."""
    batch, num_tokens = tokens.x.shape[:2]
    device = tokens.x.device
    odd = torch.arange(1, num_tokens, 2, device=device).expand(batch, -1)
    rows = torch.cat([2 * matching.unm_idx, odd], dim=1)
    if matching.order is not None:
        rows = rows[:, order_index(matching.order, device)]
    return kept_rows(tokens, rows)


def mlerp_tokens(matching: Matching, tokens: Tokens, destination_positions: bool) -> Tokens:
    """MLERP merge: each output token is the size-weighted average of the tokens merged into it,
    rescaled to the largest norm among them (sizes summed, sources OR-ed, positions as ToMe).

    For members x_1..x_k (the B token and the A tokens matched to it), sizes s_i:
        x' = x̄ · max_i ||x_i|| / ||x̄||,   x̄ = Σ s_i x_i / Σ s_i.
    A token that received no merge keeps its own norm (up to rounding). tokens: no padding."""
    merged = merged_tokens(matching, tokens, destination_positions)
    norm = torch.linalg.vector_norm(tokens.x, dim=-1, keepdim=True)
    largest = merge_tokens(norm, matching, "amax")
    average_norm = torch.linalg.vector_norm(merged.x, dim=-1, keepdim=True)
    # the average of tokens that cancel has norm 0 and no direction: it stays 0
    x = merged.x * (largest / average_norm.clamp_min(torch.finfo(merged.x.dtype).tiny))
    return merged._replace(x=x)


@register
@dataclass(frozen=True, kw_only=True)
class ToFuConfig(MethodConfig[BlockRecord]):
    """ToFu: remove r tokens per block by ToMe's bipartite soft matching of head-mean keys;
    blocks before `switch_block` prune (keep the destination, drop the matched token), the
    others merge with MLERP (size-weighted average rescaled to the largest member norm).

    r: int, (r, inflect) or per-block list, as ToMe's (`parse_r`); 13, ToMe's DeiT-S setting.
    switch_block: first block that merges (0-based); None: depth // 2 + 1. At most the depth
        (then every block prunes); a larger value is clamped with a warning.
    prop_attn: proportional attention (log size added to the logits), as ToMe.
    """

    name: ClassVar[str] = "tofu"
    merges: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"key_mean"})
    sweep: ClassVar[tuple[dict, ...]] = tuple({"r": r} for r in (4, 8, 13, 16))
    strength: ClassVar[Strength] = Strength("r", True, True, lambda d: (0, d.num_patches // 2))

    r: int | tuple[int, float] | tuple[int, ...] = 13
    switch_block: int | None = None
    prop_attn: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            _check_r(self.r)
        except InvalidOptionError as error:
            raise InvalidOptionError(str(error).replace("tome:", "tofu:", 1)) from None
        check_bool(self.name, "prop_attn", self.prop_attn)
        bad_switch = self.switch_block is not None and (
            isinstance(self.switch_block, bool)
            or not isinstance(self.switch_block, int)
            or self.switch_block < 0
        )
        if bad_switch:
            raise InvalidOptionError(
                f"tofu: option switch_block={self.switch_block!r} is not accepted; accepted: "
                "None (depth // 2 + 1) or a block index >= 0"
            )

    @property
    def uses_prop_attn(self) -> bool:
        return self.prop_attn

    def _switch(self, dims: ModelDims) -> int:
        if self.switch_block is None:
            return min(default_switch_block(dims.depth), dims.depth)
        return min(self.switch_block, dims.depth)

    def validate(self, dims: ModelDims) -> None:
        super().validate(dims)
        check_r_fits(self.name, self.r, dims.depth)

    def clamped_options(self, dims: ModelDims) -> list[str]:
        per_block = parse_r(dims.depth, self.r)
        lines = clamped_r(self.name, self.r, per_block, dims, "merges than one block can make")
        if self.switch_block is not None and self.switch_block > dims.depth:
            lines.append(
                clamped(
                    self.name, "switch_block", self.switch_block,
                    f"is past the model's last block ({dims.depth} blocks: every block prunes)",
                    dims.depth,
                )
            )  # fmt: skip
        return lines

    def schedule(self, dims: ModelDims) -> list[ToFuStep | None]:
        switch = self._switch(dims)
        return [
            ToFuStep(r, block >= switch) if r > 0 else None
            for block, r in enumerate(parse_r(dims.depth, self.r))
        ]

    def reduce(
        self, x: torch.Tensor, state: TokenState, attn: AttentionOutputs, step: ToFuStep
    ) -> tuple[torch.Tensor, TokenState, BlockRecord]:
        matching = bipartite_soft_matching(
            attn.key_mean, step.r, state.num_prefix, sort_unmerged=state.num_prefix > 0
        )
        if matching is None:
            return x, state, BlockRecord()
        if step.mlerp:
            tokens = mlerp_tokens(
                matching, carried(x, state, state.size), state.destination_positions
            )
        else:
            # pruning keeps each kept token's size: sizes stay implicit (None) while all are 1
            tokens = pruned_tokens(matching, carried(x, state, state.size))
        return tokens.x, tokens.in_state(state), BlockRecord()

    def overhead_macs(
        self, n_in: torch.Tensor, dims: ModelDims, step: ToFuStep, record: BlockRecord, fused: bool
    ) -> torch.Tensor:
        half_up = torch.div(n_in + 1, 2, rounding_mode="floor")
        half_down = torch.div(n_in, 2, rounding_mode="floor")
        similarity = half_up * half_down * dims.head_dim
        if not step.mlerp:
            return similarity
        # ToMe's weighted average (x·s, /s), the members' norms (N·C), the averages' norms and
        # the rescaling (2·(N - r)·C, r clipped as the matching clips it: `max_merges`)
        prefix = dims.num_prefix
        bound = torch.minimum(
            torch.div(n_in - prefix, 2, rounding_mode="floor"), half_up - (prefix + 1) // 2
        )
        r = torch.minimum(bound, torch.full_like(n_in, step.r)).clamp_min(0)
        return matching_macs(n_in, dims) + n_in * dims.embed_dim + 2 * (n_in - r) * dims.embed_dim
