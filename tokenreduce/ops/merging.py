"""Bipartite soft matching (ToMe) and size-weighted merging.

Tokens at even positions form set A, odd positions set B. Each A token proposes its most similar B
token; the r best proposals are merged. Prefix tokens are never merged and never receive a merge.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tokenreduce.ops.packing import cached_index, row_offsets

__all__ = [
    "Matching",
    "bipartite_scores",
    "bipartite_soft_matching",
    "gather_and_add",
    "interleave_destinations",
    "matching_destinations",
    "max_merges",
    "mean_position",
    "merge_positions",
    "merge_source",
    "merge_sum",
    "merge_tokens",
    "merge_wavg",
    "most_similar_stayer",
    "order_index",
    "prefix_first_order",
    "reduce_by_destination",
    "rows_in_order",
    "split_rows",
    "split_size_column",
    "with_size_column",
]


class Matching(NamedTuple):
    """A merge map over N tokens that removes r of them.

    unm_idx: [B, N_A - r] kept A tokens (indices into A); src_idx: [B, r] merged A tokens;
    dst_idx: [B, r] their B partners; order: a permutation of the N - r outputs that puts the
    prefix tokens first in their original order, or None when [unmerged A, B] already does.
    """

    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    order: tuple[int, ...] | None


def max_merges(num_tokens: int, num_prefix: int) -> int:
    """Largest r bipartite matching can use: half the non-prefix tokens, within set A."""
    non_prefix_in_a = math.ceil(num_tokens / 2) - math.ceil(num_prefix / 2)
    return max(0, min((num_tokens - num_prefix) // 2, non_prefix_in_a))


def bipartite_scores(metric: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Cosine similarity of every A token (even positions) to every B token (odd positions) of
    `metric` [B, N, d]: [B, N_A, N_B], -inf in the rows and columns of prefix tokens (zero rows of
    `metric` score 0)."""
    metric = metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True).clamp_min(1e-12)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    prefix_in_a, prefix_in_b = math.ceil(num_prefix / 2), num_prefix // 2
    if prefix_in_a:
        scores.narrow(1, 0, prefix_in_a).fill_(-math.inf)
    if prefix_in_b:
        scores.narrow(2, 0, prefix_in_b).fill_(-math.inf)
    return scores


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, num_prefix: int, sort_unmerged: bool = True
) -> Matching | None:
    """Choose r merges by cosine similarity of `metric` [B, N, d]; None when r clips to 0.

    Scores A x B by cosine similarity; prefix rows of A and prefix columns of B get -inf; the r A
    tokens with the best match are merged into their match (several may share a partner). With
    `sort_unmerged` (models with a prefix) the kept A tokens stay in their original order; without
    it they are in descending best-match order, as ToMe does for models with no class token.
    """
    num_tokens = metric.shape[1]
    r = min(r, max_merges(num_tokens, num_prefix))
    if r <= 0:
        return None
    # the matching is a decision: nothing in it takes a gradient
    node_max, node_idx = bipartite_scores(metric.detach(), num_prefix).max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
    unm_idx = edge_idx[:, r:]
    src_idx = edge_idx[:, :r]
    dst_idx = node_idx.gather(dim=-1, index=src_idx)
    if sort_unmerged:
        unm_idx = unm_idx.sort(dim=-1).values
    return Matching(
        unm_idx, src_idx, dst_idx, prefix_first_order(num_tokens - r, unm_idx.shape[1], num_prefix)
    )


def prefix_first_order(num_out: int, num_unmerged: int, num_prefix: int) -> tuple[int, ...] | None:
    """Permutation of cat([A tokens kept, B tokens]) (`num_unmerged` of A, `num_out` in all) that
    puts the prefix first in original order, then the other A, then the other B tokens; None when
    the concatenation already is that order (P <= 1)."""
    if num_prefix <= 1:
        return None
    prefix_in_a = math.ceil(num_prefix / 2)
    prefix_in_b = num_prefix // 2
    prefix = [p // 2 if p % 2 == 0 else num_unmerged + p // 2 for p in range(num_prefix)]
    rest_a = list(range(prefix_in_a, num_unmerged))
    rest_b = list(range(num_unmerged + prefix_in_b, num_out))
    return tuple(prefix + rest_a + rest_b)


def merge_tokens(y: torch.Tensor, m: Matching, mode: str = "sum") -> torch.Tensor:
    """Apply a matching to any per-token tensor y [B, N, C]: reduce merged A rows into B rows
    (mode "sum", "amax", ...; "destination": B rows stay as they are, merged A rows vanish)."""
    if mode == "sum":
        return merge_sum(y, m)
    batch, _, channels = y.shape
    y_a, y_b = y[:, ::2], y[:, 1::2]
    unm = y_a.gather(1, m.unm_idx.unsqueeze(-1).expand(batch, -1, channels))
    if mode != "destination":
        src = y_a.gather(1, m.src_idx.unsqueeze(-1).expand(batch, -1, channels))
        y_b = y_b.scatter_reduce(
            1, m.dst_idx.unsqueeze(-1).expand(batch, -1, channels), src, reduce=mode
        )
    out = torch.cat([unm, y_b], dim=1)
    if m.order is not None:
        out = out[:, order_index(m.order, out.device)]
    return out


def merge_sum(y: torch.Tensor, m: Matching) -> torch.Tensor:
    """`merge_tokens` in mode "sum": the kept rows [A kept, B] gathered straight from y [B, N, C],
    the merged A rows added into their B rows (`index_add_`, in the order of `src_idx`: the
    additions of `scatter_reduce`, in the same order, so the same values bit for bit on the CPU).
    One image takes the A rows from a strided view of y: five operations in all, as each costs
    tens of microseconds at batch 1."""
    batch, tokens, channels = y.shape
    num_unmerged = m.unm_idx.shape[1]
    if batch == 1:
        rows_a = y[0, ::2]
        out = torch.cat([rows_a.index_select(0, m.unm_idx[0]), y[0, 1::2]])
        out.index_add_(0, m.dst_idx[0] + num_unmerged, rows_a.index_select(0, m.src_idx[0]))
        out = out.unsqueeze(0)
    else:
        # rows of the flattened [B * N, C] batch: image b's A row i is b * N + 2 * i (offset and
        # stride in one op), its B rows a cached constant
        first_rows = row_offsets(batch, tokens, 0, y.device)
        unmerged = torch.add(first_rows, m.unm_idx, alpha=2)
        rows = torch.cat([unmerged, odd_rows_of_batch(batch, tokens, y.device)], dim=1)
        moving = torch.add(first_rows, m.src_idx, alpha=2)
        kept = rows.shape[1]
        target = m.dst_idx + row_offsets(batch, kept, num_unmerged, y.device)
        flat = y.reshape(batch * tokens, channels)
        out = _select_and_add(flat, rows.view(-1), moving.view(-1), target.view(-1))
        out = out.view(batch, kept, channels)
    if m.order is not None:
        out = out[:, order_index(m.order, out.device)]
    return out


def gather_and_add(
    y: torch.Tensor, kept: torch.Tensor, moving: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """Rows `kept` [B, K] of y [B, N, C], with the rows `moving` [B, r] of y added into the
    output rows `slots` [B, r] (`index_add_` in the order of `moving`): [B, K, C].

    A merge whose output order is known up front takes its rows in that order at once: one
    gather for the kept rows, one for the moving ones, one addition, and no concatenation or
    permutation after (each a copy of every row)."""
    batch, tokens, channels = y.shape
    if batch == 1:
        return _select_and_add(y[0], kept[0], moving[0], slots[0]).unsqueeze(0)
    first_rows = row_offsets(batch, tokens, 0, y.device)
    width = kept.shape[1]
    target = slots + row_offsets(batch, width, 0, y.device)
    flat = y.reshape(batch * tokens, channels)
    out = _select_and_add(
        flat, (kept + first_rows).view(-1), (moving + first_rows).view(-1), target.view(-1)
    )
    return out.view(batch, width, channels)


def _select_and_add(
    rows: torch.Tensor, kept: torch.Tensor, moving: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """The rows `kept` [K] of rows [M, C], with the rows `moving` [r] added into the output rows
    `target` [r] (`index_add_`, in the order of `moving`): [K, C]. A batch is one flat
    [B * N, C] with each image's indices offset by its first row."""
    out = rows.index_select(0, kept)
    out.index_add_(0, target, rows.index_select(0, moving))
    return out


def matching_destinations(m: Matching, num_tokens: int) -> torch.Tensor:
    """Where each of the N input tokens of a matching goes: [B, N] output row of `merge_tokens`
    (a merged A token: its B partner's row)."""
    batch, num_unmerged = m.unm_idx.shape
    device = m.unm_idx.device
    destination_a = m.unm_idx.new_empty(batch, (num_tokens + 1) // 2)
    destination_a.scatter_(
        1, m.unm_idx, torch.arange(num_unmerged, device=device).expand_as(m.unm_idx)
    )
    destination_a.scatter_(1, m.src_idx, num_unmerged + m.dst_idx)
    destination_b = num_unmerged + torch.arange(num_tokens // 2, device=device).expand(batch, -1)
    return interleave_destinations(destination_a, destination_b, m.order)


def interleave_destinations(
    destination_a: torch.Tensor, destination_b: torch.Tensor, order: tuple[int, ...] | None
) -> torch.Tensor:
    """The destination map [B, N] of the tokens at even (A, [B, N_A]) and odd (B, [B, N_B])
    positions, given as rows of cat([A part, B part]) before that output is permuted by `order`
    (`prefix_first_order`; None: no permutation)."""
    if order is not None:  # output row of each concatenated row: the inverse permutation
        index = order_index(order, destination_a.device)
        inverse = torch.empty_like(index).scatter_(
            0, index, torch.arange(len(order), device=index.device)
        )
        destination_a, destination_b = inverse[destination_a], inverse[destination_b]
    batch = destination_a.shape[0]
    num_tokens = destination_a.shape[1] + destination_b.shape[1]
    destination = destination_a.new_empty(batch, num_tokens)
    destination[:, ::2] = destination_a
    destination[:, 1::2] = destination_b
    return destination


def reduce_by_destination(
    y: torch.Tensor, destination: torch.Tensor, num_out: int, reduce: str = "sum", dim: int = 1
) -> torch.Tensor:
    """The N entries of y [B, ...] along `dim` reduced ("sum" or "amax") into the `num_out`
    outputs that `destination` [B, N] names: [B, N, C] -> [B, N', C] (dim 1); attention
    [B, H, N, N] over keys (dim 3) or queries (dim 2).

    A sum of whole rows (the dimensions after `dim`, more than one value) is one `index_add_`
    over the flattened rows, each output's rows added in row order: the sums of `scatter_add_`,
    bit for bit, 2-4x faster on a CPU than its index expanded over the row."""
    size = list(y.shape)
    size[dim] = num_out
    row = math.prod(y.shape[dim + 1 :])
    if reduce == "sum" and row > 1:
        batch, tokens = destination.shape
        groups = math.prod(y.shape[1:dim])  # e.g. heads: each image's destinations serve all
        rows = destination
        if not isinstance(batch, int) or batch * groups > 1:  # a symbolic batch may be any size
            offsets = row_offsets(batch * groups, num_out, 0, y.device).view(batch, groups, 1)
            rows = destination.unsqueeze(1) + offsets
        out = y.new_zeros(batch * groups * num_out, row)
        out.index_add_(0, rows.reshape(-1), y.reshape(-1, row))
        return out.view(size)
    shape = [1] * y.dim()
    shape[0], shape[dim] = y.shape[0], y.shape[dim]
    index = destination.view(shape).expand_as(y)
    if reduce == "sum":
        return y.new_zeros(size).scatter_add_(dim, index, y)
    return y.new_full(size, -math.inf).scatter_reduce_(dim, index, y, reduce=reduce)


@cached_index
def odd_rows_of_batch(batch: int, tokens: int, device: torch.device) -> torch.Tensor:
    """[B, N // 2]: b * N + 1, b * N + 3, ...: the B set's rows of a bipartite matching of each
    image in a flattened [B * N, C] batch."""
    return torch.arange(1, tokens, 2, device=device) + row_offsets(batch, tokens, 0, device)


@cached_index
def order_index(order: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A `prefix_first_order` permutation as an index tensor [N] on `device`."""
    return torch.tensor(order, device=device)


@cached_index
def split_rows(
    num_tokens: int, order: tuple[int, ...] | None, device: torch.device
) -> torch.Tensor:
    """Row of each of N tokens in cat([A tokens, B tokens]) permuted by `order`: [1, N]."""
    num_a = (num_tokens + 1) // 2
    rows = torch.arange(num_tokens, device=device).unsqueeze(0)
    return interleave_destinations(rows[:, :num_a], rows[:, num_a:], order)


@cached_index
def rows_in_order(
    num_tokens: int, order: tuple[int, ...] | None, device: torch.device
) -> torch.Tensor:
    """Input row of each position of cat([A tokens, B tokens]) permuted by `order`: [N], the
    inverse of `split_rows`."""
    return split_rows(num_tokens, order, device)[0].argsort()


def with_size_column(x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """The rows a size-weighted merge sums: x * size with the size as a last column,
    [B, N, C + 1], for x [B, N, C] and size [B, N, 1] (None: every size 1)."""
    # x * 1 is x: with implicit sizes one padding op replaces ones, a product and a concatenation
    return F.pad(x, (0, 1), value=1.0) if size is None else torch.cat([x * size, size], dim=-1)


def split_size_column(
    merged: torch.Tensor, empty_rows: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed `with_size_column` rows [B, N, C + 1] -> (size-weighted means [B, N, C], sizes
    [B, N, 1]). empty_rows: some rows summed nothing (size 0, padding) and come out 0."""
    # a copy, not a view of the merged rows: the state and ReductionInfo.sizes keep each block's
    # sizes, which would otherwise keep every block's [B, N, C + 1] rows alive
    size = merged[..., -1:].contiguous()
    return merged[..., :-1] / (size.clamp_min(1.0) if empty_rows else size), size


def merge_wavg(
    m: Matching, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge: x [B, N, C], size [B, N, 1] (None: every size 1) -> merged x
    and summed sizes."""
    return split_size_column(merge_tokens(with_size_column(x, size), m, "sum"))


def merge_positions(
    m: Matching,
    position: torch.Tensor | None,
    size: torch.Tensor | None,
    merged_size: torch.Tensor,
    destination: bool,
) -> torch.Tensor | None:
    """Positions [B, N, 2] after a matching: the size-weighted mean of the merged tokens'
    (size [B, N, 1] before (None: every size 1), merged_size after), or the destination's; None
    stays None."""
    if position is None:
        return None
    if destination:
        return merge_tokens(position, m, "destination")
    moment = position if size is None else position * size
    return mean_position(merge_tokens(moment, m, "sum"), merged_size)


def most_similar_stayer(
    x: torch.Tensor, num_prefix: int, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffRate's merge partners (official `get_merge_func`): each token after the first `keep`
    of x [B, N, C] and the stayer (one of the first `keep`, never a prefix token) whose feature
    has the largest cosine similarity with its own (x itself, no gradient; no clamp of the norms,
    as the official). Returns (similarity [B, N - keep], stayer [B, N - keep])."""
    metric = x.detach()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    similarity = metric[:, keep:] @ metric[:, :keep].transpose(-1, -2)  # [B, N - keep, keep]
    similarity[..., :num_prefix] = -math.inf
    return similarity.max(dim=-1)


def mean_position(moment: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Position from its size-weighted sum [B, N, 2] and the size [B, N, 1] (0 where size is 0)."""
    return moment / torch.where(size > 0, size, 1).to(moment.dtype)


def merge_source(m: Matching, source: torch.Tensor | None) -> torch.Tensor | None:
    """Merge the 0/1 source map [B, N, N0] with logical OR (amax); None stays None."""
    if source is None:
        return None
    return merge_tokens(source, m, "amax")
