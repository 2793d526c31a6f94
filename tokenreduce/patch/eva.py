"""The timm Eva family: DINOv3, EVA-02, Perception Encoder and the RoPE ViTs.

Blocks are `EvaBlock` (pre-norm, optional LayerScale gamma) or `EvaBlockPostNorm`, with
`EvaAttention` (fused or separate q/k/v, q/k bias, sub-LN scale norm) or `AttentionRope` (fused or
separate, grouped-query k/v); MLPs (Mlp, SwiGLU, GluMlp) are run as the block runs them. Rotary
embeddings rotate the queries and keys of the non-prefix tokens by each token's position, which
travels with the token through every reduction (`TokenState.position`, `patch.rope`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import AttentionRope
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import nn

from tokenreduce.dims import ModelDims
from tokenreduce.errors import UnsupportedModelError
from tokenreduce.patch.attach import engine_of
from tokenreduce.patch.attention import (
    AttentionCall,
    AttentionSpec,
    attend,
    packed_rows,
    project_output,
)
from tokenreduce.patch.base import ModelAdapter, check_block_types, linear_macs
from tokenreduce.patch.calls import run
from tokenreduce.patch.grids import strict_patch_embed_size
from tokenreduce.patch.rope import RotaryPositions, RotaryTable, check_rotary_module
from tokenreduce.patch.timm import (
    attention_pool_facts,
    check_patch_embed,
    mlp_forward,
    model_name,
    patch_embed_macs,
    reducing_forward_features,
    reducing_forward_intermediates,
    size_aware_pool,
    timm_grid_features,
    timm_pooled_features,
)
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = ["EvaAdapter", "attention_forward"]


ATTENTIONS = (EvaAttention, AttentionRope)
BLOCKS = {EvaBlock: ATTENTIONS, EvaBlockPostNorm: ATTENTIONS}


class EvaAdapter(ModelAdapter):
    """timm Eva models, with or without rotary position embeddings."""

    SUPPORTED = (
        "timm Eva (vit_*_dinov3, eva02_*, vit_pe_core_*, vit_*_rope_*) with EvaBlock or "
        "EvaBlockPostNorm blocks, EvaAttention or AttentionRope, and rotary embeddings "
        "RotaryEmbeddingCat, RotaryEmbeddingDinoV3, RotaryEmbeddingMixed or none"
    )
    FAMILY = "eva"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.positions = RotaryPositions(model.rope) if model.rope is not None else None
        self._local = threading.local()

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return isinstance(model, Eva)

    @classmethod
    def check_supported(cls, model: nn.Module) -> None:
        cls.check_family(model)
        check_block_types(type(model).__name__, model.blocks, BLOCKS, cls.SUPPORTED)
        check_patch_embed(model)
        if model.rope is not None:
            check_rotary_module(model.rope, type(model).__name__)
        if model.patch_drop is not None:
            raise UnsupportedModelError(
                f"{type(model).__name__} with patch dropout (patch_drop_rate > 0) is not "
                "supported; accepted: patch_drop_rate=0"
            )
        # the GMACs model reads one block's widths for every block
        key_heads = [_key_heads(block.attn) for block in model.blocks]
        if len(set(key_heads)) > 1:
            raise UnsupportedModelError(
                f"{type(model).__name__} with key heads that differ by block "
                f"(num_kv_heads={tuple(key_heads)}) is not supported; accepted: the same "
                "num_kv_heads in every block"
            )

    @classmethod
    def fixed_input_size(cls, model: nn.Module) -> tuple[int, int] | None:
        return strict_patch_embed_size(model)

    @classmethod
    def describe(cls, model: nn.Module) -> ModelDims:
        cls.check_supported(model)
        attn = model.blocks[0].attn
        return ModelDims(
            family=cls.FAMILY,
            depth=len(model.blocks),
            embed_dim=model.embed_dim,
            num_heads=attn.num_heads,
            head_dim=attn.head_dim,
            attn_dim=attn.num_heads * attn.head_dim,
            key_dim=_key_heads(attn) * attn.head_dim,
            num_prefix=model.num_prefix_tokens,
            num_patches=model.patch_embed.num_patches,
            has_class_token=model.cls_token is not None,
            attn_linear_macs_per_token=linear_macs(attn),
            mlp_macs_per_token=linear_macs(model.blocks[0].mlp),
            patch_embed_macs=patch_embed_macs(model.patch_embed),
            head_macs=linear_macs(model.head),
            model_name=model_name(model),
            input_size=tuple(model.patch_embed.img_size),
            grid_size=tuple(model.patch_embed.grid_size),
            rotary=model.rope is not None,
            **attention_pool_facts(model.attn_pool, include_prefix=True),
        )

    @classmethod
    def pooled_features(cls, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return timm_pooled_features(model, images)

    @classmethod
    def grid_features(cls, model: nn.Module, images: torch.Tensor, pruned: str) -> torch.Tensor:
        return timm_grid_features(model, images, pruned)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.blocks

    def plain_block(self, block: nn.Module, x: torch.Tensor, rope: Any) -> torch.Tensor:
        return block(x, rope=rope)

    def attention_half(
        self, block: nn.Module, x: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, AttentionOutputs]:
        if isinstance(block, EvaBlockPostNorm):
            out, byproducts = attention_forward(block.attn, x, call)
            if call.probe:
                return x, byproducts
            return x + run(block.drop_path1, run(block.norm1, out)), byproducts
        out, byproducts = attention_forward(block.attn, run(block.norm1, x), call)
        if call.probe:
            return x, byproducts
        if block.gamma_1 is not None:
            out = block.gamma_1 * out
        return x + run(block.drop_path1, out), byproducts

    def mlp_half(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(block, EvaBlockPostNorm):
            return x + run(block.drop_path2, run(block.norm2, mlp_forward(block.mlp, x)))
        out = mlp_forward(block.mlp, run(block.norm2, x))
        if block.gamma_2 is not None:
            out = block.gamma_2 * out
        return x + run(block.drop_path2, out)

    def rotary(
        self, index: int, state: TokenState, rotary: RotaryTable, moved: bool
    ) -> torch.Tensor:
        """timm's table while no token moved, else the embedding at each token's position (one
        per reduction: positions change only where a block reduces, unless per depth)."""
        positions = self.positions
        position = state.position
        if not moved:
            return rotary.table[index] if positions.per_depth else rotary.table
        cached = getattr(self._local, "rope_cache", None)
        if not positions.per_depth and cached is not None and cached[0] is position:
            return cached[1]
        rope = positions.embed(position[:, state.num_prefix :], rotary, index)
        if not positions.per_depth:
            self._local.rope_cache = (position, rope)
        return rope

    @classmethod
    def reducing_members(cls, model_class: type[nn.Module]) -> dict[str, Callable]:
        def embed(self: Eva, x: torch.Tensor) -> tuple[torch.Tensor, RotaryTable | None]:
            x = self.patch_embed(x)
            grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(self.patch_embed.grid_size)
            x, table = self._pos_embed(x)
            x = self.norm_pre(x)
            if table is None:
                return x, None
            engine_of(self).adapter.positions.check_forward(self.training)
            return x, RotaryTable(table, grid)

        return {
            "forward_features": reducing_forward_features(embed),
            "forward_intermediates": reducing_forward_intermediates(embed),
            # Eva's attention pool reads every token, its average pool the patch tokens only
            "pool": size_aware_pool(model_class, lambda model: model.attn_pool is not None),
        }


def _key_heads(attn: nn.Module) -> int:
    """The attention's key (and value) heads: fewer than its query heads with grouped-query
    attention (timm's `num_kv_heads`, AttentionRope only)."""
    return getattr(attn, "num_kv_heads", attn.num_heads)


def project_qkv(
    attn: nn.Module, x: torch.Tensor, call: AttentionCall
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """q, k, v [B, heads, N, d] as EvaAttention / AttentionRope compute them (k and v with the
    k/v heads of grouped-query attention), padded when x is the flat tokens of a ragged batch;
    only those `call.projections` asks for (None for the others)."""
    pad = call.layout.pad if call.layout is not None else (lambda y: y)
    wanted = call.projections
    if attn.qkv is not None:
        q_bias = getattr(attn, "q_bias", None)
        bias = attn.qkv.bias if q_bias is None else torch.cat((q_bias, attn.k_bias, attn.v_bias))
        first, last, weight, bias = packed_rows(attn.qkv.weight, bias, wanted)
        if q_bias is not None and attn.qkv_bias_separate:
            qkv = F.linear(x, weight)
            qkv += bias
        else:
            qkv = F.linear(x, weight, bias)
        qkv = pad(qkv)
        batch, tokens, _ = qkv.shape
        parts = qkv.reshape(batch, tokens, last - first, attn.num_heads, -1)
        heads = list(parts.permute(2, 0, 3, 1, 4).unbind(0))
        return tuple([None] * first + heads + [None] * (len(wanted) - last))
    kv_heads = _key_heads(attn)
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    heads = (attn.num_heads, kv_heads, kv_heads)
    return tuple(
        pad(run(projection, x)).unflatten(-1, (count, -1)).transpose(1, 2) if needed else None
        for projection, count, needed in zip(projections, heads, wanted, strict=True)
    )


def attention_forward(
    attn: nn.Module, x: torch.Tensor, call: AttentionCall
) -> tuple[torch.Tensor, AttentionOutputs]:
    """EvaAttention / AttentionRope forward with an additive key bias and the by-products a
    method needs; with no bias and timm's rotary table it equals timm's op for op.

    The merging metric (`key_mean`) is the keys before rotation: the tokens' content, so that two
    similar patches far apart are still similar (their merged position is handled separately).
    """
    gate = run(attn.gate, x).sigmoid() if attn.gate is not None and not call.probe else None
    q, k, v = project_qkv(attn, x, call)
    if q is not None:
        q, k = run(attn.q_norm, q), run(attn.k_norm, k)
    metric_keys = k
    if call.rope is not None and q is not None:
        npt = attn.num_prefix_tokens
        half = getattr(attn, "rotate_half", False)
        dtype = q.dtype
        rotated_q = apply_rot_embed_cat(q[:, :, npt:, :], call.rope, half=half)
        rotated_k = apply_rot_embed_cat(k[:, :, npt:, :], call.rope, half=half)
        q = torch.cat([q[:, :, :npt, :], rotated_q], dim=2).to(dtype)
        k = torch.cat([k[:, :, :npt, :], rotated_k], dim=2).to(dtype)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = (None if t is None else t.repeat_interleave(groups, dim=1) for t in (k, v))
    out, byproducts = attend(AttentionSpec.of_timm(attn), q, k, v, call, metric_keys=metric_keys)
    return project_output(attn, out, gate), byproducts
