"""BAT: beyond attentive tokens — keep the attentive tokens, keep the diversity of the others
(Long et al., CVPR 2023, arXiv 2211.11315).

No official code exists (BWLONG/BeyondAttentiveTokens holds the README, logs and figures only),
so this is a reconstruction from the paper; every choice the paper leaves open is an option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.base import BlockRecord, clamped, class_attention_macs, register
from tokenreduce.methods.evit import KeepRateConfig
from tokenreduce.methods.steps import Tokens, carried, kept_rows, merged_tokens
from tokenreduce.ops import bipartite_soft_matching, dpc_knn, mean_position, merge_clusters
from tokenreduce.ops.merging import matching_destinations
from tokenreduce.ops.owners import follow
from tokenreduce.ops.packing import gather_rows, index_range
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = ["BATConfig", "bat_counts", "resolve_count"]


def resolve_count(value: int | float, total: int) -> int:
    """An int is a count; a float in (0, 1] is a fraction of `total`, rounded up."""
    if isinstance(value, float):
        return math.ceil(value * total)
    return value


def bat_counts(
    num_tokens: int, num_prefix: int, keep_rate: float, clusters: int | float,
    attentive_matches: int | float,
) -> tuple[int, int, int, int]:  # fmt: skip
    """(K attentive, R inattentive, M clusters, r_a attentive merges) for one reducing block."""
    keep = math.ceil(keep_rate * (num_tokens - num_prefix))
    rest = num_tokens - num_prefix - keep
    num_clusters = min(rest, max(1, resolve_count(clusters, rest))) if rest else 0
    matches = min(keep // 2, resolve_count(attentive_matches, keep))
    return keep, rest, num_clusters, matches


def _check_count(option: str, value: object) -> None:
    is_int = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    is_fraction = isinstance(value, float) and 0 < value <= 1
    if not (is_int or is_fraction):
        raise InvalidOptionError(
            f"bat: option {option}={value!r} is not accepted; accepted: an int >= 0 (a count) "
            "or a float in (0, 1] (a fraction, rounded up)"
        )


@register
@dataclass(frozen=True, kw_only=True)
class BATConfig(KeepRateConfig):
    """BAT: in each of `layers`, split the non-prefix tokens by head-mean class attention into
    K = ceil(keep_rate * (N - P)) attentive and R = N - P - K inattentive tokens, then

    1. cluster the inattentive tokens by DPC-kNN on their features (`neighbours` = k of the
       kNN density) into M = `clusters` clusters, each merged into one token: the average
       weighted by class attention x size; sizes summed;
    2. merge the r_a = `attentive_matches` most similar pairs of attentive tokens (bipartite
       soft matching on head-mean keys, size-weighted), keeping their attention order.

    Output: [prefix, attentive tokens, cluster tokens (by centre score)]; N' = P + K - r_a + M.
    `clusters` / `attentive_matches`: an int (a count) or a float in (0, 1] (a fraction of R /
    of K, rounded up).

    Open choices and how the defaults were pinned. The paper does not give M, r_a or k. Its
    published DeiT-S costs (3.0048 / 2.5832 / 2.3444 / 2.0830 / 1.8233 / 1.6451 GMACs at keep
    rates 0.7 ... 0.2) leave room for only about one token per layer beyond the K attentive
    ones, and no rule with M >= 10% of R stays within 5% of them. The defaults M = ceil(0.03 R)
    and r_a = ceil(0.02 K) are the fraction rule that fits all six within 2% (largest error
    1.7%), giving 2-3 clusters per layer on DeiT-S. k = 5 follows TCFormer's DPC-kNN. Also open:
    clustering on the post-residual features (not keys), class attention x size as the cluster
    weight, keys as the matching metric, no proportional attention (as EViT, whose code BAT
    extends; `prop_attn=True` adds it). layers None = (L//4, L//2, 3L//4) = (3, 6, 9) for
    DeiT-S, the paper's 4th, 7th and 10th layers.
    """

    name: ClassVar[str] = "bat"
    merges: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"cls_attn", "key_mean"})

    clusters: int | float = 0.03
    neighbours: int = 5
    attentive_matches: int | float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_count("clusters", self.clusters)
        _check_count("attentive_matches", self.attentive_matches)
        neighbours = self.neighbours
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
            raise InvalidOptionError(
                f"bat: option neighbours={neighbours!r} is not accepted; accepted: an int >= 1"
            )

    def clamped_options(self, dims: ModelDims) -> list[str]:
        """Counts beyond what the first reducing block (all N0 tokens) splits them into: more
        clusters than inattentive tokens R, no cluster for R > 0, more attentive matches than
        K // 2, more neighbours than R - 1. Later blocks, holding fewer tokens, clip them further
        as `bat_counts` and DPC-kNN define."""
        keep, rest, _, _ = bat_counts(
            dims.num_tokens, dims.num_prefix, self.keep_rate, self.clusters, self.attentive_matches
        )
        split = f"(keep_rate={self.keep_rate} splits this model's tokens into {keep} attentive"
        split += f" and {rest} inattentive ones)"
        messages = []
        clusters = self.clusters
        if rest and isinstance(clusters, int) and clusters > rest:
            why = f"asks more clusters than there are inattentive tokens {split}"
            messages.append(clamped(self.name, "clusters", clusters, why, rest))
        if rest and clusters == 0:
            why = f"leaves no cluster for the inattentive tokens {split}"
            messages.append(clamped(self.name, "clusters", clusters, why, 1))
        matches = self.attentive_matches
        if isinstance(matches, int) and matches > keep // 2:
            why = f"asks more merges than the attentive tokens allow (at most half) {split}"
            messages.append(clamped(self.name, "attentive_matches", matches, why, keep // 2))
        if rest >= 2 and self.neighbours > rest - 1:
            why = f"asks more neighbours than the other inattentive tokens {split}"
            messages.append(clamped(self.name, "neighbours", self.neighbours, why, rest - 1))
        return messages

    def reduce(
        self, x: torch.Tensor, state: TokenState, attn: AttentionOutputs, step: float
    ) -> tuple[torch.Tensor, TokenState, BlockRecord]:
        num_prefix = state.num_prefix
        keep, rest, num_clusters, matches = bat_counts(
            x.shape[1], num_prefix, step, self.clusters, self.attentive_matches
        )
        if rest == 0 and matches == 0:
            return x, state, BlockRecord()
        score = attn.cls_attn.mean(dim=1)[:, num_prefix:]
        order = score.topk(score.shape[1], dim=-1, sorted=True).indices
        inattentive = order[:, keep:]
        # the owner map follows BAT's destination map once, below
        tokens = carried(x, state, state.sizes_like(x))._replace(owner=None)

        # rows of the attentive and inattentive tokens among all N: built once, gathered from
        # for every tensor the tokens carry
        rows = order + num_prefix
        attentive_rows, inattentive_rows = rows[:, :keep], rows[:, keep:]
        attentive = kept_rows(tokens, attentive_rows)
        matching = bipartite_soft_matching(
            gather_rows(attn.key_mean, attentive_rows), matches, num_prefix=0, sort_unmerged=True
        )
        destination = None
        if state.owner is not None:  # prefix rows stay; the others are filled in below
            destination = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1).clone()
            if matching is None:
                att_rows = index_range(keep, x.device).expand_as(attentive_rows)
            else:
                att_rows = matching_destinations(matching, keep)
            destination.scatter_(1, attentive_rows, num_prefix + att_rows)
        if matching is not None:
            attentive = merged_tokens(matching, attentive, state.destination_positions)
        parts = [_prefix(tokens, num_prefix), attentive]
        if rest:
            members = kept_rows(tokens, inattentive_rows)
            assignment, _ = dpc_knn(members.x, num_clusters, self.neighbours)
            weight = gather_rows(score.unsqueeze(-1), inattentive).to(x.dtype) * members.size
            summed = merge_clusters(torch.cat([members.x * weight, weight, members.size], -1),
                                    assignment, num_clusters)  # fmt: skip
            channels = x.shape[-1]
            total = summed[..., channels : channels + 1]
            x_clusters = summed[..., :channels] / torch.where(total > 0, total, 1)
            size_clusters = summed[..., channels + 1 :]
            src_clusters = pos_clusters = None
            if members.source is not None:
                src_clusters = merge_clusters(members.source, assignment, num_clusters, "amax")
            if members.position is not None:
                moment = merge_clusters(members.position * members.size, assignment, num_clusters)
                pos_clusters = mean_position(moment, size_clusters)
            parts.append(Tokens(x_clusters, size_clusters, src_clusters, None, pos_clusters, None))
            if destination is not None:
                first_cluster = num_prefix + attentive.x.shape[1]
                destination.scatter_(1, inattentive_rows, first_cluster + assignment)
        owner = None if destination is None else follow(state.owner, destination)
        tokens = _joined(parts)._replace(owner=owner)
        return tokens.x, tokens.in_state(state), BlockRecord()

    def overhead_macs(
        self, n_in: torch.Tensor, dims: ModelDims, step: float, record: BlockRecord, fused: bool
    ) -> torch.Tensor:
        non_prefix = n_in - dims.num_prefix
        keep = torch.ceil(step * non_prefix)
        rest = non_prefix - keep
        half_up = torch.div(keep + 1, 2, rounding_mode="floor")
        half_down = torch.div(keep, 2, rounding_mode="floor")
        return (
            class_attention_macs(n_in, dims, fused)
            + rest * rest * dims.embed_dim
            + rest * dims.embed_dim
            + half_up * half_down * dims.head_dim
            + 2 * keep * dims.embed_dim
        )


def _prefix(tokens: Tokens, num_prefix: int) -> Tokens:
    """The prefix tokens, without the owner map (rows of all tokens)."""

    def head(y: torch.Tensor | None) -> torch.Tensor | None:
        return None if y is None else y[:, :num_prefix]

    return Tokens(
        head(tokens.x), head(tokens.size), head(tokens.source), None, head(tokens.position), None
    )


def _joined(parts: list[Tokens]) -> Tokens:
    """The tokens of `parts` (none padded, none with an owner map) one after the other."""
    joined = (None if ys[0] is None else torch.cat(ys, dim=1) for ys in zip(*parts, strict=True))
    return Tokens(*joined)
