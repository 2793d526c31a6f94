"""The timm VisionTransformer family: its hooks for the shared engine (`patch.engine`).

Blocks are timm `Block` with `timm.layers.Attention`; the attention half mirrors timm's forward op
for op, so with no key bias the output equals timm's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.layers import Attention, AttentionPoolLatent, Mlp, PatchEmbed
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError, UnsupportedModelError
from tokenreduce.patch.attach import engine_of
from tokenreduce.patch.attention import (
    AttentionCall,
    AttentionSpec,
    attend,
    packed_heads,
    project_output,
)
from tokenreduce.patch.base import ModelAdapter, check_block_types, linear_macs
from tokenreduce.patch.calls import plain_call, run
from tokenreduce.patch.engine import check_plain_forward
from tokenreduce.patch.grids import (
    check_images,
    check_indices,
    check_pruned_rule,
    grid_tokens,
    strict_patch_embed_size,
)
from tokenreduce.patch.pooling import weighted_pool
from tokenreduce.state import AttentionOutputs

__all__ = ["TimmAdapter", "attention_forward"]


def model_name(model: nn.Module) -> str:
    """timm's name of the model: architecture.tag from its pretrained config ("" if none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") or ""
    return f"{name}.{cfg['tag']}" if name and cfg.get("tag") else name


def patch_embed_macs(patch_embed: nn.Module) -> int:
    """MACs per image of a timm PatchEmbed's convolution."""
    proj = patch_embed.proj
    kernel = proj.kernel_size[0] * proj.kernel_size[1]
    return patch_embed.num_patches * proj.out_channels * proj.in_channels * kernel


def attention_pool_facts(pool: nn.Module | None, include_prefix: bool) -> dict[str, Any]:
    """ModelDims fields of timm's attention pooling (AttentionPoolLatent), {} without one."""
    if pool is None:
        return {}
    if not isinstance(pool, AttentionPoolLatent):
        raise UnsupportedModelError(
            f"unsupported attention pool {type(pool).__name__}; supported: AttentionPoolLatent"
        )
    queries = pool.latent_len
    return dict(
        pool_macs_per_token=linear_macs(pool.kv) + 2 * queries * pool.latent_dim,
        pool_fixed_macs=queries
        * (linear_macs(pool.q) + linear_macs(pool.proj) + linear_macs(pool.mlp)),
        pool_attn_queries=queries,
        pool_include_prefix=include_prefix,
    )


def check_patch_embed(model: nn.Module) -> None:
    if not isinstance(model.patch_embed, PatchEmbed):
        raise UnsupportedModelError(
            f"unsupported patch embedding {type(model.patch_embed).__name__}; supported: "
            "timm.layers.PatchEmbed"
        )


def size_aware_pool(
    model_class: type[nn.Module], include_prefix: Callable[[nn.Module], bool]
) -> Callable:
    """The `pool` of a reducing timm model class (VisionTransformer, Eva): size-, padding- and
    mask-aware where tokens were reduced (`weighted_pool`), the class's own pool otherwise.
    include_prefix: whether the model pools its prefix tokens too."""

    def pool(self: nn.Module, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        engine = engine_of(self)
        pooled = weighted_pool(
            x,
            engine.final_state(),
            self.global_pool if pool_type is None else pool_type,
            self.num_prefix_tokens,
            include_prefix(self),
            self.attn_pool,
            engine.config.uses_prop_attn,
        )
        return model_class.pool(self, x, pool_type) if pooled is None else pooled

    return pool


Embed = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, Any]]
"""A timm family's input half: images -> (tokens entering the first block, rotary embedding of
the grid or None)."""


def reducing_forward_features(embed: Embed) -> Callable:
    """The `forward_features` of a reducing timm model class: embed, the blocks through the
    engine, the final norm."""

    def forward_features(
        self: nn.Module,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        check_plain_forward(self, attn_mask, is_causal)
        # an empty batch gives an empty output, except where timm's dynamic-size position
        # embedding reshapes it (its dense forward fails on one too)
        empty_ok = not getattr(self, "dynamic_img_size", False)
        check_images(self, x, strict_patch_embed_size(self), min_batch=0 if empty_ok else 1)
        tokens, rotary = embed(self, x)
        return self.norm(engine_of(self).run_blocks(self, tokens, rotary))

    return forward_features


def reducing_forward_intermediates(embed: Embed) -> Callable:
    """The `forward_intermediates` of a reducing timm model class: timm's arguments and outputs,
    with every requested block's output on the original token grid (`PatchGrid`: a merged token's
    feature goes to each patch it holds; a pruned patch gets the feature its token had when it
    left, or as `pruned` says: `PRUNED_RULES`). The final features stay the reduced tokens."""

    def forward_intermediates(
        self: nn.Module,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        pruned: str = "exit",
    ) -> Any:
        check_plain_forward(self, attn_mask, is_causal)
        check_pruned_rule(pruned)
        if output_fmt not in ("NCHW", "NLC"):
            raise InvalidOptionError(
                f"output_fmt={output_fmt!r} is not accepted; accepted: 'NCHW' or 'NLC'"
            )
        check_images(self, x, strict_patch_embed_size(self))
        take, max_index = feature_take_indices(
            len(self.blocks), check_indices(indices, len(self.blocks))
        )
        batch, _, height, width = x.shape
        tokens, rotary = embed(self, x)
        last = max_index if stop_early else None
        x, grids = engine_of(self).run_blocks_with_grids(self, tokens, rotary, take, last)
        rows, cols = self.patch_embed.dynamic_feat_size((height, width))
        num_prefix = self.num_prefix_tokens
        final_norm = self.norm if norm else None
        full = [grid_tokens(g, final_norm, pruned, (rows, cols), num_prefix) for g in grids]
        prefix_tokens = [y[:, :num_prefix] for y in full] if num_prefix else None
        intermediates = [y[:, num_prefix:] for y in full]
        if output_fmt == "NCHW":
            intermediates = [
                y.reshape(batch, rows, cols, -1).permute(0, 3, 1, 2).contiguous()
                for y in intermediates
            ]
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(x)
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    return forward_intermediates


def timm_grid_features(model: nn.Module, images: torch.Tensor, pruned: str) -> torch.Tensor:
    """Final normed features of every original token [B, N0, C] (prefix first) of a timm model,
    reduced (through `forward_intermediates`) or not (its `forward_features`)."""
    if engine_of(model) is None:
        return model.forward_features(images)
    result = model.forward_intermediates(
        images, indices=1, norm=True, output_fmt="NLC", intermediates_only=True, output_dict=True,
        return_prefix_tokens=True, pruned=pruned,
    )  # fmt: skip
    (patches,) = result["image_intermediates"]
    prefix = result.get("image_intermediates_prefix")
    return patches if prefix is None else torch.cat([prefix[0], patches], dim=1)


def timm_pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """forward_features then forward_head(pre_logits=True): timm's pooled features."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


class TimmAdapter(ModelAdapter):
    """timm VisionTransformer (and subclasses) with Block / Attention blocks."""

    SUPPORTED = (
        "timm VisionTransformer (and subclasses such as VisionTransformerDistilled) whose blocks "
        "are timm.models.vision_transformer.Block with timm.layers.Attention"
    )
    FAMILY = "timm"

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    @classmethod
    def check_supported(cls, model: nn.Module) -> None:
        cls.check_family(model)
        check_block_types(type(model).__name__, model.blocks, {Block: (Attention,)}, cls.SUPPORTED)
        check_patch_embed(model)

    @classmethod
    def fixed_input_size(cls, model: nn.Module) -> tuple[int, int] | None:
        return strict_patch_embed_size(model)

    @classmethod
    def describe(cls, model: nn.Module) -> ModelDims:
        cls.check_supported(model)
        attn = model.blocks[0].attn
        head_dist = getattr(model, "head_dist", nn.Identity())
        head_macs = linear_macs(model.head) + linear_macs(head_dist)
        return ModelDims(
            family=cls.FAMILY,
            depth=len(model.blocks),
            embed_dim=model.embed_dim,
            num_heads=attn.num_heads,
            head_dim=attn.head_dim,
            attn_dim=attn.attn_dim,
            num_prefix=model.num_prefix_tokens,
            num_patches=model.patch_embed.num_patches,
            has_class_token=model.cls_token is not None,
            attn_linear_macs_per_token=linear_macs(attn),
            mlp_macs_per_token=linear_macs(model.blocks[0].mlp),
            patch_embed_macs=patch_embed_macs(model.patch_embed),
            head_macs=head_macs,
            model_name=model_name(model),
            input_size=tuple(model.patch_embed.img_size),
            grid_size=tuple(model.patch_embed.grid_size),
            **attention_pool_facts(model.attn_pool, bool(model.pool_include_prefix)),
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
        return block(x)

    def attention_half(
        self, block: nn.Module, x: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, AttentionOutputs]:
        out, byproducts = attention_forward(block.attn, run(block.norm1, x), call)
        if call.probe:
            return x, byproducts
        return x + run(block.drop_path1, run(block.ls1, out)), byproducts

    def mlp_half(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = mlp_forward(block.mlp, run(block.norm2, x))
        return x + run(block.drop_path2, run(block.ls2, out))

    @classmethod
    def reducing_members(cls, model_class: type[nn.Module]) -> dict[str, Callable]:
        def embed(self: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, None]:
            x = self.patch_embed(x)
            x = self._pos_embed(x)
            x = self.patch_drop(x)
            return self.norm_pre(x), None

        return {
            "forward_features": reducing_forward_features(embed),
            "forward_intermediates": reducing_forward_intermediates(embed),
            "pool": size_aware_pool(model_class, lambda model: bool(model.pool_include_prefix)),
        }


def attention_forward(
    attn: Attention, x: torch.Tensor, call: AttentionCall
) -> tuple[torch.Tensor, AttentionOutputs]:
    """timm `Attention.forward` with an additive key bias and the by-products a method needs.

    With a ragged `call.layout`, x is the flat [M, C] real tokens; the linear layers run on them,
    q, k, v go to `attend` as flat rows (by-products come back padded, the output flat).
    """
    gate = run(attn.gate, x).sigmoid() if attn.gate is not None and not call.probe else None
    q, k, v = packed_heads(attn.qkv.weight, attn.qkv.bias, x, call, attn.head_dim)
    if q is not None:
        q, k = run(attn.q_norm, q), run(attn.k_norm, k)
    out, byproducts = attend(AttentionSpec.of_timm(attn), q, k, v, call)
    return project_output(attn, out, gate), byproducts


def mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`mlp(x)`; timm's `Mlp` runs its own forward's layers through `run`."""
    if type(mlp) is not Mlp or not plain_call(mlp):
        return run(mlp, x)
    x = run(mlp.drop1, run(mlp.act, run(mlp.fc1, x)))
    return run(mlp.drop2, run(mlp.fc2, run(mlp.norm, x)))
