"""Density-peak clustering with k-nearest neighbours (DPC-kNN), batched and static-shaped."""

from __future__ import annotations

import torch

from tokenreduce.errors import InvalidOptionError
from tokenreduce.ops.merging import reduce_by_destination
from tokenreduce.ops.packing import cached_index, index_range

__all__ = ["dpc_knn", "merge_clusters"]


@cached_index
def _tie_break(count: int, device: torch.device) -> torch.Tensor:
    """1e-6 x a fixed pseudo-random value in [0, 1) per position (TCFormer's tie-break, made
    deterministic and the same for every image so that results do not depend on the batch;
    computed on the device, so it compiles and needs no generator)."""
    index = torch.arange(1, count + 1, dtype=torch.float64, device=device)
    return torch.frac(torch.sin(index * 12.9898) * 43758.5453) * 1e-6


@cached_index
def _diagonal(count: int, device: torch.device) -> torch.Tensor:
    return torch.eye(count, dtype=torch.bool, device=device)


def dpc_knn(x: torch.Tensor, num_clusters: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the R points of each image into `num_clusters` clusters by density peaks.

    x: [B, R, C]. D_ij = ||x_i - x_j|| / sqrt(C); density_i = exp(-mean of D_ij^2 over the k
    nearest neighbours j != i) (+ a fixed 1e-6 tie-break); delta_i = distance to the nearest
    denser point (the densest point: its largest distance); centres = the top-`num_clusters`
    points by density x delta; every point joins its nearest centre, a centre itself.
    Returns (assignment [B, R] in 0..num_clusters-1, centres [B, num_clusters] point indices in
    descending centre score).
    """
    batch, points, channels = x.shape
    if not 1 <= num_clusters <= points:
        raise InvalidOptionError(f"num_clusters={num_clusters} must be in 1..{points}")
    x = x.float()
    dist = torch.cdist(x, x) / channels**0.5
    k = max(1, min(k, points - 1))
    if points > 1:
        others = dist.masked_fill(_diagonal(points, x.device), float("inf"))
        knn = others.topk(k, dim=-1, largest=False).values
        density = torch.exp(-(knn**2).mean(dim=-1))
    else:
        density = torch.ones(batch, points, device=x.device)
    density = density.double() + _tie_break(points, x.device)
    denser = density[:, None, :] > density[:, :, None]  # [b, i, j]: j denser than i
    nearest_denser = dist.masked_fill(~denser, float("inf")).min(dim=-1).values
    delta = torch.where(denser.any(dim=-1), nearest_denser, dist.max(dim=-1).values)
    centres = (density * delta.double()).topk(num_clusters, dim=-1).indices
    to_centre = dist.gather(1, centres[:, :, None].expand(-1, -1, points))  # [B, M, R]
    assignment = to_centre.argmin(dim=1)
    own = index_range(num_clusters, x.device).expand(batch, -1)
    assignment = assignment.scatter(1, centres, own)
    return assignment, centres


def merge_clusters(
    y: torch.Tensor, assignment: torch.Tensor, num_clusters: int, mode: str = "sum"
) -> torch.Tensor:
    """Reduce the rows of y [B, R, C] into their clusters: [B, num_clusters, C] (sum or amax)."""
    if mode == "sum":
        return reduce_by_destination(y, assignment, num_clusters)
    batch, _, channels = y.shape
    out = y.new_zeros(batch, num_clusters, channels)
    index = assignment.unsqueeze(-1).expand(-1, -1, channels)
    return out.scatter_reduce(1, index, y, reduce=mode, include_self=False)
