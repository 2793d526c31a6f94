"""The same weights in two model families: timm ViTs <-> Hugging Face transformers models.

`to_transformers(model)` turns a timm VisionTransformer into the transformers model with the
same computation: one with LayerScale (DINOv2-style) into a `Dinov2Model`, a distilled DeiT
(class + distillation tokens, two heads) into a `DeiTForImageClassificationWithTeacher`.
`from_transformers(model)` is the inverse. Both copy every weight exactly (timm's fused qkv
projection is split into, or joined from, transformers' q/k/v projections).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from timm.layers import LayerScale
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tokenreduce.api import describe
from tokenreduce.errors import MissingFileError, UnsupportedModelError

__all__ = ["DEIT_BLOCK", "DINOV2_BLOCK", "from_transformers", "to_transformers"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise MissingFileError(
            "converting to or from Hugging Face transformers needs the 'hf' extra: "
            "pip install 'tokenreduce[hf]'"
        ) from err
    return transformers


def _block_pairs(depth: int, hf_layers: str, names: dict[str, str]) -> list[tuple[str, str]]:
    """(timm key, transformers key) of every block weight except the fused qkv."""
    pairs = []
    for i in range(depth):
        for timm_part, hf_part in names.items():
            for leaf in ("weight", "bias"):
                pairs.append(
                    (f"blocks.{i}.{timm_part}.{leaf}", f"{hf_layers}.{i}.{hf_part}.{leaf}")
                )
    return pairs


DINOV2_BLOCK = {
    "norm1": "norm1",
    "attn.proj": "attention.o_proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
DEIT_BLOCK = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.o_proj",
    "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _layout(distilled: bool) -> dict[str, Any]:
    """Key names of the two families for a DINOv2-style or a distilled DeiT model."""
    if distilled:
        return dict(
            prefix="deit.",
            layers="deit.layers",
            block=DEIT_BLOCK,
            attention="attention",
            embeddings={
                "cls_token": "deit.embeddings.cls_token",
                "dist_token": "deit.embeddings.distillation_token",
                "pos_embed": "deit.embeddings.position_embeddings",
                "patch_embed.proj.weight": "deit.embeddings.patch_embeddings.projection.weight",
                "patch_embed.proj.bias": "deit.embeddings.patch_embeddings.projection.bias",
                "norm.weight": "deit.layernorm.weight",
                "norm.bias": "deit.layernorm.bias",
                "head.weight": "cls_classifier.weight",
                "head.bias": "cls_classifier.bias",
                "head_dist.weight": "distillation_classifier.weight",
                "head_dist.bias": "distillation_classifier.bias",
            },
        )
    return dict(
        prefix="",
        layers="encoder.layer",
        block=DINOV2_BLOCK,
        attention="attention",
        embeddings={
            "cls_token": "embeddings.cls_token",
            "pos_embed": "embeddings.position_embeddings",
            "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
            "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
            "norm.weight": "layernorm.weight",
            "norm.bias": "layernorm.bias",
        },
    )


def _check_timm(model: nn.Module) -> bool:
    """Whether the timm model is a distilled DeiT (else DINOv2-style); refuses the others."""
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"to_transformers takes a timm VisionTransformer, got {type(model).__name__}"
        )
    distilled = isinstance(model, VisionTransformerDistilled)
    block = model.blocks[0]
    layer_scale = isinstance(block.ls1, LayerScale)
    extras = [
        name
        for name, module in (
            ("q/k norm", block.attn.q_norm),
            ("attention norm", block.attn.norm),
            ("MLP norm", block.mlp.norm),
            ("pre-norm", model.norm_pre),
        )
        if not isinstance(module, nn.Identity)
    ]
    if type(block.mlp.act) is not nn.GELU or block.mlp.act.approximate != "none":
        extras.append(f"activation {block.mlp.act}")
    if model.no_embed_class:
        extras.append("no_embed_class (position embedding without the class entry)")
    if extras:
        raise UnsupportedModelError(
            f"to_transformers: {type(model).__name__} has parts transformers' Dinov2/DeiT have "
            f"no counterpart for: {', '.join(extras)}"
        )
    if distilled == layer_scale or model.reg_token is not None or model.attn_pool is not None:
        raise UnsupportedModelError(
            f"to_transformers converts a DINOv2-style timm ViT (class token, LayerScale, no "
            f"registers) or a distilled DeiT; {type(model).__name__} with LayerScale="
            f"{layer_scale}, registers={model.reg_token is not None} is neither"
        )
    return distilled


def to_transformers(model: nn.Module, attn_implementation: str = "sdpa") -> nn.Module:
    """The timm ViT `model` as a transformers model with the same weights (eval mode).

    A DINOv2-style ViT (class token, LayerScale) becomes a `Dinov2Model`, or with a classifier
    on its class token (global_pool "token") a `Dinov2ForImageClassification` whose classifier
    gives the same logits (it reads the class token and the patch mean: the mean's half of its
    weight is zero); a distilled DeiT a `DeiTForImageClassificationWithTeacher`.
    attn_implementation: "sdpa" or "eager".
    """
    transformers = _transformers()
    distilled = _check_timm(model)
    block = model.blocks[0]
    width = model.embed_dim
    common = dict(
        hidden_size=width,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=block.attn.num_heads,
        image_size=model.patch_embed.img_size[0],
        patch_size=model.patch_embed.patch_size[0],
        layer_norm_eps=block.norm1.eps,
        hidden_act="gelu",
        qkv_bias=block.attn.qkv.bias is not None,
    )
    if distilled:
        config = transformers.DeiTConfig(
            intermediate_size=block.mlp.fc1.out_features, num_labels=model.num_classes, **common
        )
        target = transformers.DeiTForImageClassificationWithTeacher(config)
    else:
        hidden = block.mlp.fc1.out_features
        if hidden % width:
            raise UnsupportedModelError(
                f"to_transformers: MLP width {hidden} is not a multiple of the embedding width "
                f"{width} (transformers' Dinov2Config takes an integer mlp_ratio)"
            )
        classifies = model.num_classes > 0
        if classifies and (
            model.global_pool != "token" or not isinstance(model.fc_norm, nn.Identity)
        ):
            raise UnsupportedModelError(
                f"to_transformers: a classifier on global_pool={model.global_pool!r} has no "
                "counterpart in transformers' Dinov2ForImageClassification; accepted: a "
                "classifier on the class token (global_pool='token'), or none (num_classes=0)"
            )
        config = transformers.Dinov2Config(
            mlp_ratio=hidden // width,
            layerscale_value=1.0,
            num_labels=max(model.num_classes, 1),
            **common,
        )
        target = (
            transformers.Dinov2ForImageClassification(config)
            if classifies
            else transformers.Dinov2Model(config)
        )
    config._attn_implementation = attn_implementation
    # the same model: threshold files trained for the timm model apply to it as they are
    config._name_or_path = describe(model).model_name
    state = model.state_dict()
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    layout = _layout(distilled)
    converted = {hf: take(timm) for timm, hf in layout["embeddings"].items() if timm in state}
    for timm_key, hf_key in _block_pairs(len(model.blocks), layout["layers"], layout["block"]):
        converted[hf_key] = take(timm_key)
    for i in range(len(model.blocks)):
        attention = f"{layout['layers']}.{i}.{layout['attention']}"
        for leaf in ("weight", "bias")[: 2 if common["qkv_bias"] else 1]:
            q, k, v = take(f"blocks.{i}.attn.qkv.{leaf}").chunk(3)
            converted |= {
                f"{attention}.q_proj.{leaf}": q,
                f"{attention}.k_proj.{leaf}": k,
                f"{attention}.v_proj.{leaf}": v,
            }
        if not distilled:
            converted[f"{layout['layers']}.{i}.layer_scale1.lambda1"] = take(
                f"blocks.{i}.ls1.gamma"
            )
            converted[f"{layout['layers']}.{i}.layer_scale2.lambda1"] = take(
                f"blocks.{i}.ls2.gamma"
            )
    if not distilled and model.num_classes > 0:
        weight = take("head.weight")
        converted = {f"dinov2.{key}": value for key, value in converted.items()}
        converted["classifier.weight"] = torch.cat([weight, torch.zeros_like(weight)], dim=1)
        converted["classifier.bias"] = take("head.bias")
    unused = sorted(set(state) - used)
    if unused:
        raise UnsupportedModelError(
            f"to_transformers: timm weights without a counterpart: {unused}"
        )
    result = target.load_state_dict(converted, strict=False)
    pretraining_only = {"embeddings.mask_token", "dinov2.embeddings.mask_token"}
    missing = set(result.missing_keys) - pretraining_only
    if missing or result.unexpected_keys:
        raise UnsupportedModelError(
            f"to_transformers: weights without a counterpart: {sorted(missing)} "
            f"{sorted(result.unexpected_keys)}"
        )
    return target.to(next(model.parameters()).dtype).eval()


def from_transformers(model: nn.Module) -> nn.Module:
    """A transformers `Dinov2Model` or `DeiTForImageClassificationWithTeacher` as the timm ViT
    with the same weights (eval mode; the inverse of `to_transformers`)."""
    transformers = _transformers()
    distilled = isinstance(model, transformers.DeiTForImageClassificationWithTeacher)
    if not distilled and type(model) is not transformers.Dinov2Model:
        raise UnsupportedModelError(
            "from_transformers takes a transformers Dinov2Model or "
            f"DeiTForImageClassificationWithTeacher, got {type(model).__name__}"
        )
    config = model.config
    if getattr(config, "use_swiglu_ffn", False) or config.hidden_act != "gelu":
        raise UnsupportedModelError(
            "from_transformers converts GELU MLPs only (use_swiglu_ffn=False, hidden_act='gelu')"
        )
    norm = functools.partial(nn.LayerNorm, eps=config.layer_norm_eps)
    mlp = config.intermediate_size if distilled else int(config.hidden_size * config.mlp_ratio)
    common = dict(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=mlp / config.hidden_size,
        qkv_bias=config.qkv_bias,
        norm_layer=norm,
    )
    if distilled:
        target = VisionTransformerDistilled(num_classes=config.num_labels, **common)
    else:
        target = VisionTransformer(num_classes=0, init_values=1.0, **common)
    state = model.state_dict()
    layout = _layout(distilled)
    converted = {timm: state[hf] for timm, hf in layout["embeddings"].items() if hf in state}
    for timm_key, hf_key in _block_pairs(
        config.num_hidden_layers, layout["layers"], layout["block"]
    ):
        converted[timm_key] = state[hf_key]
    for i in range(config.num_hidden_layers):
        attention = f"{layout['layers']}.{i}.{layout['attention']}"
        for leaf in ("weight", "bias")[: 2 if config.qkv_bias else 1]:
            converted[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(
                [state[f"{attention}.{p}_proj.{leaf}"] for p in "qkv"]
            )
        if not distilled:
            converted[f"blocks.{i}.ls1.gamma"] = state[
                f"{layout['layers']}.{i}.layer_scale1.lambda1"
            ]
            converted[f"blocks.{i}.ls2.gamma"] = state[
                f"{layout['layers']}.{i}.layer_scale2.lambda1"
            ]
    target.load_state_dict(converted, strict=True)
    return target.to(next(model.parameters()).dtype).eval()
