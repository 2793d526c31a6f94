"""Analytic multiply-accumulate counts from the token counts of a forward pass.

Matrix products only (norms, softmax, GELU and adds ignored), per image, as docs/measurement.md §1:
patch embedding + per block 4NC^2 + 2N^2C + 2N'C*hidden (qkv, scores, attention x V, proj, MLP
after the reduction) + head. The reduction's own cost (similarities, class-attention rows, ...)
is reported separately as overhead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokenreduce.api import describe
from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError, InvalidTypeError
from tokenreduce.info import ReductionInfo

__all__ = [
    "FlopsReport",
    "block_macs",
    "budget_fraction",
    "dense_gmacs",
    "expected_gmacs",
    "gmacs",
    "network_macs",
]


@dataclass(frozen=True)
class FlopsReport:
    """Per-image GMACs [B] (float64): `gmacs` (matmuls of the network), `overhead_gmacs` (the
    reduction's own decisions), `total_gmacs` (both)."""

    gmacs: torch.Tensor
    overhead_gmacs: torch.Tensor

    @property
    def total_gmacs(self) -> torch.Tensor:
        return self.gmacs + self.overhead_gmacs

    @property
    def mean(self) -> float:
        return float(self.gmacs.mean())

    @property
    def mean_total(self) -> float:
        return float(self.total_gmacs.mean())


def block_macs(dims: ModelDims, n_in: torch.Tensor, n_out: torch.Tensor) -> torch.Tensor:
    """MACs of one block with n_in tokens entering and n_out after its reduction."""
    return (
        n_in * dims.attn_linear_macs_per_token
        + 2 * n_in * n_in * dims.attn_dim
        + n_out * dims.mlp_macs_per_token
    )


def network_macs(
    dims: ModelDims,
    tokens_in: int,
    tokens_per_block: torch.Tensor,
    reduces_at: str = "mid",
) -> torch.Tensor:
    """Per-image MACs [B] from tokens after each block [B, L] and the N0 entering block 0.
    reduces_at (`MethodConfig.reduces_at`): "mid", attention on the tokens entering a block and
    MLP on those after its reduction; "end", both on the tokens entering it; "start", both on
    those after its reduction (the reduction's look at the unreduced tokens is its overhead)."""
    counts = tokens_per_block.to(torch.float64)
    entering = torch.cat([torch.full_like(counts[:, :1], tokens_in), counts[:, :-1]], dim=1)
    attention = counts if reduces_at == "start" else entering
    mlp = entering if reduces_at == "end" else counts
    macs = block_macs(dims, attention, mlp).sum(dim=1)
    macs = macs + dims.patch_embed_macs + dims.head_macs
    if dims.pool_attn_queries:
        pooled = counts[:, -1] - (0 if dims.pool_include_prefix else dims.num_prefix)
        macs = macs + pooled * dims.pool_macs_per_token + dims.pool_fixed_macs
    return macs


def dense_gmacs(model: nn.Module) -> float:
    """GMACs per image of the unreduced model at its configured image size."""
    dims = describe(model)
    counts = torch.full((1, dims.depth), dims.num_tokens, dtype=torch.long)
    return float(network_macs(dims, dims.num_tokens, counts)[0]) / 1e9


def expected_gmacs(dims: ModelDims, counts: torch.Tensor) -> torch.Tensor:
    """Differentiable GMACs per image (0-d, float64) of a forward with `counts` [L] tokens after
    each block (N0 entering the first; "mid" reductions), e.g. DiffRate's search, whose counts
    carry straight-through gradients (docs/methods.md §3.9)."""
    return network_macs(dims, dims.num_tokens, counts.unsqueeze(0))[0] / 1e9


def gmacs(model: nn.Module, info: ReductionInfo) -> FlopsReport:
    """Per-image GMACs of the forward pass described by `info` (from `last_info(model)`)."""
    if not isinstance(info, ReductionInfo):
        raise InvalidTypeError(
            f"info must be the ReductionInfo of a forward pass (tokenreduce.last_info(model)), "
            f"got {type(info).__name__}"
        )
    dims = describe(model)
    if info.tokens_in != dims.num_tokens or info.tokens_per_block.shape[1] != dims.depth:
        raise InvalidOptionError(
            f"info describes a forward of {info.tokens_in} tokens through "
            f"{info.tokens_per_block.shape[1]} blocks, not this model ({dims.num_tokens} tokens, "
            f"{dims.depth} blocks); accepted: tokenreduce.last_info(model) of the same model"
        )
    counts = info.tokens_per_block
    macs = network_macs(dims, info.tokens_in, counts, info.config.reduces_at)
    overhead = torch.zeros_like(macs)
    entering = torch.cat(
        [torch.full_like(counts[:, :1], info.tokens_in), counts[:, :-1]], dim=1
    ).to(torch.float64)
    for slot, block in enumerate(info.reduce_blocks):
        overhead = overhead + info.config.overhead_macs(
            entering[:, block],
            dims,
            info.steps[block],
            info.records.at(slot),
            info.fused_attention[block],
        )
    return FlopsReport(gmacs=macs / 1e9, overhead_gmacs=overhead / 1e9)


def budget_fraction(dims: ModelDims, kept_fraction: torch.Tensor) -> torch.Tensor:
    """Differentiable fraction of the blocks' dense MACs kept by soft masks (docs/methods.md §3.5).

    kept_fraction: [L] mean mask after each block over the batch and tokens (prefix included).
    Block l costs attention-linear and attention-matrix MACs at the fraction entering it and MLP
    MACs at the fraction after its reduction: with m_0 = 1,
    F = sum_l [a m_l n + 2 D (m_l n)^2 + c m_{l+1} n] / (L [a n + 2 D n^2 + c n]), which is
    LTMP's training-script formula for a ViT with MLP ratio 4.
    """
    n = float(dims.num_tokens)
    entering = torch.cat([kept_fraction.new_ones(1), kept_fraction[:-1]])
    kept = (
        dims.attn_linear_macs_per_token * entering * n
        + 2 * dims.attn_dim * (entering * n) ** 2
        + dims.mlp_macs_per_token * kept_fraction * n
    )
    dense = (
        dims.attn_linear_macs_per_token * n
        + 2 * dims.attn_dim * n * n
        + dims.mlp_macs_per_token * n
    )
    return kept.sum() / (dense * kept_fraction.shape[0])
