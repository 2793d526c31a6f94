"""DiffRate: prune by class attention, then merge, to per-block kept counts (ICCV 2023).

Official code: OpenGVLab/DiffRate at commit 91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e,
DiffRate/patch/deit.py (`DiffRateBlock.forward`, eval branch), DiffRate/merge.py
(`get_merge_func`) and compression_rate.json (the published schedules, `PRESETS` below). The
search of the counts (`tokenreduce train`) is in `diffrate_search`. docs/methods.md §3.9.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import ClassVar

import torch

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
from tokenreduce.methods.diffrate_search import (
    DEFAULT_GRANULARITY,
    SearchRates,
    SearchStep,
    check_schedule_facts,
    read_schedule_file,
    search_reduce,
)
from tokenreduce.methods.steps import Tokens, carried, kept_tokens
from tokenreduce.ops.merging import mean_position, most_similar_stayer
from tokenreduce.ops.owners import follow
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = [
    "PRESETS",
    "DiffRateConfig",
    "DiffRateStep",
    "kept_counts",
    "running_counts",
    "similarity_merged",
]

PRESET_TOKENS = 197
"""Tokens (class token included) of the models the presets were searched on (224², patch 16)."""

# compression_rate.json of OpenGVLab/DiffRate at commit 91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e:
# "<model>/<target_flops>" -> (prune_kept_num, merge_kept_num), per block, class token included,
# for the 12-block DeiTs at 224² (197 tokens). Copied as published.
PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "ViT-T-DeiT/0.6": (
        (197, 196, 180, 157, 130, 107, 86, 73, 63, 51, 40, 3),
        (197, 187, 167, 139, 114, 90, 76, 66, 57, 45, 37, 3),
    ),
    "ViT-T-DeiT/0.7": (
        (197, 196, 194, 180, 150, 123, 98, 82, 68, 60, 52, 3),
        (197, 196, 192, 158, 133, 103, 88, 72, 64, 58, 49, 3),
    ),
    "ViT-T-DeiT/0.8": (
        (197, 197, 196, 186, 166, 147, 117, 103, 92, 80, 74, 3),
        (197, 196, 190, 172, 154, 125, 107, 96, 84, 78, 70, 3),
    ),
    "ViT-T-DeiT/0.9": (
        (197, 197, 196, 190, 182, 166, 141, 125, 113, 105, 99, 3),
        (197, 196, 194, 188, 172, 147, 129, 115, 107, 103, 96, 3),
    ),
    "ViT-T-DeiT/1.0": (
        (197, 197, 196, 194, 188, 184, 178, 164, 156, 137, 129, 21),
        (197, 197, 196, 190, 186, 154, 148, 156, 145, 135, 125, 21),
    ),
    "ViT-S-DeiT/2.3": (
        (197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3),
        (197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3),
    ),
    "ViT-S-DeiT/2.5": (
        (197, 192, 174, 156, 131, 115, 111, 99, 76, 50, 39, 3),
        (197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3),
    ),
    "ViT-S-DeiT/2.7": (
        (197, 196, 182, 160, 141, 127, 115, 105, 88, 66, 49, 3),
        (197, 188, 170, 147, 131, 119, 109, 96, 76, 54, 45, 3),
    ),
    "ViT-S-DeiT/2.9": (
        (197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3),
        (197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3),
    ),
    "ViT-S-DeiT/3.1": (
        (197, 197, 194, 180, 160, 147, 137, 129, 115, 92, 76, 3),
        (197, 196, 186, 164, 150, 141, 133, 121, 103, 78, 68, 3),
    ),
    "ViT-B-DeiT/8.7": (
        (197, 192, 172, 156, 131, 107, 90, 72, 56, 33, 17, 3),
        (197, 178, 162, 141, 115, 96, 78, 60, 47, 21, 13, 3),
    ),
    "ViT-B-DeiT/10.0": (
        (197, 194, 182, 168, 148, 129, 113, 101, 82, 49, 25, 3),
        (197, 186, 174, 156, 137, 117, 105, 90, 66, 31, 19, 3),
    ),
    "ViT-B-DeiT/10.4": (
        (197, 196, 188, 174, 156, 141, 121, 103, 90, 58, 25, 3),
        (197, 190, 184, 164, 145, 131, 107, 94, 74, 31, 21, 3),
    ),
    "ViT-B-DeiT/11.5": (
        (197, 197, 197, 188, 170, 154, 139, 123, 107, 72, 43, 3),
        (197, 197, 192, 178, 158, 145, 127, 111, 94, 50, 35, 3),
    ),
    "ViT-B-DeiT/12.5": (
        (197, 197, 196, 192, 184, 170, 154, 139, 129, 94, 58, 3),
        (197, 196, 194, 190, 176, 160, 145, 131, 115, 68, 47, 3),
    ),
}

DEFAULT_PRESET = "ViT-S-DeiT/2.9"
"""The schedule of the official README's DeiT-S evaluation example (79.54 % top-1, 2.905 GFLOPs)."""


def _interpolated(values: Sequence[Fraction], depth: int) -> list[Fraction]:
    """`values` (one per block of a len(values)-block model) read at `depth` evenly spaced
    relative depths, linearly interpolated; exact (identity) when depth == len(values)."""
    last = len(values) - 1
    out = []
    for i in range(depth):
        t = Fraction(i * last, depth - 1) if depth > 1 else Fraction(0)
        lo = math.floor(t)
        hi = min(lo + 1, last)
        out.append(values[lo] + (t - lo) * (values[hi] - values[lo]))
    return out


def kept_counts(
    counts: Sequence[int], base_prefix: int, base_patches: int, dims: ModelDims, rate_scale: float
) -> list[int]:
    """Per-block kept counts (prefix included) for the model `dims` from a schedule `counts`
    (one count per block of the model it was made for, its `base_prefix` prefix tokens included)
    made for a model with `base_patches` non-prefix tokens (docs/methods.md §3.9, "Any model").

    Each count becomes a kept fraction of the non-prefix tokens f = (c - base_prefix) /
    base_patches, read at this model's depth by linear interpolation over relative depth, its
    removed part scaled by `rate_scale` (f' = 1 - rate_scale * (1 - f), at least 0), and turned
    back into P + max(1, ceil(f' * (N0 - P))). Exact fractions: a schedule on its own model with
    rate_scale 1 comes back unchanged.
    """
    fractions = [Fraction(max(c - base_prefix, 1), base_patches) for c in counts]
    scale = Fraction(rate_scale)
    out = []
    for f in _interpolated(fractions, dims.depth):
        kept = math.ceil(max(1 - scale * (1 - f), Fraction(0)) * dims.num_patches)
        out.append(dims.num_prefix + max(kept, 1))
    return out


def _check_counts(option: str, value: object) -> None:
    ok = value is None or (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 2 for c in value)
    )
    if not ok:
        raise InvalidOptionError(
            f"diffrate: option {option}={value!r} is not accepted; accepted: None (use `preset`) "
            "or a list of per-block token counts, ints >= 2 (class token included)"
        )


def running_counts(
    prune: Sequence[int], merge: Sequence[int], floor: int, tokens: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The per-block counts a model of `tokens` tokens runs for the counts given: each at least
    `floor` (the prefix and one patch token), and at most what its step receives (the official
    `x[:, :prune]` keeps every token of a block given more): prune_i <= the tokens block i
    receives (N0, then merge_{i-1}), merge_i <= prune_i."""
    prune_used, merge_used = [], []
    for pruned, merged in zip(prune, merge, strict=True):
        tokens = min(max(pruned, floor), tokens)
        prune_used.append(tokens)
        tokens = min(max(merged, floor), tokens)
        merge_used.append(tokens)
    return tuple(prune_used), tuple(merge_used)


@dataclass(frozen=True)
class DiffRateStep:
    """One reducing block: `prune` tokens kept by class attention, of which the `merge` most
    attended stay and the rest merge into them (prefix included; merge <= prune <= N)."""

    prune: int
    merge: int


def similarity_merged(
    tokens: Tokens, num_prefix: int, keep: int, destination_positions: bool
) -> Tokens:
    """DiffRate's merge (official `get_merge_func`): the first `keep` tokens (the most attended,
    prefix first) stay; each later token joins the stayer whose feature x is most similar (cosine
    of the post-residual tokens; prefix tokens never receive one).

    x: plain mean of the destination and the tokens joining it (the official `scatter_reduce`
    "mean", sizes ignored; here their sum over their count). size: s_dst + Σ s_src · sim_src,
    with sim_src the joining token's best cosine similarity (official "optimize proportional
    attention"). source: OR. position: the members' mean weighted by their sizes before this
    merge, or with `destination_positions` the destination's. Sizes must be explicit. Output
    [B, keep, ...], the stayers in input order.
    """
    x, size = tokens.x, tokens.size
    node_max, node_idx = most_similar_stayer(x, num_prefix, keep)
    index = node_idx.unsqueeze(-1)

    def merged(y: torch.Tensor, src: torch.Tensor, mode: str) -> torch.Tensor:
        return y[:, :keep].scatter_reduce(
            1, index.expand(-1, -1, y.shape[-1]), src, reduce=mode, include_self=True
        )

    new_size = merged(size, size[:, keep:] * node_max.unsqueeze(-1).to(size.dtype), "sum")
    source = position = owner = None
    if tokens.source is not None:
        source = merged(tokens.source, tokens.source[:, keep:], "amax")
    if tokens.position is not None and destination_positions:
        position = tokens.position[:, :keep]
    elif tokens.position is not None:
        moment = tokens.position * size.to(tokens.position.dtype)
        weight = merged(size, size[:, keep:], "sum").to(moment.dtype)
        position = mean_position(merged(moment, moment[:, keep:], "sum"), weight)
    if tokens.owner is not None:
        stay = torch.arange(keep, device=x.device).expand(x.shape[0], -1)
        owner = follow(tokens.owner, torch.cat([stay, node_idx], dim=1))
    # the mean as sum / members: ONNX has no scatter "mean" (an exported one was wrong)
    ones = x.new_ones(x.shape[0], x.shape[1], 1)
    members = merged(ones, ones[:, keep:], "sum")
    mean = merged(x, x[:, keep:], "sum") / members
    return Tokens(mean, new_size, source, tokens.valid, position, owner)


@register
@dataclass(frozen=True, kw_only=True)
class DiffRateConfig(MethodConfig[BlockRecord]):
    """DiffRate at inference: in each block, after attention, keep the prune_kept_num tokens
    with the largest head-mean class attention (descending), then merge all but the
    merge_kept_num most attended into their most similar stayer (docs/methods.md §3.9).

    prune_kept_num, merge_kept_num: per-block token counts (class token included, one per
        block), as the official `set_kept_num`; both None (default): the schedule `preset`.
    searched: a schedule file written by `tokenreduce train --method diffrate` (the searched
        counts; refused on a model of another depth, patch or prefix count).
    preset: a published schedule, "<model>/<target GFLOPs>" of the official
        compression_rate.json (`PRESETS`), used when no counts are given; on a model other than
        a 12-block 197-token one it is carried over by kept fraction and relative depth
        (`kept_counts`).
    rate_scale: multiplies every block's removed fraction of the schedule (1: as given; 0:
        nothing removed); the strength `calibrate` varies.
    granularity: patch tokens between two candidate counts of the search (`tokenreduce
        train`; official `--granularity`, 4).
    """

    name: ClassVar[str] = "diffrate"
    requires_class_token: ClassVar[bool] = True
    trainable: ClassVar[bool] = True
    key_mask_softmax: ClassVar[str] = "policy"
    train_lr: ClassVar[dict[str, float]] = {"rates": 0.01}
    """Official `main.py --arch-lr` (README's search command)."""
    merges: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn"})
    sweep: ClassVar[tuple[dict, ...]] = tuple(
        {"preset": name} for name in PRESETS if name.startswith("ViT-S-DeiT/")
    )
    strength: ClassVar[Strength] = Strength("rate_scale", False, True, lambda d: (0.0, 4.0))

    prune_kept_num: tuple[int, ...] | None = None
    merge_kept_num: tuple[int, ...] | None = None
    searched: str | Path | None = None
    preset: str = DEFAULT_PRESET
    rate_scale: float = 1.0
    granularity: int = DEFAULT_GRANULARITY
    searched_for: str | None = field(default=None, repr=False, metadata={"internal": True})
    """JSON of the schedule file's path and recorded model facts, set when the counts come from a
    file; `validate` refuses a model with other facts."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.searched is not None:
            if self.prune_kept_num is not None or self.merge_kept_num is not None:
                raise InvalidOptionError(
                    "diffrate: option searched sets prune_kept_num and merge_kept_num; accepted: "
                    "searched alone, or the two count lists without searched"
                )
            if not isinstance(self.searched, (str, Path)):
                raise InvalidOptionError(
                    f"diffrate: option searched={self.searched!r} is not accepted; accepted: the "
                    "path of a schedule file written by tokenreduce train --method diffrate"
                )
            prune, merge, facts = read_schedule_file(self.searched)
            object.__setattr__(self, "prune_kept_num", prune)
            object.__setattr__(self, "merge_kept_num", merge)
            object.__setattr__(
                self, "searched_for", json.dumps({"file": str(self.searched), **facts})
            )
            object.__setattr__(self, "searched", None)
        _check_counts("prune_kept_num", self.prune_kept_num)
        _check_counts("merge_kept_num", self.merge_kept_num)
        if (self.prune_kept_num is None) != (self.merge_kept_num is None):
            raise InvalidOptionError(
                "diffrate: options prune_kept_num and merge_kept_num are given together or not "
                f"at all (got prune_kept_num={self.prune_kept_num!r}, merge_kept_num="
                f"{self.merge_kept_num!r}); accepted: both lists, or neither (use `preset`)"
            )
        for option in ("prune_kept_num", "merge_kept_num"):  # lists in, hashable tuples kept
            if isinstance(getattr(self, option), list):
                object.__setattr__(self, option, tuple(getattr(self, option)))
        if not isinstance(self.preset, str) or self.preset not in PRESETS:
            raise InvalidOptionError(
                f"diffrate: option preset={self.preset!r} is not accepted; accepted: "
                f"{', '.join(PRESETS)}"
            )
        scale = self.rate_scale
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not 0 <= scale < math.inf
        ):
            raise InvalidOptionError(
                f"diffrate: option rate_scale={scale!r} is not accepted; accepted: a finite "
                "number >= 0"
            )
        granularity = self.granularity
        if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity < 1:
            raise InvalidOptionError(
                f"diffrate: option granularity={granularity!r} is not accepted; accepted: an int "
                ">= 1 (patch tokens between two candidate counts of the search)"
            )

    @property
    def uses_prop_attn(self) -> bool:
        return True  # the official attention always adds log(size)

    def validate(self, dims: ModelDims) -> None:
        if self.searched_for is not None:  # first: a file for another model fails the rest too
            recorded = json.loads(self.searched_for)
            check_schedule_facts(recorded.pop("file"), recorded, dims)
        super().validate(dims)
        for option in ("prune_kept_num", "merge_kept_num"):
            counts = getattr(self, option)
            if counts is not None and len(counts) != dims.depth:
                raise InvalidOptionError(
                    f"diffrate: option {option} has {len(counts)} per-block values but the model "
                    f"has {dims.depth} blocks; accepted: exactly {dims.depth} values"
                )

    def clamped_options(self, dims: ModelDims) -> list[str]:
        lines = []
        if self.prune_kept_num is not None:
            floor = dims.num_prefix + 1
            used = running_counts(
                self.prune_kept_num, self.merge_kept_num, floor, dims.num_tokens
            )  # fmt: skip
            why = (
                f"keeps fewer tokens than the {dims.num_prefix} prefix tokens and one patch "
                f"token, or more than its block receives (the model's {dims.num_tokens} tokens, "
                "then the tokens the block before kept, merge_kept_num[i] at most "
                "prune_kept_num[i])"
            )
            for option, counts in zip(("prune_kept_num", "merge_kept_num"), used, strict=True):
                if counts != getattr(self, option):
                    lines.append(clamped(self.name, option, getattr(self, option), why, counts))
        cleared = self._cleared_block(dims)
        if cleared is not None:
            prune, merge = self.kept_nums(dims)
            lines.append(
                f"diffrate: option rate_scale={self.rate_scale!r} removes more than all patch "
                f"tokens in block {cleared}, the first that reduces, so every block keeps one "
                f"patch token where the scaled schedule would keep none; using prune_kept_num="
                f"{tuple(prune)!r}, merge_kept_num={tuple(merge)!r} instead"
            )
        return lines

    def _cleared_block(self, dims: ModelDims) -> int | None:
        """The first reducing block of the schedule where rate_scale removes more than all the
        patch tokens (its kept fraction 1 - rate_scale * (1 - f) below 0), else None."""
        if self.prune_kept_num is None:
            prune, merge = PRESETS[self.preset]
            prefix, patches = 1, PRESET_TOKENS - 1
        else:
            prune, merge = self.prune_kept_num, self.merge_kept_num
            prefix, patches = dims.num_prefix, dims.num_patches
        unscaled = kept_counts(merge, prefix, patches, dims, 1.0)
        first = next((i for i, kept in enumerate(unscaled) if kept < dims.num_tokens), None)
        if first is None:
            return None
        counts = (prune, merge)
        fractions = [
            _interpolated([Fraction(max(c - prefix, 1), patches) for c in kind], dims.depth)[first]
            for kind in counts
        ]
        scale = Fraction(self.rate_scale)
        return first if any(1 - scale * (1 - f) < 0 for f in fractions) else None

    def kept_nums(self, dims: ModelDims) -> tuple[list[int], list[int]]:
        """The per-block (prune_kept_num, merge_kept_num) this model runs, prefix included."""
        if self.prune_kept_num is None:
            prune, merge = PRESETS[self.preset]
            prefix, patches = 1, PRESET_TOKENS - 1
        else:
            floor = dims.num_prefix + 1
            prune, merge = running_counts(
                self.prune_kept_num, self.merge_kept_num, floor, dims.num_tokens
            )
            prefix, patches = dims.num_prefix, dims.num_patches
        return (
            kept_counts(prune, prefix, patches, dims, self.rate_scale),
            kept_counts(merge, prefix, patches, dims, self.rate_scale),
        )

    def schedule(self, dims: ModelDims) -> list[DiffRateStep | None]:
        steps: list[DiffRateStep | None] = []
        tokens = dims.num_tokens
        for prune, merge in zip(*self.kept_nums(dims), strict=True):
            # official: x[:, :prune] and a merge only below that, i.e. min(N, prune, merge) stay
            kept = min(tokens, prune)
            stay = min(kept, merge)
            steps.append(DiffRateStep(kept, stay) if stay < tokens else None)
            tokens = stay
        return steps

    def check_searchable(self) -> None:
        """The search (`tokenreduce train`) starts from the official uniform rates: refuse the
        options that give a schedule, which it would ignore."""
        given = ["searched"] if self.searched_for is not None else []
        defaults = (("prune_kept_num", None), ("preset", DEFAULT_PRESET), ("rate_scale", 1.0))
        if not given:
            given = [option for option, value in defaults if getattr(self, option) != value]
        if given:
            raise InvalidOptionError(
                f"train: diffrate searches its schedule from uniform rates, so option(s) "
                f"{', '.join(given)} would be ignored; accepted: diffrate with granularity, "
                "trace_source or rope_position only"
            )

    def search_rates(self, dims: ModelDims, dtype: torch.dtype) -> SearchRates:
        """The learnable rates of the search on the model `dims` (zeros: uniform)."""
        return SearchRates(dims.depth, dims.num_patches, dims.num_prefix, self.granularity, dtype)

    def trainable_steps(
        self, steps: Sequence[DiffRateStep | None], parameters: SearchRates
    ) -> list[SearchStep | None]:
        return parameters.steps()

    def reduce(
        self,
        x: torch.Tensor,
        state: TokenState,
        attn: AttentionOutputs,
        step: DiffRateStep | SearchStep,
    ) -> tuple[torch.Tensor, TokenState, BlockRecord]:
        if isinstance(step, SearchStep):
            if state.mask is not None:  # the search forward: masks, every token stays
                x, state = search_reduce(x, state, attn, step)
                return x, state, BlockRecord()
            if step.stay == step.tokens_in:  # eval mode with the rates: their rounded counts
                return x, state, BlockRecord()
            step = DiffRateStep(step.kept, step.stay)
        num_prefix = state.num_prefix
        score = attn.cls_attn.mean(dim=1)[:, num_prefix:]
        tokens = carried(x, state, state.sizes_like(x))
        # sorted by descending class attention even when all are kept: the merge splits there
        tokens, _ = kept_tokens(tokens, num_prefix, score, step.prune - num_prefix)
        if step.merge < step.prune:
            tokens = similarity_merged(tokens, num_prefix, step.merge, state.destination_positions)
        return tokens.x, tokens.in_state(state), BlockRecord()

    def overhead_macs(
        self,
        n_in: torch.Tensor,
        dims: ModelDims,
        step: DiffRateStep,
        record: BlockRecord,
        fused: bool,
    ) -> torch.Tensor:
        # cosine similarity of each merged token to every stayer (the norms are not products)
        merging = (step.prune - step.merge) * step.merge * dims.embed_dim
        return class_attention_macs(n_in, dims, fused) + merging
