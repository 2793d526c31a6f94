"""GTP-ViT: graph-based token propagation (Xu et al., WACV 2024).

Official code: Ackesnal/GTP-ViT, models_v3.py (`select`, `propagate`, `Attention`,
`GraphPropagationBlock`, `GraphPropagationTransformer.forward_features`). docs/methods.md §3.13.
"""

from __future__ import annotations

import math
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
    clamped,
    register,
)
from tokenreduce.methods.steps import Tokens, carried, kept_rows
from tokenreduce.ops.packing import cached_index
from tokenreduce.ops.selection import prefix_and_rows
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = [
    "GRAPH_TYPES",
    "PROPAGATIONS",
    "SELECTIONS",
    "GTPConfig",
    "GTPRecord",
    "normalized_graph",
    "selection_score",
    "split_by_score",
    "token_graph",
]

SELECTIONS = (
    "MixedAttnMax",
    "MixedAttnMean",
    "SumAttnMax",
    "DiagAttnMax",
    "DiagAttnMean",
    "IMGAttnMax",
    "IMGAttnMean",
    "CLSAttnMax",
    "CLSAttnMean",
    "CosSimMax",
    "CosSimMean",
)
"""Accepted `selection` values (the official deterministic ones)."""

PROPAGATIONS = ("GraphProp", "None")
"""Accepted `propagation` values: propagate over the graph, or prune ("None")."""

GRAPH_TYPES = ("Mixed", "Spatial", "Semantic")
"""Accepted `graph_type` values."""


def selection_score(attn: torch.Tensor, selection: str, num_prefix: int) -> torch.Tensor:
    """The official token rank of the non-prefix tokens: [B, H, N, N] -> [B, N - P]; the
    lowest-ranked tokens are propagated.

    Diag = a token's attention to itself (regeneration difficulty: how little the others can
    rebuild it), IMG = the attention it receives summed over every query (broadcasting ability),
    CLS = the class token's attention to it; Mean/Max over heads. Mixed = Diag * IMG, Sum =
    Diag + IMG. CosSim = minus the summed cosine similarity of its attention row to all rows.
    """

    def over_heads(value: torch.Tensor, kind: str) -> torch.Tensor:
        return value.mean(dim=1) if kind == "Mean" else value.max(dim=1)[0]

    kind = "Mean" if selection.endswith("Mean") else "Max"
    if selection.startswith("CosSim"):
        rows = over_heads(attn[:, :, num_prefix:, :], kind)
        rows = rows / rows.norm(dim=-1, keepdim=True)
        return -(rows @ rows.transpose(-1, -2)).sum(dim=-1)
    if selection.startswith("CLS"):
        return over_heads(attn[:, :, 0, num_prefix:], kind)
    diag = torch.diagonal(attn, dim1=-2, dim2=-1)[:, :, num_prefix:]
    received = attn[:, :, :, num_prefix:].sum(dim=-2)
    if selection.startswith("Diag"):
        return over_heads(diag, kind)
    if selection.startswith("IMG"):
        return over_heads(received, kind)
    if selection == "SumAttnMax":
        return over_heads(diag, kind) + over_heads(received, kind)
    return over_heads(diag, kind) * over_heads(received, kind)  # MixedAttn*


def split_by_score(score: torch.Tensor, num_prop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [B, M - r] of the kept tokens in descending score and [B, r] of the `num_prop`
    = r lowest, propagated (into the non-prefix tokens; the official descending argsort)."""
    rank = torch.argsort(score, dim=1, descending=True)
    keep = score.shape[1] - num_prop
    return rank[:, :keep], rank[:, keep:]


@cached_index
def _grid_adjacency(rows: int, columns: int, device: torch.device) -> torch.Tensor:
    """[M, M] int32, M = rows * columns: 1 between the 8-neighbours of the patch grid (row-major
    order), 0 elsewhere and on the diagonal (the official spatial graph)."""
    index = torch.arange(rows * columns, device=device)
    row, column = index // columns, index % columns
    near = ((row[:, None] - row[None, :]).abs() <= 1) & (
        (column[:, None] - column[None, :]).abs() <= 1
    )
    return (near.int() - torch.eye(rows * columns, dtype=torch.int32, device=device)).contiguous()


def normalized_graph(graph: torch.Tensor) -> torch.Tensor:
    """D^-1/2 A D^-1/2 with D the row sums of A [B, M, M] (the official symmetric
    normalisation; elementwise, which equals its products with diagonal matrices exactly)."""
    scale = graph.sum(dim=-1) ** (-1 / 2)
    return scale[:, :, None] * graph * scale[:, None, :]


def token_graph(
    x: torch.Tensor,
    num_prefix: int,
    graph_type: str,
    num_neighbours: int,
    grid_size: tuple[int, int],
) -> torch.Tensor:
    """The normalised token graph [B, M, M] over the M = N - P non-prefix tokens of x [B, N, C]
    (the tokens entering block 0), in float32 or wider.

    Spatial: the 8-neighbours on the `grid_size` (rows, columns) patch grid. Semantic: for each
    token, the tokens whose cosine similarity to it is at least its k-th smallest, k = M - n
    (n = num_neighbours; with no prefix token k = M - 1 - n, as official), self removed.
    Mixed: their union.
    """
    batch, tokens, _ = x.shape
    count = tokens - num_prefix
    dtype = torch.promote_types(x.dtype, torch.float32)
    spatial = None
    if graph_type in ("Spatial", "Mixed"):
        spatial = _grid_adjacency(*grid_size, x.device).expand(batch, -1, -1)
    if graph_type == "Spatial":
        return normalized_graph(spatial.to(dtype))
    patches = x[:, num_prefix:].to(dtype)
    normed = patches / patches.norm(dim=-1, keepdim=True)
    similarity = normed @ normed.transpose(-1, -2)
    kth = count - num_neighbours if num_prefix else count - 1 - num_neighbours
    # the kth smallest is the (count - kth + 1)-th largest: a short top-k (which ONNX has,
    # unlike kthvalue)
    threshold = similarity.topk(count - kth + 1, dim=-1).values[..., -1:]
    one, zero = similarity.new_ones(()), similarity.new_zeros(())
    semantic = torch.where(similarity >= threshold, one, zero)
    semantic = semantic - torch.eye(count, dtype=dtype, device=x.device)
    if graph_type == "Semantic":
        return normalized_graph(semantic)
    return normalized_graph(torch.bitwise_or(semantic.int(), spatial).to(dtype))


def propagated(
    tokens: Tokens,
    graph: torch.Tensor,
    kept: torch.Tensor,
    prop: torch.Tensor,
    num_prefix: int,
    alpha: float,
    token_scale: bool,
) -> tuple[Tokens, torch.Tensor, torch.Tensor]:
    """Keep the prefix and the `kept` tokens [B, K], each receiving alpha * the graph-weighted
    sum of the `prop` tokens [B, r] (indices into the non-prefix tokens; sizes explicit).

    x_i' = x_i + alpha * sum_j W[i, j] x_j over the propagated j, with W the current graph
    [B, M, M]; with `token_scale` the sizes (token scales) likewise, else they are only gathered.
    Sources: a kept token also stands for the propagated tokens it receives from (W > 0).
    Returns the tokens, the graph among the kept tokens [B, K, K] and the number of propagated
    tokens no kept token receives from, per image [B]."""
    count = kept.shape[1]
    rows = graph.gather(1, kept.unsqueeze(-1).expand(-1, -1, graph.shape[-1]))  # [B, K, M]
    weight = rows.gather(2, prop.unsqueeze(1).expand(-1, count, -1))  # [B, K, r]
    graph = rows.gather(2, kept.unsqueeze(1).expand(-1, count, -1))  # [B, K, K]
    missing = (weight.sum(dim=1) == 0).sum(dim=1)
    out = kept_rows(tokens, prefix_and_rows(kept, num_prefix))

    def spread(y: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        # y [B, N, c]: the propagated rows' message, added to the kept non-prefix rows of received
        sent = y[:, num_prefix:].gather(1, prop.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        message = weight.to(y.dtype) @ sent
        return torch.cat([received[:, :num_prefix], received[:, num_prefix:] + alpha * message], 1)

    x = spread(tokens.x, out.x)
    size = spread(tokens.size, out.size) if token_scale else out.size
    source = out.source
    if source is not None:
        sent = tokens.source[:, num_prefix:].gather(
            1, prop.unsqueeze(-1).expand(-1, -1, source.shape[-1])
        )
        gained = ((weight != 0).to(sent.dtype) @ sent).clamp_max(1.0)
        source = torch.cat(
            [source[:, :num_prefix], torch.maximum(source[:, num_prefix:], gained)], dim=1
        )
    return Tokens(x, size, source, out.valid, out.position, out.owner), graph, missing


@dataclass(frozen=True)
class GTPRecord(BlockRecord):
    """missing: [B] long, the propagated tokens of this block that no kept token received
    (all their graph edges led to propagated tokens; the official code logs this fraction to a
    file named "missing"). None with propagation="None"."""

    missing: torch.Tensor | None = None


@register
@dataclass(frozen=True, kw_only=True)
class GTPConfig(MethodConfig[GTPRecord]):
    """GTP: in every block, between attention and MLP, the `num_prop` non-prefix tokens with the
    lowest `selection` score leave, their features propagated over a sparse token graph to the
    kept tokens: x_kept += alpha * W[kept, prop] @ x_prop (docs/methods.md §3.13).

    num_prop: tokens propagated per block (an int for every block, or one per block).
    selection: the token rank (`SELECTIONS`); MixedAttnMax = regeneration difficulty (max over
        heads of the self-attention) * broadcasting ability (max over heads of the attention
        received). CLS* need a class token.
    propagation: "GraphProp" (propagate) or "None" (prune the tokens).
    graph_type: "Mixed", "Spatial" or "Semantic", built once from the tokens entering block 0.
    num_neighbours: semantic neighbours per token.
    sparsity: fraction of each head's attention probabilities kept in every block (the rest are
        zeroed, not renormalised); 1 keeps them all.
    alpha: the weight of the propagated features (and token scales).
    token_scale: propagate token scales (the size vector) too, and add log(scale) to the
        attention logits (proportional attention).
    Defaults: the official README's setting for P = 8 (DeiT, MixedAttnMax, Mixed graph,
    GraphProp, token scale): sparsity 0.6, alpha 0.1; num_neighbours its main.py default 8.
    """

    name: ClassVar[str] = "gtp"
    record_type: ClassVar[type[BlockRecord]] = GTPRecord
    needs: ClassVar[frozenset[str]] = frozenset({"attn"})
    sweep: ClassVar[tuple[dict, ...]] = tuple({"num_prop": p} for p in (2, 4, 6, 8, 10))
    strength: ClassVar[Strength] = Strength(
        "num_prop", True, True, lambda d: (0, max(1, d.num_patches - 1))
    )

    num_prop: int | tuple[int, ...] = 8
    selection: str = "MixedAttnMax"
    propagation: str = "GraphProp"
    graph_type: str = "Mixed"
    num_neighbours: int = 8
    sparsity: float = 0.6
    alpha: float = 0.1
    token_scale: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        values = self.num_prop if isinstance(self.num_prop, (list, tuple)) else (self.num_prop,)
        if not values or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values
        ):
            raise InvalidOptionError(
                f"gtp: option num_prop={self.num_prop!r} is not accepted; accepted: an int >= 0, "
                "or a list of ints >= 0, one per block"
            )
        for option, value, accepted in (
            ("selection", self.selection, SELECTIONS),
            ("propagation", self.propagation, PROPAGATIONS),
            ("graph_type", self.graph_type, GRAPH_TYPES),
        ):
            if value not in accepted:
                raise InvalidOptionError(
                    f"gtp: option {option}={value!r} is not accepted; accepted: "
                    f"{', '.join(map(repr, accepted))}"
                )
        n = self.num_neighbours
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidOptionError(
                f"gtp: option num_neighbours={n!r} is not accepted; accepted: an int >= 1"
            )
        for option, value in (("sparsity", self.sparsity), ("alpha", self.alpha)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value)):  # inf gives inf - inf = NaN features
                raise InvalidOptionError(
                    f"gtp: option {option}={value!r} is not accepted; accepted: a finite number"
                )
        if not 0 < self.sparsity <= 1:
            raise InvalidOptionError(
                f"gtp: option sparsity={self.sparsity!r} is not accepted; accepted: a number in "
                "(0, 1] (1 keeps every attention weight)"
            )
        check_bool(self.name, "token_scale", self.token_scale)

    @property
    def uses_prop_attn(self) -> bool:
        return self.token_scale

    @property
    def attention_sparsity(self) -> float | None:
        return None if self.sparsity == 1 else float(self.sparsity)

    @property
    def _graph(self) -> bool:
        return self.propagation == "GraphProp"

    def _given(self, dims: ModelDims) -> tuple[int, ...]:
        if isinstance(self.num_prop, int):
            return (self.num_prop,) * dims.depth
        if len(self.num_prop) != dims.depth:
            raise InvalidOptionError(
                f"gtp: option num_prop={tuple(self.num_prop)!r} has {len(self.num_prop)} values "
                f"but the model has {dims.depth} blocks; accepted: one int, or one per block"
            )
        return tuple(self.num_prop)

    def _counts(self, dims: ModelDims) -> tuple[int, ...]:
        """Tokens propagated per block: as given, but each block keeps at least one non-prefix
        token."""
        left, counts = dims.num_patches, []
        for given in self._given(dims):
            count = max(0, min(given, left - 1))
            counts.append(count)
            left -= count
        return tuple(counts)

    def _neighbours(self, dims: ModelDims) -> int:
        """num_neighbours, at most what the k-th value of M similarities allows."""
        most = dims.num_patches - 1 if dims.num_prefix else dims.num_patches - 2
        return max(1, min(self.num_neighbours, most))

    def validate(self, dims: ModelDims) -> None:
        super().validate(dims)
        self._given(dims)
        if self.selection.startswith("CLS") and not dims.has_class_token:
            raise InvalidOptionError(
                f"gtp: option selection={self.selection!r} scores tokens by class attention and "
                "needs a model with a class token; this model has none. Accepted: a selection "
                "without 'CLS' (e.g. the default 'MixedAttnMax')"
            )

    def clamped_options(self, dims: ModelDims) -> list[str]:
        lines = []
        given, counts = self._given(dims), self._counts(dims)
        if counts != given:
            effective = counts[0] if len(set(counts)) == 1 else counts
            lines.append(
                clamped(
                    self.name, "num_prop", self.num_prop,
                    f"asks more tokens than this model's {dims.num_patches} patch tokens hold "
                    f"over its {dims.depth} blocks (each block keeps at least one)",
                    effective,
                )
            )  # fmt: skip
        graph_semantic = self._graph and self.graph_type != "Spatial"
        if graph_semantic and self._neighbours(dims) != self.num_neighbours:
            lines.append(
                clamped(
                    self.name, "num_neighbours", self.num_neighbours,
                    f"exceeds what {dims.num_patches} patch tokens allow",
                    self._neighbours(dims),
                )
            )  # fmt: skip
        return lines

    def schedule(self, dims: ModelDims) -> list[int | None]:
        return [count if count > 0 else None for count in self._counts(dims)]

    def initial_state(self, x: torch.Tensor, state: TokenState, dims: ModelDims) -> TokenState:
        if not self._graph or not any(self._counts(dims)):
            return state
        patches = x.shape[1] - state.num_prefix
        grid = dims.grid_size
        if grid[0] * grid[1] != patches:
            side = round(patches**0.5)
            if side * side != patches:
                raise InvalidOptionError(
                    f"gtp: the {patches} patch tokens entering block 0 do not fill the model's "
                    f"{grid[0]}x{grid[1]} patch grid nor a square one; accepted: inputs of the "
                    "model's image size"
                )
            grid = (side, side)
        graph = token_graph(x, state.num_prefix, self.graph_type, self._neighbours(dims), grid)
        return state.with_carry(graph)

    def reduce(
        self, x: torch.Tensor, state: TokenState, attn: AttentionOutputs, step: int
    ) -> tuple[torch.Tensor, TokenState, GTPRecord]:
        num_prefix = state.num_prefix
        count = min(step, x.shape[1] - num_prefix - 1)
        if count <= 0:  # only on an input smaller than the model's: nothing left to propagate
            missing = x.new_zeros(x.shape[0], dtype=torch.long) if self._graph else None
            return x, state, GTPRecord(missing)
        score = selection_score(attn.attn, self.selection, num_prefix)
        kept, prop = split_by_score(score, count)
        tokens = carried(x, state, state.sizes_like(x))
        if not self._graph:
            out = kept_rows(tokens, prefix_and_rows(kept, num_prefix))
            return out.x, out.in_state(state), GTPRecord()
        out, graph, missing = propagated(
            tokens, state.carry, kept, prop, num_prefix, self.alpha, self.token_scale
        )
        return out.x, out.in_state(state).with_carry(graph), GTPRecord(missing)

    def overhead_macs(
        self, n_in: torch.Tensor, dims: ModelDims, step: int, record: GTPRecord, fused: bool
    ) -> torch.Tensor:
        non_prefix = n_in - dims.num_prefix
        count = torch.clamp(torch.minimum(torch.full_like(n_in, step), non_prefix - 1), min=0)
        macs = torch.zeros_like(n_in)
        if self.selection.startswith(("IMG", "Mixed", "Sum")):  # attention received, summed
            macs = dims.num_heads * n_in * non_prefix
        elif self.selection.startswith("CosSim"):  # similarities of the attention rows
            macs = non_prefix * non_prefix * n_in
        if self._graph:
            kept = non_prefix - count
            width = dims.embed_dim + (1 if self.token_scale else 0)
            macs = macs + kept * count * width
            if self.graph_type != "Spatial":  # cosine similarities, once, in the first block
                first = n_in == dims.num_tokens
                macs = macs + torch.where(first, non_prefix * non_prefix * dims.embed_dim, 0)
        return macs
