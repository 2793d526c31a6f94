"""Shared token-reduction mechanisms: pure functions over tensors."""

from tokenreduce.ops.attention import class_attention_row, size_bias
from tokenreduce.ops.clustering import dpc_knn, merge_clusters
from tokenreduce.ops.merging import (
    Matching,
    bipartite_soft_matching,
    mean_position,
    merge_positions,
    merge_source,
    merge_tokens,
    merge_wavg,
)
from tokenreduce.ops.selection import fuse_rows

__all__ = [
    "Matching",
    "bipartite_soft_matching",
    "class_attention_row",
    "dpc_knn",
    "fuse_rows",
    "mean_position",
    "merge_clusters",
    "merge_positions",
    "merge_source",
    "merge_tokens",
    "merge_wavg",
    "size_bias",
]
