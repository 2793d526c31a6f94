"""PiToMe: spectrum-preserving token merging protected by an energy score (Tran et al., NeurIPS
2024). Official code: hchautran/PiToMe, algo/pitome/merge.py (`pitome_vision`, `pitome_bsm`,
`pitome`) and algo/pitome/patch/timm.py, deit.py (the timm patch). docs/methods.md §3.8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.base import BlockRecord, MethodConfig, Strength, check_bool, register
from tokenreduce.methods.steps import Tokens, carried, kept_rows, merged_tokens
from tokenreduce.ops.merging import (
    Matching,
    gather_and_add,
    split_size_column,
    with_size_column,
)
from tokenreduce.ops.packing import cached_index
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = [
    "PiToMeConfig",
    "PiToMeStep",
    "energy_order",
    "merge_count",
    "pitome_matching",
    "pitome_rows",
]


class PiToMeStep(NamedTuple):
    """One reducing block: keep `ratio` of the non-prefix tokens, energy margin `margin`, and
    whether it matches bipartitely over all tokens (`bsm`, the first ceil(L/2) blocks) or merges
    only the 2r highest-energy ones (the later blocks)."""

    ratio: float
    margin: float
    bsm: bool


def merge_count(num_tokens: int, ratio: float) -> int:
    """r = floor(T - T * ratio) for T non-prefix tokens, the official expression (Python float)."""
    return math.floor(num_tokens - num_tokens * ratio)


def energy_order(
    metric: torch.Tensor, margin: float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens by descending energy, and their cosine similarities.

    metric: [B, T, d] head-mean keys of the non-prefix tokens. Energy of token i:
    mean_j ELU_alpha(cos(i, j) - margin) over all T tokens (itself included). Returns
    (order [B, T], sim [B, T, T])."""
    metric = F.normalize(metric, p=2, dim=-1)
    sim = metric @ metric.transpose(-1, -2)
    energy = F.elu(sim - margin, alpha=alpha).mean(dim=-1)
    return energy.argsort(dim=-1, descending=True, stable=True), sim


def _pair_scores(sim: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """sim [B, T, T] at rows [B, R] x columns [B, S]: [B, R, S] (the official two gathers)."""
    batch, tokens, _ = sim.shape
    scores = sim.gather(-1, columns.unsqueeze(-2).expand(batch, tokens, columns.shape[-1]))
    return scores.gather(-2, rows.unsqueeze(-1).expand(batch, rows.shape[-1], columns.shape[-1]))


@cached_index
def _prefix_rows_of_a(num_tokens: int, num_prefix: int, device: torch.device) -> torch.Tensor:
    """[P_A]: indices in set A of the prefix tokens placed after the T energy-ordered tokens."""
    slots = [(num_tokens + j) // 2 for j in range(num_prefix) if (num_tokens + j) % 2 == 0]
    return torch.tensor(slots, dtype=torch.long, device=device)


def output_order(num_tokens: int, r: int, num_prefix: int, bsm: bool) -> tuple[int, ...]:
    """The permutation of `merge_tokens`' output [A kept, B] of the sequence
    [T energy-ordered tokens, P prefix] that gives PiToMe's order: prefix (original order),
    then the kept tokens, then the merge destinations.

    bsm: A kept = [unmerged A tokens (best-match order), prefix in A]; the official order is
    [prefix, unmerged A, B]. Otherwise A kept = [protected tokens in A, prefix in A] and B =
    [destinations, protected tokens in B, prefix in B]; the official order is [prefix, protected
    (energy order), destinations]."""
    a_tokens, b_tokens = (num_tokens + 1) // 2, num_tokens // 2
    prefix_in_a = sum((num_tokens + j) % 2 == 0 for j in range(num_prefix))
    b_start = a_tokens - r + prefix_in_a
    prefix, seen_a, seen_b = [], 0, 0
    for j in range(num_prefix):
        if (num_tokens + j) % 2 == 0:
            prefix.append(a_tokens - r + seen_a)
            seen_a += 1
        else:
            prefix.append(b_start + b_tokens + seen_b)
            seen_b += 1
    if bsm:  # every B token follows, merged into or not
        return tuple(prefix + list(range(a_tokens - r)) + list(range(b_start, b_start + b_tokens)))
    # protected token j sits at position 2r + j: in A when j is even
    kept = [j // 2 if j % 2 == 0 else b_start + r + j // 2 for j in range(num_tokens - 2 * r)]
    return tuple(prefix + kept + list(range(b_start, b_start + r)))


def _ranked_partners(
    sim: torch.Tensor, order: torch.Tensor, r: int, bsm: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The merge decision that `pitome_matching` and `pitome_rows` express: each candidate A
    token's best B partner (index into B) and, with bsm, the A tokens by descending best score
    (stable). bsm: every A token is a candidate [B, ceil(T/2)]; otherwise the r A tokens among
    the 2r highest-energy tokens [B, r], which all merge (rank None)."""
    if bsm:
        best, partner = _pair_scores(sim, order[:, ::2], order[:, 1::2]).max(dim=-1)
        return partner, best.argsort(dim=-1, descending=True, stable=True)
    scores = _pair_scores(sim, order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2])
    return scores.max(dim=-1).indices, None


def pitome_matching(
    sim: torch.Tensor, order: torch.Tensor, r: int, num_prefix: int, bsm: bool
) -> Matching:
    """PiToMe's merges as a `Matching` over the sequence [energy-ordered tokens, prefix].

    sim: [B, T, T] similarities of the non-prefix tokens; order: [B, T] those tokens by
    descending energy. Tokens at even positions of the order form set A, odd positions set B.
    bsm (official `pitome_bsm`): each A token's best B match; the r best-matched A tokens merge.
    Otherwise (official `pitome`): only the 2r highest-energy tokens merge, each of their r A
    tokens into its best B among them; the other T - 2r tokens are protected."""
    batch, tokens = order.shape
    device = order.device
    partner, rank = _ranked_partners(sim, order, r, bsm)
    if rank is not None:
        src_idx, unmerged = rank[:, :r], rank[:, r:]
        dst_idx = partner.gather(-1, src_idx)
    else:
        dst_idx = partner
        src_idx = _range_rows(0, r, batch, device)
        unmerged = _range_rows(r, (tokens + 1) // 2, batch, device)
    prefix = _prefix_rows_of_a(tokens, num_prefix, device).expand(batch, -1)
    permutation = output_order(tokens, r, num_prefix, bsm)
    if permutation == tuple(range(len(permutation))):
        permutation = None
    return Matching(torch.cat([unmerged, prefix], dim=1), src_idx, dst_idx, permutation)


def pitome_rows(
    sim: torch.Tensor, order: torch.Tensor, r: int, num_prefix: int, bsm: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pitome_matching`'s merges as rows of the input sequence [prefix, T tokens]: the output's
    rows in PiToMe's order (prefix, kept tokens, merge destinations), the merged rows and the
    output row each is added into. Returns (kept [B, N - r], moving [B, r], slots [B, r])."""
    batch, tokens = order.shape
    rows = order + num_prefix
    prefix = _prefix_rows(num_prefix, batch, order.device)
    partner, rank = _ranked_partners(sim, order, r, bsm)
    if rank is not None:
        rows_a = rows[:, ::2]
        kept = torch.cat([prefix, rows_a.gather(1, rank[:, r:]), rows[:, 1::2]], dim=1)
        moving = rows_a.gather(1, rank[:, :r])
        slots = partner.gather(1, rank[:, :r]) + (num_prefix + (tokens + 1) // 2 - r)
        return kept, moving, slots
    slots = partner + (num_prefix + tokens - 2 * r)
    kept = torch.cat([prefix, rows[:, 2 * r :], rows[:, 1 : 2 * r : 2]], dim=1)
    return kept, rows[:, : 2 * r : 2], slots


@cached_index
def _range_rows(start: int, stop: int, batch: int, device: torch.device) -> torch.Tensor:
    """[B, stop - start]: start, ..., stop - 1 in every row."""
    return torch.arange(start, stop, device=device).expand(batch, stop - start)


@cached_index
def _prefix_rows(num_prefix: int, batch: int, device: torch.device) -> torch.Tensor:
    return torch.arange(num_prefix, device=device).expand(batch, num_prefix)


def _check_number(option: str, value: object, accepted: str, ok: bool) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and ok):
        raise InvalidOptionError(
            f"pitome: option {option}={value!r} is not accepted; accepted: {accepted}"
        )


@register
@dataclass(frozen=True, kw_only=True)
class PiToMeConfig(MethodConfig[BlockRecord]):
    """PiToMe: in every block keep `ratio` of the non-prefix tokens, merging the rest into
    similar tokens, high-energy (redundant) tokens first.

    ratio: fraction of the non-prefix tokens each block keeps (r = floor(T - T * ratio) merges);
        0.9125, the official image-classification default (main_ic.py --ratio); 1 = identity.
    margin: energy margin of block 0; block l uses margin - margin * l / L (official 0.75).
    alpha: ELU alpha of the energy score (official 1.0).
    prop_attn: add log(size) to the attention logits. Off, as the official timm patch runs:
        its `prop_attn` flag is stored but the size never reaches the attention.
    """

    name: ClassVar[str] = "pitome"
    merges: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"key_mean"})
    sweep: ClassVar[tuple[dict, ...]] = tuple({"ratio": v} for v in (0.975, 0.95, 0.925, 0.9))
    strength: ClassVar[Strength] = Strength("ratio", False, False, lambda d: (0.5, 1.0))

    ratio: float = 0.9125
    margin: float = 0.75
    alpha: float = 1.0
    prop_attn: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(
            "ratio", self.ratio, "a number in [0.5, 1] (r = floor(T - T*ratio) <= T/2)",
            isinstance(self.ratio, (int, float)) and 0.5 <= self.ratio <= 1,
        )  # fmt: skip
        _check_number("margin", self.margin, "a finite number", True)
        _check_number("alpha", self.alpha, "a finite number", True)
        check_bool(self.name, "prop_attn", self.prop_attn)

    @property
    def uses_prop_attn(self) -> bool:
        return self.prop_attn

    def schedule(self, dims: ModelDims) -> list[PiToMeStep | None]:
        if self.ratio >= 1:
            return [None] * dims.depth
        bsm_blocks = math.ceil(dims.depth * 0.5)
        return [
            PiToMeStep(
                float(self.ratio), self.margin - self.margin * (i / dims.depth), i < bsm_blocks
            )
            for i in range(dims.depth)
        ]

    def reduce(
        self, x: torch.Tensor, state: TokenState, attn: AttentionOutputs, step: PiToMeStep
    ) -> tuple[torch.Tensor, TokenState, BlockRecord]:
        num_prefix = state.num_prefix
        batch, num_tokens, _ = x.shape
        r = merge_count(num_tokens - num_prefix, step.ratio)
        if r <= 0:
            return x, state, BlockRecord()
        # the matching is a decision: nothing in it takes a gradient
        order, sim = energy_order(attn.key_mean[:, num_prefix:].detach(), step.margin, self.alpha)
        if state.source is None and state.position is None and state.owner is None:
            # nothing but sizes to carry: every row taken in output order at once
            kept, moving, slots = pitome_rows(sim, order, r, num_prefix, step.bsm)
            weighted = gather_and_add(with_size_column(x, state.size), kept, moving, slots)
            x, size = split_size_column(weighted)
            return x, Tokens(x, size, None, None, None, None).in_state(state), BlockRecord()
        # the energy-ordered tokens first, the prefix after them: the official A/B split is by
        # parity in energy order, and the matching's order puts the prefix back in front
        rows = torch.cat([order + num_prefix, _prefix_rows(num_prefix, batch, x.device)], dim=1)
        ordered = kept_rows(carried(x, state, state.size), rows)
        matching = pitome_matching(sim, order, r, num_prefix, step.bsm)
        tokens = merged_tokens(matching, ordered, state.destination_positions)
        return tokens.x, tokens.in_state(state), BlockRecord()

    def overhead_macs(
        self,
        n_in: torch.Tensor,
        dims: ModelDims,
        step: PiToMeStep,
        record: BlockRecord,
        fused: bool,
    ) -> torch.Tensor:
        """Cosine similarities of all non-prefix tokens (T^2 d) and the size-weighted merge
        (x*s and /s), in blocks that merge (r > 0)."""
        tokens = n_in - dims.num_prefix
        real = tokens.to(torch.float64)
        merging = torch.floor(real - real * step.ratio) > 0
        macs = tokens * tokens * dims.head_dim + 2 * n_in * dims.embed_dim
        return torch.where(merging, macs, torch.zeros_like(macs))
