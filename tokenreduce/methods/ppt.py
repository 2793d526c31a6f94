"""PPT: per image, prune or pool (merge) tokens, chosen by the variance of importance scores
(Wu et al., arXiv 2310.01812). Official code: xjwu1024/PPT, ppt_deit.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.base import (
    BlockRecord,
    MethodConfig,
    Strength,
    check_bool,
    check_layers_type,
    class_attention_macs,
    matching_macs,
    register,
    resolve_layers,
)
from tokenreduce.methods.steps import Tokens, carried, kept_tokens, merged_tokens
from tokenreduce.methods.tome import clamped_r
from tokenreduce.ops import bipartite_soft_matching
from tokenreduce.ops.merging import max_merges
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = ["PPTConfig", "PPTRecord", "importance_scores", "per_image"]


def importance_scores(
    cls_attn: torch.Tensor, values: torch.Tensor, num_prefix: int
) -> torch.Tensor:
    """PPT/ATS importance of the non-prefix tokens, normalised to sum 1: [B, N - P].

    cls_attn: [B, H, N] class-query attention; values: [B, H, N, d]. Score of token j =
    (sum over heads of A_h[0, j]) * ||v_j|| with v_j all heads' values concatenated.
    """
    batch, heads, tokens, head_dim = values.shape
    value_norm = values.transpose(1, 2).reshape(batch, tokens, heads * head_dim).norm(dim=-1)
    score = (cls_attn.sum(dim=1) * value_norm)[:, num_prefix:]
    return score / score.sum(dim=-1, keepdim=True)


def per_image(choose: torch.Tensor, first: Tokens, second: Tokens) -> Tokens:
    """Per image, the tokens of `first` where choose [B] is True, else those of `second` (both
    of the same shapes)."""
    chosen = (
        None if a is None else torch.where(choose.view(-1, *[1] * (a.dim() - 1)), a, b)
        for a, b in zip(first, second, strict=True)
    )
    return Tokens(*chosen)


@dataclass(frozen=True)
class PPTRecord(BlockRecord):
    """policy: [B] long, 1 where the image pruned, 0 where it pooled; score_variance: [B] the
    variance of its importance scores that decided it."""

    policy: torch.Tensor | None = None
    score_variance: torch.Tensor | None = None


@register
@dataclass(frozen=True, kw_only=True)
class PPTConfig(MethodConfig[PPTRecord]):
    """PPT: in each of `layers`, every image removes r tokens, by pooling or by pruning.

    Per image, V = unbiased variance of the normalised importance scores. V < threshold: pool
    (ToMe bipartite matching on head-mean keys, size-weighted average); otherwise prune (keep the
    highest-scoring tokens, in descending score order). r' = min(r, (N - P) // 2) so both branches
    remove the same number and the batch keeps one shape. r: one int, or one per reducing layer.
    threshold: 7e-5 off the shelf (official eval), 6e-5 when fine-tuning. prop_attn (default on):
    log(size) in the attention logits; when off, sizes are still carried (they weight later
    merges and average pooling) but attention ignores them. Every prefix token is protected in
    both branches (the official code can prune a distillation token).
    """

    name: ClassVar[str] = "ppt"
    merges: ClassVar[bool] = True
    record_type: ClassVar[type[BlockRecord]] = PPTRecord
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn", "key_mean", "values"})
    requires_class_token: ClassVar[bool] = True
    sweep: ClassVar[tuple[dict, ...]] = tuple({"r": r} for r in (20, 35, 50, 65, 80))
    strength: ClassVar[Strength] = Strength("r", True, True, lambda d: (0, d.num_patches // 2))

    r: int | tuple[int, ...] = 50
    layers: tuple[int, ...] | None = None
    threshold: float = 7e-5
    prop_attn: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        values = self.r if isinstance(self.r, (list, tuple)) else (self.r,)
        if not values or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values
        ):
            raise InvalidOptionError(
                f"ppt: option r={self.r!r} is not accepted; accepted: an int >= 0 or a list of "
                "ints >= 0, one per reducing layer"
            )
        check_layers_type(self.name, self.layers)
        threshold = self.threshold
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or threshold != threshold
        ):
            raise InvalidOptionError(
                f"ppt: option threshold={threshold!r} is not accepted; accepted: a number (inf: "
                "always pool), not NaN"
            )
        check_bool(self.name, "prop_attn", self.prop_attn)

    @property
    def uses_prop_attn(self) -> bool:
        return self.prop_attn

    def _layer_r(self, dims: ModelDims) -> tuple[tuple[int, ...], tuple[int, ...]]:
        layers = resolve_layers(self.name, self.layers, dims.depth)
        if isinstance(self.r, int):
            return layers, (self.r,) * len(layers)
        if len(self.r) != len(layers):
            raise InvalidOptionError(
                f"ppt: option r={tuple(self.r)!r} has {len(self.r)} values but there are "
                f"{len(layers)} reducing layers {layers}; accepted: one int, or one per layer"
            )
        return layers, tuple(self.r)

    def validate(self, dims: ModelDims) -> None:
        super().validate(dims)
        self._layer_r(dims)

    def clamped_options(self, dims: ModelDims) -> list[str]:
        rs = self._layer_r(dims)[1]
        return clamped_r(self.name, self.r, rs, dims, "tokens than one layer can remove")

    def schedule(self, dims: ModelDims) -> list[int | None]:
        layers, rs = self._layer_r(dims)
        per_block: list[int | None] = [None] * dims.depth
        for layer, r in zip(layers, rs, strict=True):
            per_block[layer] = r
        return per_block

    def reduce(
        self, x: torch.Tensor, state: TokenState, attn: AttentionOutputs, step: int
    ) -> tuple[torch.Tensor, TokenState, PPTRecord]:
        num_prefix = state.num_prefix
        score = importance_scores(attn.cls_attn, attn.values, num_prefix)
        variance = score.var(dim=-1)
        pool = variance < self.threshold
        record = PPTRecord(policy=(~pool).long(), score_variance=variance)
        r = min(step, max_merges(x.shape[1], num_prefix))
        if r <= 0:
            return x, state, record

        branches: list[Tokens] = []
        # one image on the CPU: its choice is read (a free sync there) and only that branch runs
        one_image = x.shape[0] == 1 and x.device.type == "cpu"
        choice = bool(pool) if one_image and not torch.compiler.is_compiling() else None
        if choice is not False:
            matching = bipartite_soft_matching(attn.key_mean, r, num_prefix, sort_unmerged=True)
            tokens = carried(x, state, state.size)
            branches.append(merged_tokens(matching, tokens, state.destination_positions))
        if choice is not True:
            keep = x.shape[1] - num_prefix - r
            tokens = carried(x, state, state.sizes_like(x))
            branches.append(kept_tokens(tokens, num_prefix, score, keep)[0])
        chosen = branches[0]
        if len(branches) == 2:  # per image: the pooled tokens where it pools, else the pruned
            chosen = per_image(pool, *branches)
        return chosen.x, chosen.in_state(state), record

    def overhead_macs(
        self, n_in: torch.Tensor, dims: ModelDims, step: int, record: PPTRecord, fused: bool
    ) -> torch.Tensor:
        pooled = (record.policy == 0).to(n_in.dtype)
        macs = class_attention_macs(n_in, dims, fused) + n_in * dims.attn_dim + n_in
        return macs + pooled * matching_macs(n_in, dims)
