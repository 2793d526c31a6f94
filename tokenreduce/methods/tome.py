"""ToMe: bipartite token merging in every block (Bolya et al., ICLR 2023).

Official code: facebookresearch/ToMe, tome/merge.py and tome/patch/timm.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

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
from tokenreduce.methods.steps import carried, merged_tokens
from tokenreduce.ops import bipartite_soft_matching
from tokenreduce.ops.merging import max_merges
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = ["ToMeConfig", "clamped_r", "effective_merges", "parse_r"]


def parse_r(depth: int, r: int | tuple[int, float] | Sequence[int]) -> list[int]:
    """Per-block merge counts, as ToMe's `parse_r`.

    int r: r in every block. (r, inflect): linear from lo = int(r(1 - inflect)) to 2r - lo over the
    blocks (inflect -1: 2r at block 0 down to 0). A list: per-block values padded with zeros.
    """
    if isinstance(r, int):
        return [r] * depth
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        lo = int(r[0] * (1.0 - r[1]))
        hi = 2 * r[0] - lo
        return [int(lo + (hi - lo) * i / max(depth - 1, 1)) for i in range(depth)]
    return list(r) + [0] * (depth - len(r))


def effective_merges(per_step: Sequence[int], num_tokens: int, num_prefix: int) -> list[int]:
    """The merges each reducing step makes, per_step[i] clipped to what the tokens left allow
    (`max_merges`), from num_tokens entering the first step."""
    made = []
    for r in per_step:
        r = min(r, max_merges(num_tokens, num_prefix))
        made.append(r)
        num_tokens -= r
    return made


def clamped_r(
    method: str, r: object, per_step: Sequence[int], dims: ModelDims, asks: str
) -> list[str]:
    """The `clamped` warning for option r when a step asks more than the model's tokens allow
    (`max_merges` of all its tokens), with the merges each step makes instead; [] otherwise.
    asks: what r asks more of, e.g. "merges than one block can make"."""
    bound = max_merges(dims.num_tokens, dims.num_prefix)
    if max(per_step) <= bound:
        return []
    return [
        clamped(
            method, "r", r,
            f"asks more {asks} on this model (at most {bound} of its {dims.num_tokens} tokens)",
            effective_merges(per_step, dims.num_tokens, dims.num_prefix),
        )
    ]  # fmt: skip


def _check_r(r: object) -> None:
    def is_count(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    ok = is_count(r)
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        ok = is_count(r[0]) and -1.0 <= r[1] <= 1.0
    elif isinstance(r, (list, tuple)):
        ok = len(r) > 0 and all(is_count(v) for v in r)
    if not ok:
        raise InvalidOptionError(
            f"tome: option r={r!r} is not accepted; accepted: an int >= 0, a tuple (r, inflect) "
            "with inflect a float in [-1, 1], or a list of per-block ints >= 0"
        )


def check_r_fits(method: str, r: Any, depth: int) -> None:
    """A per-block list of r no longer than the model's blocks (the (r, inflect) form fits any)."""
    inflect_form = isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float)
    if isinstance(r, (list, tuple)) and not inflect_form and len(r) > depth:
        raise InvalidOptionError(
            f"{method}: option r has {len(r)} per-block values but the model has "
            f"{depth} blocks; accepted: at most {depth} values"
        )


@register
@dataclass(frozen=True, kw_only=True)
class ToMeConfig(MethodConfig[BlockRecord]):
    """ToMe: merge r tokens per block by bipartite soft matching of head-mean keys.

    r: int, (r, inflect) or per-block list (see `parse_r`); 13 is the DeiT-S setting of the paper.
    prop_attn: add log(size) to the attention logits (proportional attention), on by default for
    off-the-shelf models.
    """

    name: ClassVar[str] = "tome"
    merges: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"key_mean"})
    sweep: ClassVar[tuple[dict, ...]] = tuple({"r": r} for r in (4, 8, 13, 16))
    strength: ClassVar[Strength] = Strength("r", True, True, lambda d: (0, d.num_patches // 2))

    r: int | tuple[int, float] | tuple[int, ...] = 13
    prop_attn: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_r(self.r)
        check_bool(self.name, "prop_attn", self.prop_attn)

    @property
    def uses_prop_attn(self) -> bool:
        return self.prop_attn

    def validate(self, dims: ModelDims) -> None:
        super().validate(dims)
        check_r_fits(self.name, self.r, dims.depth)

    def clamped_options(self, dims: ModelDims) -> list[str]:
        per_block = parse_r(dims.depth, self.r)
        return clamped_r(self.name, self.r, per_block, dims, "merges than one block can make")

    def schedule(self, dims: ModelDims) -> list[int | None]:
        return [r if r > 0 else None for r in parse_r(dims.depth, self.r)]

    def reduce(
        self, x: torch.Tensor, state: TokenState, attn: AttentionOutputs, step: int
    ) -> tuple[torch.Tensor, TokenState, BlockRecord]:
        matching = bipartite_soft_matching(
            attn.key_mean, step, state.num_prefix, sort_unmerged=state.num_prefix > 0
        )
        if matching is None:
            return x, state, BlockRecord()
        tokens = merged_tokens(matching, carried(x, state, state.size), state.destination_positions)
        return tokens.x, tokens.in_state(state), BlockRecord()

    def overhead_macs(
        self, n_in: torch.Tensor, dims: ModelDims, step: int, record: BlockRecord, fused: bool
    ) -> torch.Tensor:
        return matching_macs(n_in, dims)
