"""MCTF: multi-criteria token fusion (Lee et al., CVPR 2024), off-the-shelf (no fine-tuning).

Official code: mlvlab/MCTF, utils/mctf.py (mctf, bipartite_soft_matching, merge_wavg) and
models/modules/blocks.py (Block_DEIT). docs/methods.md §3.10.
"""

from __future__ import annotations

import dataclasses
import math
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
    register,
)
from tokenreduce.methods.steps import Tokens, carried
from tokenreduce.ops.attention import PooledAttention
from tokenreduce.ops.merging import (
    interleave_destinations,
    order_index,
    prefix_first_order,
    reduce_by_destination,
)
from tokenreduce.ops.owners import follow
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = [
    "Fusion",
    "MCTFConfig",
    "fuse_rows_by",
    "fused_attention",
    "fused_tokens",
    "mctf_matching",
    "mctf_scores",
    "merge_count",
]

POOLING_TYPES = (0, 1, 2, 3)
"""Official `pooling_type`: 0 size-weighted mean, 1 attention- and size-weighted mean, 2 max,
3 plain mean."""

MIN_TOKENS = 10
"""The official code never merges below this many tokens (`if t - r < 10: r = t - 10`)."""


def merge_count(r: int | float, num_tokens: int, num_prefix: int) -> int:
    """Tokens one block fuses, as the official `mctf()`: r is a count (int) or a fraction (< 1)
    of the non-prefix tokens; at least MIN_TOKENS stay; at most half the non-prefix tokens go.
    Deviation: never negative (the official code crashes below MIN_TOKENS tokens)."""
    if num_tokens - r < MIN_TOKENS:
        r = num_tokens - MIN_TOKENS
    count = int((num_tokens - num_prefix) * r) if r < 1 else int(r)
    return max(0, min(count, (num_tokens - num_prefix) // 2))


class Fusion(NamedTuple):
    """Where the N input tokens of one fusion go.

    destination: [B, N] output row of each input token; kept: [B, N'] input row of the token
    each output row keeps the slot of (its destination token); num_out: N'.
    """

    destination: torch.Tensor
    kept: torch.Tensor
    num_out: int


def fusion_order(
    num_out: int, num_unmerged: int, num_prefix: int, bidirection: bool
) -> tuple[int, ...] | None:
    """Permutation of the official output that puts the prefix first in original order (None:
    already so, P <= 1). Bidirectional: the B prefix tokens are the last rows (scored -inf, so
    sorted last, in index order by the stable sort)."""
    if num_prefix <= 1:
        return None
    if not bidirection:
        return prefix_first_order(num_out, num_unmerged, num_prefix)
    prefix_in_a, prefix_in_b = math.ceil(num_prefix / 2), num_prefix // 2
    prefix = [p // 2 if p % 2 == 0 else num_out - prefix_in_b + p // 2 for p in range(num_prefix)]
    return tuple(prefix + list(range(prefix_in_a, num_out - prefix_in_b)))


def mctf_scores(
    metric: torch.Tensor,
    received: torch.Tensor | None,
    size: torch.Tensor | None,
    num_prefix: int,
    tau_sim: float,
    tau_info: float,
    tau_size: float,
) -> torch.Tensor:
    """Multi-criteria scores [B, N_A, N_B] of A (even) x B (odd) tokens, as the official code.

    W_sim = ((cos(x_a, x_b) + 1) / 2)^(1/tau_sim); W_info = (i_a i_b)^(1/tau_info) with
    i = (1 / received) / max(1 / received); W_size = (z_a z_b)^(1/tau_size) with
    z = (1 / s) / max(1 / s). A tau of 0 switches its criterion off (also W_size while every
    size is 1, where it would be 1). Prefix rows of A and prefix columns of B get -inf.
    metric: [B, N, C]; received: [B, N] mean attention received; size: [B, N, 1] or None.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    if tau_sim:
        scores = ((a @ b.transpose(-1, -2) + 1) / 2) ** (1 / tau_sim)
    else:
        scores = metric.new_ones(a.shape[0], a.shape[1], b.shape[1])
    if tau_info > 0 and received is not None:
        info = 1 / received
        info = info / info.amax(dim=1, keepdim=True)
        scores = scores * (info[:, ::2, None] * info[:, None, 1::2]) ** (1 / tau_info)
    if tau_size and size is not None:
        inverse = 1 / size
        inverse = inverse / inverse.amax(dim=1, keepdim=True)
        scores = scores * (inverse[:, ::2] * inverse[:, 1::2].transpose(1, 2)) ** (1 / tau_size)
    prefix_in_a, prefix_in_b = math.ceil(num_prefix / 2), num_prefix // 2
    if prefix_in_a:
        scores[:, :prefix_in_a] = -math.inf
    if prefix_in_b:
        scores[:, :, :prefix_in_b] = -math.inf
    return scores


def mctf_matching(scores: torch.Tensor, r: int, num_prefix: int, bidirection: bool) -> Fusion:
    """Bipartite matching of `scores` [B, N_A, N_B] that fuses r tokens (official
    `bipartite_soft_matching`).

    A -> B: the r1 A tokens with the best score go into their best B token (r1 = r // 2 when
    bidirectional, else r). B -> A (bidirectional): the r2 = r - r1 B tokens whose best score
    over the A tokens left is highest go into that A token, taking what they received along.
    Output order: [A tokens left (index order with a prefix, else descending best score),
    B tokens left (descending best score over the A tokens left; unidirectional: index order)],
    then the prefix moved first (`fusion_order`).
    """
    batch, num_a, num_b = scores.shape
    device = scores.device
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
    unm_idx, src_idx = edge_idx[:, r1:], edge_idx[:, :r1]
    dst_idx = node_idx.gather(1, src_idx)
    if num_prefix:
        unm_idx = unm_idx.sort(dim=-1).values
    num_unmerged = num_a - r1
    num_out = num_a + num_b - r1 - r2
    if bidirection:
        # B rows over the A tokens left, with the scores of the A -> B step
        scores_b = scores.gather(1, unm_idx.unsqueeze(-1).expand(-1, -1, num_b)).transpose(1, 2)
        node_max_b, node_idx_b = scores_b.max(dim=-1)
        edge_idx_b = node_max_b.argsort(dim=-1, descending=True, stable=True)
        unm_idx_b, src_idx_b = edge_idx_b[:, r2:], edge_idx_b[:, :r2]
        rows_b = num_unmerged + torch.arange(num_b - r2, device=device).expand(batch, -1)
        destination_b = torch.empty_like(node_idx_b).scatter_(1, unm_idx_b, rows_b)
        destination_b.scatter_(1, src_idx_b, node_idx_b.gather(1, src_idx_b))
    else:
        unm_idx_b = torch.arange(num_b, device=device).expand(batch, -1)
        destination_b = num_unmerged + unm_idx_b
    rows_a = torch.arange(num_unmerged, device=device).expand(batch, -1)
    destination_a = torch.empty_like(node_idx).scatter_(1, unm_idx, rows_a)
    destination_a.scatter_(1, src_idx, destination_b.gather(1, dst_idx))
    order = fusion_order(num_out, num_unmerged, num_prefix, bidirection)
    kept = torch.cat([2 * unm_idx, 2 * unm_idx_b + 1], dim=1)
    if order is not None:
        kept = kept[:, order_index(order, device)]
    return Fusion(interleave_destinations(destination_a, destination_b, order), kept, num_out)


def fuse_rows_by(
    y: torch.Tensor, fusion: Fusion, reduce: str = "sum", dim: int = 1
) -> torch.Tensor:
    """The N entries of y [B, ...] along `dim` reduced into their N' outputs ("sum" or
    "amax"): y [B, N, C] -> [B, N', C] (dim 1); attention [B, H, N, N] over keys (dim 3) or
    queries (dim 2)."""
    return reduce_by_destination(y, fusion.destination, fusion.num_out, reduce, dim)


def pooling_weight(
    received: torch.Tensor, size: torch.Tensor, pooling_type: int
) -> torch.Tensor | None:
    """Per-token weights [B, N, 1] of a weighted-mean pooling: sizes s (type 0), a s / max(s)
    with a the mean attention received [B, N] (type 1), ones (type 3); None for max (type 2)."""
    if pooling_type == 0:
        return size
    if pooling_type == 1:
        return received.unsqueeze(-1) * (size / size.amax(dim=-2, keepdim=True))
    if pooling_type == 3:
        return torch.ones_like(size)
    return None


def fused_attention(
    fusion: Fusion,
    attn: torch.Tensor,
    received: torch.Tensor,
    size: torch.Tensor,
    pooling_type: int,
) -> PooledAttention | torch.Tensor:
    """The attention [B, H, N, N] over the fused tokens (official `merge_wavg` with
    `one_step_ahead`): the probabilities of a fused key are summed; the rows of a fused query
    are pooled as its features (`pooling_weight`: a `PooledAttention`, applied without forming
    the [B, H, N', N'] matrix), or their max (that matrix). size: [B, N, 1] before."""
    weight = pooling_weight(received, size, pooling_type)
    if weight is not None:
        return PooledAttention(attn, fusion.destination, weight, fusion.num_out)
    return fuse_rows_by(fuse_rows_by(attn, fusion, dim=3), fusion, "amax", dim=2)


def fused_tokens(
    fusion: Fusion,
    tokens: Tokens,
    received: torch.Tensor,
    pooling_type: int,
    destination_positions: bool,
) -> Tokens:
    """The tokens (no padding) fused by `fusion` (official `merge_wavg`).

    Features by `pooling_type`: 0 sum(s x) / sum(s); 1 sum(w x) / sum(w) with w = a s / max(s),
    a the mean attention the token received ([B, N]); 2 elementwise max; 3 plain mean. Sizes
    summed, sources OR-ed, positions by the state's `position_rule`, owners followed.
    """
    x = tokens.x
    size = tokens.size if tokens.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)
    merged_size = fuse_rows_by(size, fusion)
    weight = pooling_weight(received, size, pooling_type)
    if weight is None:
        x = fuse_rows_by(x, fusion, "amax")
    else:
        x = fuse_rows_by(x * weight, fusion) / fuse_rows_by(weight, fusion)
    position = tokens.position
    if position is not None:
        if destination_positions:
            position = position.gather(1, fusion.kept.unsqueeze(-1).expand(-1, -1, 2))
        else:
            position = fuse_rows_by(position * size, fusion) / merged_size
    source = tokens.source
    if source is not None:
        source = fuse_rows_by(source, fusion, "amax")
    owner = follow(tokens.owner, fusion.destination)
    return Tokens(x, merged_size, source, None, position, owner)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_tau(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


@register
@dataclass(frozen=True, kw_only=True)
class MCTFConfig(MethodConfig[BlockRecord]):
    """MCTF: fuse r tokens in each of `activate_layer` by bipartite matching on three criteria.

    r: tokens fused per reducing block (int), or a fraction (float in (0, 1)) of its non-prefix
        tokens; 16 is the released DeiT-T/S setting (`merge_count` for the caps).
    activate_layer: reducing block indices; None = every block but the first (the released
        setting, [1..11] on 12 blocks).
    tau_sim, tau_info, tau_size: temperatures of the similarity, informativeness and size
        criteria (0 switches one off); released 1, 20, 40.
    bidirection: fuse A -> B then B -> A (r // 2 and r - r // 2 tokens), else A -> B only.
    pooling_type: 0 size-weighted, 1 attention- and size-weighted (released), 2 max, 3 mean.
    prop_attn: proportional attention (log size on the keys), released on.
    one_step_ahead: 1 (released): a reducing block fuses its input tokens before its attention,
        scored with that attention on them, and its attention uses their attention matrix fused
        as the tokens (no softmax of its own); 2: the same, but the block computes its attention
        on the fused tokens (not on rotary models); 0: the block fuses after its MLP, scored with
        its own attention.
    """

    name: ClassVar[str] = "mctf"
    merges: ClassVar[bool] = True
    sweep: ClassVar[tuple[dict, ...]] = tuple({"r": r} for r in (4, 8, 12, 16))
    strength: ClassVar[Strength] = Strength("r", True, True, lambda d: (0, d.num_patches // 2))

    r: int | float = 16
    activate_layer: tuple[int, ...] | None = None
    tau_sim: float = 1
    tau_info: float = 20
    tau_size: float = 40
    bidirection: bool = True
    pooling_type: int = 1
    prop_attn: bool = True
    one_step_ahead: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (_is_count(self.r) or (isinstance(self.r, float) and 0 < self.r < 1)):
            raise InvalidOptionError(
                f"mctf: option r={self.r!r} is not accepted; accepted: an int >= 0 (tokens per "
                "block) or a float in (0, 1) (fraction of the non-prefix tokens)"
            )
        layers = self.activate_layer
        if layers is not None and not (
            isinstance(layers, (list, tuple))
            and len(layers) > 0
            and all(map(_is_count, layers))
            and len(set(layers)) == len(layers)  # a block listed twice still reduces once
        ):
            raise InvalidOptionError(
                f"mctf: option activate_layer={layers!r} is not accepted; accepted: None or a "
                "tuple of distinct block indices >= 0"
            )
        for option in ("tau_sim", "tau_info", "tau_size"):
            if not _is_tau(getattr(self, option)):
                raise InvalidOptionError(
                    f"mctf: option {option}={getattr(self, option)!r} is not accepted; accepted: "
                    "a number >= 0 (0 switches the criterion off)"
                )
        check_bool(self.name, "bidirection", self.bidirection)
        check_bool(self.name, "prop_attn", self.prop_attn)
        if self.pooling_type not in POOLING_TYPES or isinstance(self.pooling_type, bool):
            raise InvalidOptionError(
                f"mctf: option pooling_type={self.pooling_type!r} is not accepted; accepted: 0 "
                "(size-weighted), 1 (attention-weighted), 2 (max) or 3 (mean)"
            )
        if self.one_step_ahead not in (0, 1, 2) or isinstance(self.one_step_ahead, bool):
            raise InvalidOptionError(
                f"mctf: option one_step_ahead={self.one_step_ahead!r} is not accepted; accepted: "
                "0 (fuse after the MLP), 1 (fuse before the attention, which uses the fused "
                "attention matrix) or 2 (fuse before the attention, which is recomputed)"
            )

    @property
    def uses_prop_attn(self) -> bool:
        return self.prop_attn

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"attn"} if self.one_step_ahead == 1 else {"received"})

    @property
    def reduces_at(self) -> str:
        return "start" if self.one_step_ahead else "end"

    def layers(self, depth: int) -> tuple[int, ...]:
        """The reducing blocks on a model of `depth` blocks."""
        if self.activate_layer is None:
            return tuple(range(1, depth))
        return tuple(sorted(set(self.activate_layer)))

    def validate(self, dims: ModelDims) -> None:
        super().validate(dims)
        if self.one_step_ahead == 2 and dims.rotary:
            raise InvalidOptionError(
                "mctf: option one_step_ahead=2 is not accepted on a model with rotary position "
                "embeddings (its recomputed attention would need the fused tokens' rotation); "
                "accepted: 0 or 1"
            )
        if self.activate_layer is not None and max(self.activate_layer) >= dims.depth:
            raise InvalidOptionError(
                f"mctf: option activate_layer={tuple(self.activate_layer)!r} names a block the "
                f"model does not have; accepted: block indices in 0..{dims.depth - 1}"
            )

    def effective_merges(self, dims: ModelDims) -> list[int]:
        """Tokens each reducing block fuses on this model (at its configured input size)."""
        made, tokens = [], dims.num_tokens
        for _ in self.layers(dims.depth):
            count = merge_count(self.r, tokens, dims.num_prefix)
            made.append(count)
            tokens -= count
        return made

    def clamped_options(self, dims: ModelDims) -> list[str]:
        if not isinstance(self.r, int):
            return []
        made = self.effective_merges(dims)
        if all(count == self.r for count in made):
            return []
        why = (
            f"asks more merges than this model's {dims.num_tokens} tokens allow (at most half "
            f"the non-prefix tokens per block, and {MIN_TOKENS} tokens stay)"
        )
        return [clamped(self.name, "r", self.r, why, made)]

    def schedule(self, dims: ModelDims) -> list[int | float | None]:
        layers = self.layers(dims.depth)
        return [self.r if block in layers else None for block in range(dims.depth)]

    def reduce(
        self, x: torch.Tensor, state: TokenState, attn: AttentionOutputs, step: int | float
    ) -> tuple[torch.Tensor, TokenState, BlockRecord]:
        count = merge_count(step, x.shape[1], state.num_prefix)
        full = attn.attn if self.one_step_ahead == 1 else None
        if count == 0:
            if full is not None:  # the block's attention on its unfused tokens is the probe's
                state = dataclasses.replace(state, attention=full)
            return x, state, BlockRecord()
        received = (attn.received if full is None else full.mean(dim=(1, 2))).to(x.dtype)
        with torch.no_grad():  # the matching is a decision: no gradient
            scores = mctf_scores(
                x.detach(),
                received,
                state.size,
                state.num_prefix,
                self.tau_sim,
                self.tau_info,
                self.tau_size,
            )
            fusion = mctf_matching(scores, count, state.num_prefix, self.bidirection)
        received = received.detach()
        tokens = fused_tokens(
            fusion,
            carried(x, state, state.size),
            received,
            self.pooling_type,
            state.destination_positions,
        )
        fused_state = tokens.in_state(state)
        if full is not None:
            size = state.sizes_like(x)
            attention = fused_attention(fusion, full, received, size, self.pooling_type)
            fused_state = dataclasses.replace(fused_state, attention=attention)
        return tokens.x, fused_state, BlockRecord()

    def overhead_macs(
        self,
        n_in: torch.Tensor,
        dims: ModelDims,
        step: int | float,
        record: BlockRecord,
        fused: bool,
    ) -> torch.Tensor:
        """The cosine similarities of A x B tokens (C channels) where the block fuses any. Before
        the attention (one_step_ahead 1, 2) also the probe, the block's q and k on its N unfused
        tokens and their N^2 scores; one_step_ahead 1 then saves the N'^2 scores and the q, k
        projections of the block's attention on the N' fused tokens (it reads only their
        values), and that attention's product with the values is over the N unfused tokens where
        it pools them by weight (`PooledAttention`), N^2 rather than N'^2."""
        return n_in.new_tensor([self._overhead(int(n), dims, step) for n in n_in.tolist()])

    def _overhead(self, n: int, dims: ModelDims, r: int | float) -> int:
        count = merge_count(r, n, dims.num_prefix)
        macs = 0
        if count and self.tau_sim:
            macs += ((n + 1) // 2) * (n // 2) * dims.embed_dim
        # the q and k projections of one token (k narrower with grouped-query attention)
        query_key = (dims.attn_dim + dims.key_dim) * dims.embed_dim
        if self.one_step_ahead:
            macs += n * query_key + n * n * dims.attn_dim
        if self.one_step_ahead == 1:
            fused = n - count
            macs -= fused * query_key + fused**2 * dims.attn_dim
            if self.pooling_type != 2:
                macs += (n * n - fused**2) * dims.attn_dim
        return macs
