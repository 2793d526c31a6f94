"""ATS: Adaptive Token Sampling (Fayyaz et al., ECCV 2022, arXiv 2111.15667).

Training-free: each reducing block scores the non-prefix tokens by class attention times value
norm, and keeps the tokens that evenly spaced samples of the scores' inverse CDF land on, each
once. How many that is depends on the image, so images of one batch keep different counts
(docs/methods.md §1.6, §3.12). Official code: github.com/adaptivetokensampling/ATS
(`libs/models/transformers/ats_block.py`, `AdaptiveTokenSampler`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from tokenreduce.batching import Batching
from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.base import (
    BlockRecord,
    MethodConfig,
    Strength,
    clamped,
    class_attention_macs,
    register,
)
from tokenreduce.methods.steps import carried, kept_rows
from tokenreduce.ops.packing import Packing, pack_kept
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = [
    "MIN_TOKENS",
    "ATSConfig",
    "ATSRecord",
    "ATSStep",
    "inverse_transform_samples",
    "significance_scores",
    "token_budget",
]


MIN_TOKENS = 8
"""The official floor of the token budget: a budget below 8 tokens is raised to 8."""


class ATSStep(NamedTuple):
    """A reducing block's argument: `num_tokens`, the budget (> 1: a token count, prefix
    included; <= 1: a fraction of the tokens entering the block), and `ref_samples`, the number
    of samples drawn while the budget covers every token (the model's patch count: the official
    `n_ref_tokens - 1`)."""

    num_tokens: float
    ref_samples: int


@dataclass(frozen=True)
class ATSRecord(BlockRecord):
    """samples: [B] the number of inverse-CDF samples the image drew (the model's patch count
    while the budget covers every token, else budget - P). overflow: [B] sampled tokens dropped
    by `max_tokens` (only recorded with it)."""

    samples: torch.Tensor | None = None
    overflow: torch.Tensor | None = None


def significance_scores(
    cls_attn: torch.Tensor, values: torch.Tensor, active: torch.Tensor, num_prefix: int
) -> torch.Tensor:
    """ATS significance scores of the non-prefix tokens, normalised to sum 1 per image.

    cls_attn: [B, H, N] class-attention row; values: [B, H, N, d]; active: [B, N - P] bool.
    S_j = (sum_h A_h[0, j]) * ||v_j||, v_j the token's values of all heads concatenated [H d];
    returns S_j / sum_active S [B, N - P], 0 at inactive tokens.
    """
    batch, heads, tokens, head_dim = values.shape
    value_norm = torch.linalg.norm(
        values.transpose(1, 2).reshape(batch, tokens, heads * head_dim), ord=2, dim=2
    )
    score = (cls_attn.sum(dim=1) * value_norm)[:, num_prefix:]
    score = score.masked_fill(~active, 0.0)
    return score / score.sum(dim=1, keepdim=True)


def token_budget(num_tokens: float, count: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Each image's budget K [B] (prefix included) as the official code sets it from the option.

    count: [B] real tokens entering the block, N (prefix included). A budget above N is N; one
    <= 1 is a fraction of N; then at least max(8, P + 2), rounded half to even (Python's
    `round`), at most N.
    """
    count = count.to(torch.float64)
    budget = torch.clamp_max(torch.full_like(count, float(num_tokens)), count)
    budget = torch.where(budget <= 1.0, budget * count, budget)
    budget = budget.clamp_min(max(MIN_TOKENS, num_prefix + 2)).round()
    return torch.minimum(budget, count)


def _linspace_01(steps: torch.Tensor, ref_steps: int, width: int) -> torch.Tensor:
    """torch.linspace(0, 1, steps[b]) for each image [B, width] (columns past steps[b] are
    garbage). Images with `ref_steps` get torch.linspace itself (the official samples, bit for
    bit: its vectorised kernel rounds differently from any per-element formula); the others
    the two-sided formula of its scalar kernel."""
    index = torch.arange(width, device=steps.device, dtype=steps.dtype)
    reference = torch.linspace(0.0, 1.0, ref_steps, device=steps.device, dtype=steps.dtype)
    reference = torch.cat([reference, reference.new_ones(width - ref_steps)])
    steps = steps.unsqueeze(1)
    step = 1.0 / (steps - 1)
    halfway = torch.div(steps, 2, rounding_mode="floor")
    own = torch.where(index < halfway, index * step, 1.0 - (steps - 1 - index) * step)
    return torch.where(steps == ref_steps, reference, own)


def inverse_transform_samples(
    sorted_scores: torch.Tensor,
    count: torch.Tensor,
    samples: torch.Tensor,
    ref_samples: int,
    width: int,
) -> torch.Tensor:
    """Which tokens the inverse-transform sampling picks, in ascending score order.

    sorted_scores: [B, M] scores in ascending order, the `count` [B] real tokens first (zeros
    after them); samples: [B] the number of samples m per image (float); ref_samples: the
    usual m (the model's patch count); width: a static bound on m, at least ref_samples.
    The CDF is min-max normalised to [0, 1] (its first entry is 0), and the m samples
    y_k = y_0 + k (1 - y_0) / (m - 1), y_0 the smallest non-zero normalised CDF value, are evenly
    spaced from y_0 to 1 (the official `create_ys`, with torch.linspace); each picks the token
    whose normalised CDF is nearest (the first on ties). Returns picked [B, M] bool (a token
    picked several times is picked once).
    """
    real = torch.arange(sorted_scores.shape[1], device=count.device) < count.unsqueeze(1)
    cdf = torch.cumsum(sorted_scores, dim=1)
    low, high = cdf[:, :1], cdf[:, -1:]  # padding adds zeros: the last entry is the image's total
    span = high - low
    # one token, or every score but the lowest 0: nothing to normalise (the best token is kept)
    normalized = (cdf - low) / span.masked_fill(span <= 0, 1.0)
    start = normalized.masked_fill(~real | (normalized == 0), torch.inf).min(dim=1).values
    start = start.masked_fill(start.isinf(), 1.0).unsqueeze(1)
    samples = samples.to(cdf.dtype)
    index = torch.arange(width, device=cdf.device, dtype=cdf.dtype)
    linear = _linspace_01(samples, ref_samples, width)
    gaps = (samples - 1).unsqueeze(1)
    ys = start + ((linear * gaps) - start * index) / gaps
    distance = (ys.unsqueeze(2) - normalized.masked_fill(~real, torch.inf).unsqueeze(1)).abs()
    picks = distance.argmin(dim=2)
    # samples past an image's m go to a spare column, cut off below
    picks = picks.masked_fill(index >= samples.unsqueeze(1), sorted_scores.shape[1])
    picked = torch.zeros_like(real, dtype=torch.bool)
    picked = torch.cat([picked, picked[:, :1]], dim=1).scatter_(1, picks, True)[:, :-1]
    # the best token always stays (docs/methods.md §1.6); it is picked already unless degenerate
    best = (count - 1).clamp_min(0).unsqueeze(1)
    return picked.scatter_(1, best, True) & real


def _block_indices(value: object) -> bool:
    """Whether `value` is a non-empty list or tuple of distinct ints (block indices)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
        and len(set(value)) == len(value)
    )


def _check_num_tokens(value: object) -> None:
    def number(v: object) -> bool:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        return ok and math.isfinite(v) and v > 0

    many = isinstance(value, (list, tuple)) and len(value) > 0 and all(map(number, value))
    if not (value is None or number(value) or many):
        raise InvalidOptionError(
            f"ats: option num_tokens={value!r} is not accepted; accepted: None (every token), a "
            "number > 0 (> 1: a token budget, prefix included; <= 1: a fraction of the tokens "
            "entering the block), or a sequence of them, one per ATS block"
        )


@register
@dataclass(frozen=True, kw_only=True)
class ATSConfig(MethodConfig[ATSRecord]):
    """ATS: in each of `ats_blocks` keep the tokens that evenly spaced samples of the inverse
    CDF of the significance scores pick (docs/methods.md §3.12).

    ats_blocks: reducing block indices; None = L//4 .. L-1 (the official DeiT-S setting 3..11).
    num_tokens: the token budget K of each ATS block (one number for all, or one per ATS block):
        None = every token (the official DeiT-S setting, 197); > 1 a count, prefix included;
        <= 1 a fraction of the tokens entering the block; at least 8. While K covers the tokens
        entering, the image draws as many samples as the model has patches (the official code);
        below that, K - P samples (the paper; the official code fails there).
    batching: how images with different counts share a batch, as LTMP and AS-ViT (§1.6):
        "auto" (= "ragged"), "ragged", "packed" or "masked" (static shapes, no host sync).
    max_tokens: (masked only) a static cap on the tokens after each ATS block; an image above it
        drops its lowest-score surplus, counted in `info.records.overflow`.
    """

    name: ClassVar[str] = "ats"
    record_type: ClassVar[type[BlockRecord]] = ATSRecord
    requires_class_token: ClassVar[bool] = True
    per_image_counts: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn", "values"})
    sweep: ClassVar[tuple[dict, ...]] = tuple(
        {"num_tokens": k} for k in (None, 160, 130, 108, 90, 72)
    )
    strength: ClassVar[Strength] = Strength(
        "num_tokens", True, False, lambda d: (MIN_TOKENS, d.num_tokens)
    )

    ats_blocks: tuple[int, ...] | None = None
    num_tokens: float | tuple[float, ...] | None = None
    batching: str = "auto"
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        blocks = self.ats_blocks
        if not (blocks is None or _block_indices(blocks)):
            raise InvalidOptionError(
                f"ats: option ats_blocks={blocks!r} is not accepted; accepted: None or a "
                "non-empty tuple of distinct block indices"
            )
        if isinstance(blocks, list):
            object.__setattr__(self, "ats_blocks", tuple(blocks))
        _check_num_tokens(self.num_tokens)
        if isinstance(self.num_tokens, list):
            object.__setattr__(self, "num_tokens", tuple(self.num_tokens))
        if self.batching not in Batching.names():
            raise InvalidOptionError(
                f"ats: option batching={self.batching!r} is not accepted; accepted: "
                f"{Batching.names()}"
            )
        if self.max_tokens is not None:
            count = isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool)
            if not (count and self.max_tokens >= 1 and self.batching == "masked"):
                raise InvalidOptionError(
                    f"ats: option max_tokens={self.max_tokens!r} (batching={self.batching!r}) is "
                    "not accepted; accepted: None, or a positive int with batching='masked'"
                )

    def requested_batching(self) -> Batching:
        return Batching(self.batching)

    def blocks(self, dims: ModelDims) -> tuple[int, ...]:
        """The ATS blocks on this model, ascending."""
        if self.ats_blocks is None:
            return tuple(range(dims.depth // 4, dims.depth))
        if not all(0 <= i < dims.depth for i in self.ats_blocks):
            raise InvalidOptionError(
                f"ats: option ats_blocks={self.ats_blocks!r} is not accepted on this model; "
                f"accepted: distinct block indices in 0..{dims.depth - 1}"
            )
        return tuple(sorted(self.ats_blocks))

    def budgets(self, dims: ModelDims) -> tuple[float, ...]:
        """The option value of each ATS block, as given (None: every token, N0)."""
        blocks = self.blocks(dims)
        value = self.num_tokens
        if value is None or not isinstance(value, tuple):
            return (float(dims.num_tokens if value is None else value),) * len(blocks)
        if len(value) != len(blocks):
            raise InvalidOptionError(
                f"ats: option num_tokens has {len(value)} budgets but ATS runs in {len(blocks)} "
                f"blocks {blocks}; accepted: one number or {len(blocks)}"
            )
        return tuple(float(v) for v in value)

    def validate(self, dims: ModelDims) -> None:
        super().validate(dims)
        self.budgets(dims)

    def clamped_options(self, dims: ModelDims) -> list[str]:
        messages = []
        floor = max(MIN_TOKENS, dims.num_prefix + 2)
        for value in dict.fromkeys(self.budgets(dims)):
            if value > dims.num_tokens:
                why = f"is more than the {dims.num_tokens} tokens this model holds"
                messages.append(clamped(self.name, "num_tokens", value, why, dims.num_tokens))
            elif 1 < value < floor:
                why = f"is below the smallest budget, {floor} tokens"
                messages.append(clamped(self.name, "num_tokens", value, why, floor))
        cap = self.max_tokens
        if cap is not None and cap <= dims.num_prefix:
            why = (
                f"leaves no room for a patch token after the model's {dims.num_prefix} prefix "
                "token(s), and every image keeps one"
            )
            messages.append(clamped(self.name, "max_tokens", cap, why, dims.num_prefix + 1))
        elif cap is not None and cap > dims.num_tokens:
            why = f"is more than the {dims.num_tokens} tokens this model holds, so it caps nothing"
            messages.append(clamped(self.name, "max_tokens", cap, why, dims.num_tokens))
        return messages

    def schedule(self, dims: ModelDims) -> list[ATSStep | None]:
        steps: list[ATSStep | None] = [None] * dims.depth
        for block, budget in zip(self.blocks(dims), self.budgets(dims), strict=True):
            steps[block] = ATSStep(min(budget, float(dims.num_tokens)), dims.num_patches)
        return steps

    def reduce(
        self, x: torch.Tensor, state: TokenState, attn: AttentionOutputs, step: ATSStep
    ) -> tuple[torch.Tensor, TokenState, ATSRecord]:
        prefix = state.num_prefix
        batch, tokens, _ = x.shape
        if state.valid is not None:
            active = state.valid[:, prefix:]
            count = active.sum(dim=1)
        else:
            active = torch.ones_like(x[:, prefix:, 0], dtype=torch.bool)
            count = torch.full((batch,), tokens - prefix, device=x.device)
        score = significance_scores(attn.cls_attn, attn.values, active, prefix)
        # ascending score, padding last (the official `torch.sort`; stable for ties)
        order = score.masked_fill(~active, torch.inf).sort(dim=1, stable=True).indices
        sorted_scores = score.gather(1, order)
        budget = token_budget(step.num_tokens, count + prefix, prefix)
        covers = budget >= count + prefix
        samples = torch.where(covers, float(step.ref_samples), budget - prefix)
        width = max(step.ref_samples, tokens - prefix)
        picked = inverse_transform_samples(sorted_scores, count, samples, step.ref_samples, width)
        # output order: prefix, then the picked tokens in ascending score (the official order)
        rows = torch.cat([_prefix_rows(batch, prefix, order), order + prefix], dim=1)
        keep = torch.cat([picked.new_ones(batch, prefix), picked], dim=1)
        rank = torch.cat([sorted_scores.new_full((batch, prefix), torch.inf), sorted_scores], 1)
        packing = self._pack(keep, rank, prefix, state.batching)
        rows = rows.gather(1, packing.index)
        kept = kept_rows(carried(x, state, state.sizes_like(x)), rows, packing.valid)
        overflow = packing.overflow if self.max_tokens is not None else None
        record = ATSRecord(samples=samples.to(torch.long), overflow=overflow)
        return kept.x, kept.in_state(state, packing.counts), record

    def _pack(
        self, keep: torch.Tensor, rank: torch.Tensor, num_prefix: int, batching: Batching
    ) -> Packing:
        """Compact the kept tokens [B, N] as the engine's `batching` lays them out; masked: to
        the static length (capped by `max_tokens`, dropping the lowest `rank`s)."""
        length = None
        if batching.static:
            length = keep.shape[1]
            if self.max_tokens is not None:
                length = min(length, max(self.max_tokens, num_prefix + 1))
        return pack_kept(keep, length, rank)

    def overhead_macs(
        self, n_in: torch.Tensor, dims: ModelDims, step: ATSStep, record: ATSRecord, fused: bool
    ) -> torch.Tensor:
        patches = n_in - dims.num_prefix
        return (
            class_attention_macs(n_in, dims, fused)
            + n_in * dims.attn_dim
            + (dims.num_heads + 1) * n_in
            + record.samples.to(n_in.dtype) * patches
        )


def _prefix_rows(batch: int, num_prefix: int, like: torch.Tensor) -> torch.Tensor:
    """[B, P]: the prefix rows 0..P-1 of every image."""
    return torch.arange(num_prefix, device=like.device, dtype=like.dtype).expand(batch, -1)
