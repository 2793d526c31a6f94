"""DPC-kNN clustering and cluster merging (BAT's ops) on hand-made point sets."""

from __future__ import annotations

import torch

from tokenreduce.ops import dpc_knn, merge_clusters


def test_dpc_knn_finds_obvious_clusters():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    offsets = torch.tensor([[0.0, 0.0], [0.3, 0.0], [0.0, 0.3], [-0.3, 0.0], [0.0, -0.3]])
    points = (centres[:, None] + offsets[None]).reshape(15, 2)
    perm = torch.randperm(15)
    assignment, chosen = dpc_knn(points[perm][None], num_clusters=3, k=3)
    blob = (perm // 5)[None]  # true blob of each permuted point
    # the three centres are the blob middles (densest point with a far-away denser neighbour)
    assert sorted(perm[chosen[0]].tolist()) == [0, 5, 10]
    for b in range(3):
        assert assignment[blob == b].unique().numel() == 1
    assert assignment.unique().numel() == 3
    assert (assignment.gather(1, chosen) == torch.arange(3)).all()  # centres own their cluster


def test_merge_clusters_weighted_average():
    y = torch.tensor([[[1.0], [3.0], [10.0]]])
    assignment = torch.tensor([[0, 0, 1]])
    assert merge_clusters(y, assignment, 2).tolist() == [[[4.0], [10.0]]]
    assert merge_clusters(y, assignment, 2, "amax").tolist() == [[[3.0], [10.0]]]
