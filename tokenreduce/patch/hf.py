"""Hugging Face transformers vision models: their hooks for the shared engine (`patch.engine`).

The registry imports this module the first time a transformers model is applied (a lazy
adapter), so the core never imports transformers (`pip install 'tokenreduce[hf]'`).

Served: ViT, DeiT, DINOv2, DINOv2 with registers, CLIP vision and SigLIP vision towers, as their
base models and as the wrappers around them (image classification heads, CLIP's projection),
with the "eager" and "sdpa" attention implementations. A family is described by where its parts
are (`HFFamily`); the engine is the same as for timm. Applying a method to a wrapper reduces its
base model and, where the wrapper pools patch tokens (DINOv2's classifier: class token + mean
of the patch tokens), replaces that pooling by a size-weighted one.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import to_2tuple
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.models.clip import modeling_clip as clip
from transformers.models.deit import modeling_deit as deit
from transformers.models.dinov2 import modeling_dinov2 as dinov2
from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as dinov2r
from transformers.models.siglip import modeling_siglip as siglip
from transformers.models.vit import modeling_vit as vit

from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError, UnsupportedModelError
from tokenreduce.patch.attach import engine_of
from tokenreduce.patch.attention import AttentionCall, AttentionSpec, attend, split_heads
from tokenreduce.patch.base import ModelAdapter, linear_macs
from tokenreduce.patch.calls import run
from tokenreduce.patch.engine import Engine
from tokenreduce.patch.grids import check_images
from tokenreduce.patch.pooling import pooling_weights, weighted_mean
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = ["SERVED_CLASSES", "SUPPORTED", "HFAdapter", "base_model"]


ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class HFFamily:
    """Where a transformers vision family keeps its parts (attribute names, dotted from the base
    model or the layer), and how its base model starts and ends.

    layer: the layer class; attention / norm_before / norm_after / out_proj: its parts;
    scale_before / scale_after: LayerScale modules (DINOv2) or None; residual_drop: the dropout
    (ViT, DeiT) or drop path (DINOv2) applied to each residual branch, or None; pre_norm: a norm
    before the first layer (CLIP); final_norm: the norm after the last layer; norms_all: whether
    that norm gives the output tokens (else only the pooled class token, CLIP);
    embed_options: the embedding's keyword arguments the base model's forward accepts.
    """

    layer: type[nn.Module]
    layers: str
    attention: str
    norm_before: str
    norm_after: str
    out_proj: str
    scale_before: str | None = None
    scale_after: str | None = None
    residual_drop: str | None = None
    pre_norm: str | None = None
    final_norm: str = "layernorm"
    norms_all: bool = True
    embed_options: tuple[str, ...] = ("interpolate_pos_encoding",)


VIT_LIKE = dict(
    layers="layers",
    attention="attention",
    norm_before="layernorm_before",
    norm_after="layernorm_after",
    out_proj="o_proj",
    residual_drop="dropout",
    embed_options=("bool_masked_pos", "interpolate_pos_encoding"),
)
DINOV2_LIKE = dict(
    layers="encoder.layer",
    attention="attention",
    norm_before="norm1",
    norm_after="norm2",
    out_proj="o_proj",
    scale_before="layer_scale1",
    scale_after="layer_scale2",
    residual_drop="drop_path",
    embed_options=("bool_masked_pos",),
)
CLIP_LIKE = dict(
    layers="encoder.layers",
    attention="self_attn",
    norm_before="layer_norm1",
    norm_after="layer_norm2",
    out_proj="out_proj",
    final_norm="post_layernorm",
)

FAMILIES: dict[type[nn.Module], HFFamily] = {
    vit.ViTModel: HFFamily(vit.ViTLayer, **VIT_LIKE),
    deit.DeiTModel: HFFamily(deit.DeiTLayer, **VIT_LIKE),
    dinov2.Dinov2Model: HFFamily(dinov2.Dinov2Layer, **DINOV2_LIKE),
    dinov2r.Dinov2WithRegistersModel: HFFamily(dinov2r.Dinov2WithRegistersLayer, **DINOV2_LIKE),
    clip.CLIPVisionModel: HFFamily(
        clip.CLIPEncoderLayer, pre_norm="pre_layrnorm", norms_all=False, **CLIP_LIKE
    ),
    siglip.SiglipVisionModel: HFFamily(siglip.SiglipEncoderLayer, **CLIP_LIKE),
}
"""The base models served, by class."""

WRAPPERS: dict[type[nn.Module], str] = {
    vit.ViTForImageClassification: "vit",
    deit.DeiTForImageClassification: "deit",
    deit.DeiTForImageClassificationWithTeacher: "deit",
    dinov2.Dinov2ForImageClassification: "dinov2",
    dinov2r.Dinov2WithRegistersForImageClassification: "dinov2_with_registers",
    clip.CLIPVisionModelWithProjection: "vision_model",
}
"""The wrappers served, by class: the attribute holding their base model."""

PATCH_MEAN_WRAPPERS = (
    dinov2.Dinov2ForImageClassification,
    dinov2r.Dinov2WithRegistersForImageClassification,
)
"""Wrappers whose classifier reads the class token and the mean of the patch tokens."""

SERVED_CLASSES: tuple[type[nn.Module], ...] = (*FAMILIES, *WRAPPERS)
"""Every transformers class served (`models.load("hf:PATH")` refuses others before loading)."""

SUPPORTED = (
    "Hugging Face transformers " + ", ".join(c.__name__ for c in SERVED_CLASSES)
    + f" (attention implementation {' or '.join(ATTENTION_IMPLEMENTATIONS)})"
)  # fmt: skip


def served_class(model: nn.Module) -> type[nn.Module] | None:
    """The served class the model is an instance of (a reducing subclass counts as its base)."""
    return next((cls for cls in SERVED_CLASSES if isinstance(model, cls)), None)


def base_model(model: nn.Module) -> nn.Module:
    """The base model of a served model or wrapper."""
    for cls, attr in WRAPPERS.items():
        if isinstance(model, cls):
            return getattr(model, attr)
    return model


def family_of(base: nn.Module) -> HFFamily:
    return next(family for cls, family in FAMILIES.items() if isinstance(base, cls))


def num_prefix_tokens(base: nn.Module) -> int:
    """Class token, DeiT's distillation token, registers; SigLIP has none."""
    if isinstance(base, siglip.SiglipVisionModel):
        return 0
    if isinstance(base, deit.DeiTModel):
        return 2
    return 1 + getattr(base.config, "num_register_tokens", 0)


def attention_spec(attn: nn.Module) -> AttentionSpec:
    """How a transformers attention module computes (its `scaling`/`scale`, `attention_dropout`
    /`dropout`, and the implementation in its config)."""
    scale = getattr(attn, "scaling", None) or attn.scale
    dropout = getattr(attn, "attention_dropout", None)
    if dropout is None:
        dropout = attn.dropout
    fused = attn.config._attn_implementation == "sdpa"
    return AttentionSpec(fused, scale, dropout if attn.training else 0.0, sdpa_scale=scale)


def check_output_options(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Refuse what a reduced model cannot return; whether to return a dict (`return_dict`)."""
    config = model.config
    for option in ("output_attentions", "output_hidden_states"):
        asked = kwargs.pop(option, None)
        if asked or (asked is None and getattr(config, option, False)):
            raise InvalidOptionError(
                f"{option}=True: a model with token reduction does not return per-layer "
                "attentions or hidden states (token counts change between layers); accepted: "
                f"{option}=False, tokenreduce.patch_features(model, images) for the final "
                "features on the patch grid, or tokenreduce.remove(model) first"
            )
    return_dict = kwargs.pop("return_dict", None)
    if kwargs.get("attention_mask") is not None:
        raise InvalidOptionError(
            "attention_mask is given: a model with token reduction does not accept attention "
            "masks (tokens are merged and pruned, so a mask over the input tokens no longer lines "
            "up); accepted: attention_mask=None, or tokenreduce.remove(model) first"
        )
    kwargs.pop("attention_mask", None)
    return config.return_dict if return_dict is None else return_dict


HEAD_ATTRS = ("classifier", "cls_classifier", "distillation_classifier", "visual_projection")
"""A wrapper's heads (their MACs count as the model's head)."""


def patch_projection(base: nn.Module) -> nn.Conv2d:
    """The patch embedding's convolution."""
    embeddings = base.embeddings
    if hasattr(embeddings, "patch_embeddings"):
        return embeddings.patch_embeddings.projection
    return embeddings.patch_embedding


def embed(base: nn.Module, pixel_values: torch.Tensor, options: dict[str, Any]) -> torch.Tensor:
    """The tokens entering the first layer, as the base model's forward computes them."""
    family = family_of(base)
    given = {k: options.pop(k) for k in family.embed_options if k in options}
    weight = patch_projection(base).weight
    if isinstance(base, (vit.ViTModel, deit.DeiTModel)) and pixel_values.dtype != weight.dtype:
        pixel_values = pixel_values.to(weight.dtype)  # as their forward does
    tokens = base.embeddings(pixel_values, **given)
    if family.pre_norm is not None:
        tokens = getattr(base, family.pre_norm)(tokens)
    return tokens


class HFAdapter(ModelAdapter):
    """transformers ViT, DeiT, DINOv2 (with registers), CLIP vision and SigLIP vision models."""

    SUPPORTED = SUPPORTED
    FAMILY = "transformers"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.family = family_of(base_model(model))

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return served_class(model) is not None

    @classmethod
    def check_supported(cls, model: nn.Module) -> None:
        cls.check_family(model)
        base = base_model(model)
        implementation = base.config._attn_implementation
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise UnsupportedModelError(
                f"attention implementation {implementation!r} of {type(model).__name__} is not "
                f"supported; supported: {' or '.join(map(repr, ATTENTION_IMPLEMENTATIONS))} "
                "(from_pretrained(..., attn_implementation='sdpa'))"
            )
        family = family_of(base)
        for i, layer in enumerate(cls.layers_of(base)):
            if type(layer) is not family.layer:
                raise UnsupportedModelError(
                    f"unsupported layer {i} of {type(base).__name__}: {type(layer).__name__}; "
                    f"supported: {family.layer.__name__}"
                )

    @staticmethod
    def layers_of(base: nn.Module) -> nn.ModuleList:
        return operator.attrgetter(family_of(base).layers)(base)

    @classmethod
    def fixed_input_size(cls, model: nn.Module) -> tuple[int, int] | None:
        # a family whose forward takes interpolate_pos_encoding keeps its size unless a call asks
        # (DINOv2 always interpolates)
        base = base_model(model)
        if "interpolate_pos_encoding" not in family_of(base).embed_options:
            return None
        return to_2tuple(base.config.image_size)  # describe's input_size, without describing

    @classmethod
    def describe(cls, model: nn.Module) -> ModelDims:
        cls.check_supported(model)
        base = base_model(model)
        family = family_of(base)
        config = base.config
        layer = cls.layers_of(base)[0]
        attn = getattr(layer, family.attention)
        heads = config.num_attention_heads
        head_dim = attn.head_dim
        image, patch = to_2tuple(config.image_size), to_2tuple(config.patch_size)
        grid = (image[0] // patch[0], image[1] // patch[1])
        conv = patch_projection(base)
        head_modules = [getattr(base, "pooler", None)]
        head_modules += [getattr(model, name, None) for name in HEAD_ATTRS]
        head = nn.ModuleList(m for m in head_modules if isinstance(m, nn.Module))
        pool = {}
        if isinstance(base, siglip.SiglipVisionModel) and base.use_head:
            pool = siglip_pool_facts(base.head, config.hidden_size)
        num_prefix = num_prefix_tokens(base)
        return ModelDims(
            family=cls.FAMILY,
            depth=len(cls.layers_of(base)),
            embed_dim=config.hidden_size,
            num_heads=heads,
            head_dim=head_dim,
            attn_dim=heads * head_dim,
            num_prefix=num_prefix,
            num_patches=grid[0] * grid[1],
            has_class_token=num_prefix > 0,
            attn_linear_macs_per_token=linear_macs(attn),
            mlp_macs_per_token=linear_macs(layer.mlp),
            patch_embed_macs=grid[0] * grid[1] * conv.weight.numel(),
            head_macs=linear_macs(head),
            model_name=str(getattr(config, "_name_or_path", "") or served_class(model).__name__),
            input_size=image,
            grid_size=grid,
            **pool,
        )

    @classmethod
    def pooled_features(cls, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        base = base_model(model)
        output = base(pixel_values=images)
        if isinstance(model, PATCH_MEAN_WRAPPERS):
            return patch_mean_features(model, output.last_hidden_state)
        pooled = output.pooler_output
        if isinstance(model, clip.CLIPVisionModelWithProjection):
            return model.visual_projection(pooled)
        return output.last_hidden_state[:, 0] if pooled is None else pooled

    @classmethod
    def num_classes(cls, model: nn.Module) -> int:
        classifies = any(hasattr(model, name) for name in ("classifier", "cls_classifier"))
        return model.config.num_labels if classifies else 0

    @classmethod
    def logits(cls, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if not cls.num_classes(model):
            raise UnsupportedModelError(
                f"{served_class(model).__name__} has no classifier, so it gives no class logits; "
                "accepted: a transformers *ForImageClassification model"
            )
        return model(pixel_values=images).logits

    @classmethod
    def grid_features(cls, model: nn.Module, images: torch.Tensor, pruned: str) -> torch.Tensor:
        base = base_model(model)
        engine = engine_of(base)
        if engine is None:
            return base(pixel_values=images).last_hidden_state
        family = family_of(base)
        patch = to_2tuple(base.config.patch_size)
        grid_size = (images.shape[-2] // patch[0], images.shape[-1] // patch[1])
        norm = getattr(base, family.final_norm) if family.norms_all else None
        return engine.last_grid(base, embed(base, images, {}), norm, pruned, grid_size)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return self.layers_of(base_model(model))

    def plain_block(self, block: nn.Module, x: torch.Tensor, rope: Any) -> torch.Tensor:
        return block(x, None)

    def attention_fused(self, block: nn.Module) -> bool:
        family = next(f for f in FAMILIES.values() if isinstance(block, f.layer))
        return getattr(block, family.attention).config._attn_implementation == "sdpa"

    def attention_half(
        self, block: nn.Module, x: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, AttentionOutputs]:
        family = self.family
        attn = getattr(block, family.attention)
        hidden = run(getattr(block, family.norm_before), x)
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        q, k, v = (
            split_heads(run(proj, hidden), call, attn.head_dim)[0] if wanted else None
            for proj, wanted in zip(projections, call.projections, strict=True)
        )
        out, byproducts = attend(attention_spec(attn), q, k, v, call)
        if call.probe:
            return x, byproducts
        out = run(getattr(attn, family.out_proj), out)
        return x + self.residual(block, out, family.scale_before), byproducts

    def mlp_half(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        family = self.family
        out = run(block.mlp, run(getattr(block, family.norm_after), x))
        return x + self.residual(block, out, family.scale_after)

    def residual(self, block: nn.Module, out: torch.Tensor, scale: str | None) -> torch.Tensor:
        """A residual branch after its LayerScale and dropout / drop path."""
        if scale is not None:
            out = run(getattr(block, scale), out)
        if self.family.residual_drop is not None:
            out = run(getattr(block, self.family.residual_drop), out)
        return out

    def reduced_modules(self, model: nn.Module) -> list[nn.Module]:
        """A wrapper's base model is reduced too (it runs the layers)."""
        base = base_model(model)
        return [model] if base is model else [model, base]

    @classmethod
    def reducing_members(cls, model_class: type[nn.Module]) -> dict[str, Callable]:
        if model_class in FAMILIES:
            return {"forward": base_forward}
        if model_class in PATCH_MEAN_WRAPPERS:
            return {"forward": patch_mean_forward}
        return {}


def base_forward(self: nn.Module, pixel_values: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """The reducing forward of a base model: its embedding, the layers through the engine, its
    final norm and pooling (size-aware where it pools tokens), its output class."""
    options = dict(kwargs)
    return_dict = check_output_options(self, options)
    engine = engine_of(self)
    family = family_of(self)
    interpolated = options.get("interpolate_pos_encoding")
    size = None if interpolated else HFAdapter.fixed_input_size(self)
    check_images(self, pixel_values, size, min_batch=0)
    tokens = embed(self, pixel_values, options)
    if options:
        raise InvalidOptionError(
            f"{sorted(options)}: not accepted by {type(self).__name__} with token reduction; "
            "accepted: pixel_values, return_dict and the embedding's options "
            f"({', '.join(family.embed_options)})"
        )
    hidden = engine.run_blocks(self, tokens)
    norm = getattr(self, family.final_norm)
    if family.norms_all:
        sequence = norm(hidden)
        if isinstance(self, siglip.SiglipVisionModel):
            pooled = None
            if self.use_head:
                pooled = siglip_pool(self, sequence, engine.final_state(), engine)
        elif isinstance(self, (dinov2.Dinov2Model, dinov2r.Dinov2WithRegistersModel)):
            pooled = sequence[:, 0]
        else:
            pooled = self.pooler(sequence) if self.pooler is not None else None
    else:  # CLIP: the output tokens are not normed, the pooled class token is
        sequence, pooled = hidden, norm(hidden[:, 0])
    output = BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=pooled)
    return output if return_dict else output.to_tuple()


def patch_mean_features(model: nn.Module, sequence: torch.Tensor) -> torch.Tensor:
    """DINOv2's classifier input: the class token and the size-weighted mean of the patch tokens
    (registers excluded, padding weighs 0)."""
    base = base_model(model)
    prefix = num_prefix_tokens(base)
    engine = engine_of(base)
    state = engine.final_state() if engine is not None else None
    patches = sequence[:, prefix:]
    if state is None or (state.size is None and state.mask is None):
        mean = patches.mean(dim=1)
    else:
        weight = pooling_weights(state, sequence)[:, prefix:]
        mean = weighted_mean(patches, weight)
    return torch.cat([sequence[:, 0], mean], dim=1)


def patch_mean_forward(
    self: nn.Module,
    pixel_values: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """DINOv2's image classification forward with the size-weighted patch mean."""
    return_dict = kwargs.pop("return_dict", None)
    outputs = base_model(self)(pixel_values, **kwargs)
    logits = self.classifier(patch_mean_features(self, outputs.last_hidden_state))
    loss = None if labels is None else self.loss_function(labels, logits, self.config)
    output = ImageClassifierOutput(loss=loss, logits=logits)
    use_dict = self.config.return_dict if return_dict is None else return_dict
    return output if use_dict else output.to_tuple()


def siglip_pool_facts(head: nn.Module, width: int) -> dict[str, Any]:
    """ModelDims fields of SigLIP's attention-pooling head (one probe query)."""
    return dict(
        pool_macs_per_token=2 * width * width + 2 * width,
        pool_fixed_macs=2 * width * width + linear_macs(head.mlp),
        pool_attn_queries=1,
        pool_include_prefix=True,
    )


def siglip_pool(
    base: nn.Module, sequence: torch.Tensor, state: TokenState | None, engine: Engine
) -> torch.Tensor:
    """SigLIP's attention-pooling head with log(size) as key bias (proportional attention) and
    -inf at padding, so that a merged token weighs as the patches it holds."""
    head = base.head
    bias = None if state is None else state.key_bias(engine.config.uses_prop_attn, sequence.dtype)
    if bias is None:
        return head(sequence)
    heads = head.attention.num_heads
    mask = bias.reshape(len(sequence), 1, 1, -1).expand(-1, heads, 1, -1).flatten(0, 1)
    probe = head.probe.repeat(len(sequence), 1, 1)
    pooled = head.attention(probe, sequence, sequence, attn_mask=mask)[0]
    pooled = pooled + head.mlp(head.layernorm(pooled))
    return pooled[:, 0]
