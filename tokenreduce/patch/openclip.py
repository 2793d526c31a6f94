"""open_clip's image tower (`open_clip.transformer.VisionTransformer`, e.g. `model.visual`): its
hooks for the shared engine (`patch.engine`).

The registry imports this module the first time an open_clip tower is applied (a lazy adapter;
`pip install 'tokenreduce[openclip]'`). Blocks are `ResidualAttentionBlock`s around
`nn.MultiheadAttention`; the adapter runs the same projections (its packed `in_proj` and
`out_proj`) through the fused kernel, so reduced image encoding stays fused. Pooling ('tok',
'avg', or the CoCa attentional pooler) accounts for token sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import (
    AttentionalPooler,
    ResidualAttentionBlock,
    VisionTransformer,
)
from torch import nn

from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError, UnsupportedModelError
from tokenreduce.patch.attach import engine_of
from tokenreduce.patch.attention import AttentionCall, AttentionSpec, attend, packed_heads
from tokenreduce.patch.base import ModelAdapter, check_block_types, linear_macs
from tokenreduce.patch.calls import run
from tokenreduce.patch.engine import Engine
from tokenreduce.patch.grids import check_images
from tokenreduce.patch.pooling import (
    pooling_key_bias,
    pooling_weights,
    weighted_mean,
)
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = ["OpenCLIPAdapter", "set_zero_shot_weights"]

ZERO_SHOT_ATTR = "tokenreduce_zero_shot"
"""Attribute of a tower holding zero-shot classifier weights [K, D] (text embeddings of the
class prompts, scaled), set by `tokenreduce eval` (`models.open_clip_zero_shot`)."""


def set_zero_shot_weights(model: nn.Module, weights: torch.Tensor) -> None:
    """Give an open_clip image tower zero-shot classifier weights [K, D] (the normalised text
    embeddings of K class prompts, `models.open_clip_zero_shot`), so that `logits` scores K
    classes."""
    setattr(model, ZERO_SHOT_ATTR, weights)


class OpenCLIPAdapter(ModelAdapter):
    """open_clip VisionTransformer towers."""

    FAMILY = "open_clip"
    SUPPORTED = (
        "open_clip VisionTransformer image towers (model.visual) with ResidualAttentionBlock / "
        "nn.MultiheadAttention blocks, 'tok' or 'avg' pooling or the CoCa attentional pooler"
    )

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    @classmethod
    def check_supported(cls, model: nn.Module) -> None:
        cls.check_family(model)
        transformer = model.transformer
        if not transformer.batch_first:
            raise UnsupportedModelError(
                "unsupported open_clip tower: transformer.batch_first=False; supported: True"
            )
        check_block_types(
            "the open_clip tower",
            transformer.resblocks,
            {ResidualAttentionBlock: (nn.MultiheadAttention,)},
            cls.SUPPORTED,
        )
        for i, block in enumerate(transformer.resblocks):
            if not block.attn._qkv_same_embed_dim or hasattr(block, "ln_1_kv"):
                raise UnsupportedModelError(
                    f"unsupported block {i} of the open_clip tower: cross attention or separate "
                    "q/k/v projections; supported: self-attention with a packed in_proj"
                )
        if getattr(model, "attn_pool_contrastive", None) is not None:
            raise UnsupportedModelError(
                "unsupported open_clip tower: the 'parallel'/'cascade' attentional pooling; "
                "supported: 'tok' or 'avg' pooling, or the CoCa attentional pooler"
            )

    @classmethod
    def fixed_input_size(cls, model: nn.Module) -> tuple[int, int] | None:
        return tuple(model.image_size)

    @classmethod
    def describe(cls, model: nn.Module) -> ModelDims:
        cls.check_supported(model)
        block = model.transformer.resblocks[0]
        attn = block.attn
        width = model.transformer.width
        rows, cols = model.grid_size
        head_macs = 0 if model.proj is None else model.proj.numel()
        pool = {}
        if model.attn_pool is not None:
            pooler = model.attn_pool.attn  # queries of its own width attend over the tokens
            queries, inner = model.attn_pool.query.shape
            pool = dict(
                pool_macs_per_token=2 * pooler.kdim * inner + 2 * queries * inner,
                pool_fixed_macs=queries * 2 * inner * inner,
                pool_attn_queries=queries,
                pool_include_prefix=True,
            )
        return ModelDims(
            family=cls.FAMILY,
            depth=len(model.transformer.resblocks),
            embed_dim=width,
            num_heads=attn.num_heads,
            head_dim=attn.head_dim,
            attn_dim=width,
            num_prefix=1,
            num_patches=rows * cols,
            has_class_token=True,
            attn_linear_macs_per_token=attn.in_proj_weight.shape[0] * width
            + linear_macs(attn.out_proj),
            mlp_macs_per_token=linear_macs(block.mlp),
            patch_embed_macs=rows * cols * model.conv1.weight.numel(),
            head_macs=head_macs,
            input_size=tuple(model.image_size),
            grid_size=(rows, cols),
            **pool,
        )

    @classmethod
    def pooled_features(cls, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        out = model(images)
        return out[0] if isinstance(out, tuple) else out

    @classmethod
    def num_classes(cls, model: nn.Module) -> int:
        weights = getattr(model, ZERO_SHOT_ATTR, None)
        return 0 if weights is None else weights.shape[0]

    @classmethod
    def logits(cls, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits: the normalised image embedding against the class prompts'."""
        weights = getattr(model, ZERO_SHOT_ATTR, None)
        if weights is None:
            raise UnsupportedModelError(
                "an open_clip image tower gives embeddings, not class logits; accepted: zero-shot "
                f"classifier weights in model.{ZERO_SHOT_ATTR} (models.open_clip_zero_shot; "
                "tokenreduce eval sets them from the class names)"
            )
        embedding = model(images)
        embedding = embedding[0] if isinstance(embedding, tuple) else embedding
        return F.normalize(embedding, dim=-1) @ weights.to(embedding).T

    @classmethod
    def grid_features(cls, model: nn.Module, images: torch.Tensor, pruned: str) -> torch.Tensor:
        engine = engine_of(model)
        tokens = model._embeds(images)
        norm = token_norm(model)
        if engine is None:
            tokens = model.transformer(tokens)
            return tokens if norm is None else norm(tokens)
        return engine.last_grid(model, tokens, norm, pruned, engine.dims.grid_size)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.transformer.resblocks

    def plain_block(self, block: nn.Module, x: torch.Tensor, rope: Any) -> torch.Tensor:
        return block(x)

    def attention_fused(self, block: nn.Module) -> bool:
        return True

    def attention_half(
        self, block: nn.Module, x: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, AttentionOutputs]:
        attn = block.attn
        x_norm = run(block.ln_1, x)
        q, k, v = packed_heads(attn.in_proj_weight, attn.in_proj_bias, x_norm, call, attn.head_dim)
        spec = AttentionSpec(True, attn.head_dim**-0.5, attn.dropout if attn.training else 0.0)
        out, byproducts = attend(spec, q, k, v, call)
        if call.probe:
            return x, byproducts
        return x + run(block.ls_1, run(attn.out_proj, out)), byproducts

    def mlp_half(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x + run(block.ls_2, run(block.mlp, run(block.ln_2, x)))

    @classmethod
    def reducing_members(cls, model_class: type[nn.Module]) -> dict[str, Callable]:
        def forward(self: VisionTransformer, x: torch.Tensor) -> Any:
            # B >= 1: open_clip's own embedding cannot reshape an empty batch (nor can the dense
            # tower's forward), so an empty batch is refused here rather than failing inside it
            check_images(self, x, OpenCLIPAdapter.fixed_input_size(self))
            engine = engine_of(self)
            x = engine.run_blocks(self, self._embeds(x))
            pooled, tokens = size_aware_pool(self, x, engine.final_state(), engine)
            if self.proj is not None:
                pooled = pooled @ self.proj
            return (pooled, tokens) if self.output_tokens else pooled

        def forward_intermediates(self: VisionTransformer, *args: Any, **kwargs: Any) -> Any:
            raise InvalidOptionError(
                "forward_intermediates of an open_clip tower with token reduction is not "
                "supported (its blocks would run unreduced); accepted: "
                "tokenreduce.patch_features(tower, images) for the final features on the patch "
                "grid, or tokenreduce.remove(tower) first"
            )

        return {"forward": forward, "forward_intermediates": forward_intermediates}


def token_norm(model: nn.Module) -> nn.Module | None:
    """The norm the tower applies to every token (`ln_post` before pooling), or None where it
    normalises only what it pooled (final_ln_after_pool, the attentional pooler)."""
    if model.attn_pool is not None or model.final_ln_after_pool:
        return None
    return model.ln_post


def attentional_pool(pooler: AttentionalPooler, x: torch.Tensor, bias: torch.Tensor | None):
    """open_clip's AttentionalPooler with an additive key bias [B, 1, 1, N]."""
    if bias is None:
        return pooler(x)
    keys = pooler.ln_k(x)
    queries = pooler.ln_q(pooler.query)
    heads = pooler.attn.num_heads
    mask = bias.expand(-1, heads, queries.shape[0], -1).flatten(0, 1)
    return pooler.attn(
        queries.unsqueeze(0).expand(len(x), -1, -1), keys, keys, need_weights=False, attn_mask=mask
    )[0]


def size_aware_pool(
    model: nn.Module, x: torch.Tensor, state: TokenState | None, engine: Engine
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower's `_pool` where tokens stand for several patches, are padding or are masked in
    a learned method's training forward: the average is weighted (`pooling_weights`) over the
    patch tokens, the attentional pooler gets log(size) / -inf key biases; the class token
    ('tok') is read as it is."""
    reduced = state is not None and (
        state.size is not None or state.valid is not None or state.mask is not None
    )
    if not reduced:
        return model._pool(x)
    weight = pooling_weights(state, x)
    if model.attn_pool is not None:
        size = state.sizes_like(x)
        bias = pooling_key_bias(state, size, weight, engine.config.uses_prop_attn, x.dtype)
        x = model.ln_post(attentional_pool(model.attn_pool, x, bias))
        return model._global_pool(x)
    if model.pool_type != "avg":
        return model._pool(x)
    weight = weight[:, 1:]
    if model.final_ln_after_pool:
        return model.ln_post(weighted_mean(x[:, 1:], weight)), x[:, 1:]
    x = model.ln_post(x)
    return weighted_mean(x[:, 1:], weight), x[:, 1:]
