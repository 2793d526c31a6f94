"""The timm adapter: runs timm VisionTransformer blocks with a token reduction inside.

`TimmAdapter.attach` swaps the model's class for a subclass whose `forward_features` runs the
blocks through `block_forward` (attention -> reduction -> MLP) and whose `pool` weights average
pooling by token size. Blocks and parameters are not modified; `detach` restores the class, so
the model is bit-for-bit the original again. Per-forward state lives in local variables; the
record of the last forward is kept per thread.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionPoolLatent, PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from tokenreduce.errors import InvalidOptionError, NotReadyError, UnsupportedModelError
from tokenreduce.info import ReductionInfo
from tokenreduce.methods.base import BlockRecord, MethodConfig
from tokenreduce.ops.attention import (
    class_attention_row,
    masked_softmax,
    padding_bias,
    size_bias,
    softmax_dtype,
)
from tokenreduce.ops.packing import RaggedLayout
from tokenreduce.state import AttentionOutputs, ModelDims, TokenState

TRAINABLE_ATTR = "tokenreduce_thresholds"
"""Name of the submodule holding a learned method's trainable thresholds (a model attribute, so
that optimisers, DDP and state dicts see it)."""

ADAPTER_ATTR = "_tokenreduce"
"""Name of the model attribute that holds the attached adapter."""


def _model_name(model: nn.Module) -> str:
    """timm's name of the model: architecture.tag from its pretrained config ("" if none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") or ""
    return f"{name}.{cfg['tag']}" if name and cfg.get("tag") else name


def _linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def attention_forward(
    attn: Attention,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    needs: frozenset[str],
    key_mask: torch.Tensor | None = None,
    layout: RaggedLayout | None = None,
) -> tuple[torch.Tensor, AttentionOutputs]:
    """timm `Attention.forward` with an additive key bias and the by-products a method needs.

    Mirrors timm's computation op for op, so with no bias the output equals timm's. The fused path
    stays fused; the class-attention row then comes from `class_attention_row` (no N x N matrix).
    key_mask [B, N] (training of learned methods) selects the explicit masked softmax
    (docs/methods.md §2.7).
    layout: x is the flat [M, C] real tokens of a ragged batch; the linear layers run on them and
    only the attention itself runs on the padded batch (by-products are padded, output is flat).
    """
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x)
    if layout is not None:
        qkv = layout.pad(qkv)
    batch, tokens, _ = qkv.shape
    qkv = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout = attn.attn_drop.p if attn.training else 0.0

    full = None
    cls_attn = None
    fused = attn.fused_attn and "attn" not in needs and key_mask is None
    if fused:
        mask = None if bias is None else bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        if "cls_attn" in needs:
            cls_attn = class_attention_row(q, k, attn.scale, mask)
    else:
        if bias is None:
            scores = (q * attn.scale) @ k.transpose(-2, -1)
        else:  # the bias added inside the product: no extra pass over the N x N scores
            scores = torch.baddbmm(
                bias.to(q.dtype).expand(batch, attn.num_heads, 1, tokens).flatten(0, 1),
                (q * attn.scale).flatten(0, 1),
                k.transpose(-2, -1).flatten(0, 1),
            ).unflatten(0, (batch, attn.num_heads))
        if key_mask is None:
            full = scores.softmax(dim=-1)
        else:
            full = masked_softmax(scores, key_mask.to(scores.dtype))
        out = attn.attn_drop(full) @ v
        if "cls_attn" in needs:
            cls_attn = full[:, :, 0].to(softmax_dtype(full.dtype))

    out = out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim)
    if layout is not None:
        out = layout.unpad(out)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    byproducts = AttentionOutputs(
        cls_attn=cls_attn,
        key_mean=k.mean(dim=1) if "key_mean" in needs else None,
        values=v if "values" in needs else None,
        attn=full if "attn" in needs else None,
        fused=fused,
    )
    return out, byproducts


def block_forward(
    block: Block,
    x: torch.Tensor,
    state: TokenState,
    config: MethodConfig,
    step: Any,
    layout: RaggedLayout | None = None,
) -> tuple[torch.Tensor, TokenState, BlockRecord | None, bool, RaggedLayout | None]:
    """One timm `Block` with the reduction between attention and MLP.

    x is [B, N, C], or with a ragged `layout` the flat [M, C] real tokens of the padded batch
    that `state` describes. Returns tokens, state, the method's record (None where the block does
    not reduce), whether attention ran
    fused, and the layout of the returned tokens (None: [B, N, C]). A block that neither reduces
    nor needs a key bias or mask runs timm's own forward.
    """
    bias = key_bias(state, config.uses_prop_attn, x.dtype)
    if step is None and bias is None and state.mask is None:
        return block(x), state, None, bool(block.attn.fused_attn), layout
    needs = config.needs if step is not None else frozenset()
    attn_out, byproducts = attention_forward(
        block.attn, block.norm1(x), bias, needs, key_mask=state.mask, layout=layout
    )
    x = x + block.drop_path1(block.ls1(attn_out))
    record = None
    if step is not None:
        if layout is not None:
            x = layout.pad(x)
        x, state, record = config.reduce(x, state, byproducts, step)
        layout = None
        if config.ragged and state.valid is not None:
            layout = RaggedLayout(state.valid)
            x = layout.unpad(x)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, state, record, byproducts.fused, layout


def key_bias(state: TokenState, prop_attn: bool, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive attention bias over keys: log s with proportional attention (padding has s = 0),
    otherwise -inf at padding slots only; None when neither applies."""
    if prop_attn:
        return size_bias(state.size, dtype)
    return padding_bias(state.valid, dtype)


class TimmAdapter:
    """Holds a method config on a timm ViT and runs its reducing forward."""

    ATTR = ADAPTER_ATTR
    SUPPORTED = (
        "timm VisionTransformer (and subclasses such as VisionTransformerDistilled) whose blocks "
        "are timm.models.vision_transformer.Block with timm.layers.Attention"
    )

    def __init__(self, model: VisionTransformer, config: MethodConfig) -> None:
        self.dims = self.describe(model)
        config.validate(self.dims)
        self.config = config
        self.steps = tuple(config.schedule(self.dims))
        self.original_class = type(model)
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> TimmAdapter:
        clone = copy.copy(self)
        clone._local = threading.local()
        return clone

    # ---- support checks and shape facts -------------------------------------------------
    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether the model belongs to this adapter's family (checked in detail later)."""
        return isinstance(model, VisionTransformer)

    @classmethod
    def check_supported(cls, model: nn.Module) -> None:
        """UnsupportedModelError naming the first part of the model this adapter cannot run."""
        if not cls.supports(model):
            raise UnsupportedModelError(
                f"unsupported model class {type(model).__name__}; supported: {cls.SUPPORTED}"
            )
        for i, block in enumerate(model.blocks):
            if type(block) is not Block or type(block.attn) is not Attention:
                raise UnsupportedModelError(
                    f"unsupported block {i} of {type(model).__name__}: {type(block).__name__} with "
                    f"{type(getattr(block, 'attn', None)).__name__}; supported: {cls.SUPPORTED}"
                )
        if not isinstance(model.patch_embed, PatchEmbed):
            raise UnsupportedModelError(
                f"unsupported patch embedding {type(model.patch_embed).__name__}; supported: "
                "timm.layers.PatchEmbed"
            )

    @classmethod
    def describe(cls, model: VisionTransformer) -> ModelDims:
        """Shape facts and MAC coefficients of a supported timm ViT."""
        cls.check_supported(model)
        attn = model.blocks[0].attn
        proj = model.patch_embed.proj
        patch_macs = (
            proj.out_channels * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        )
        num_patches = model.patch_embed.num_patches
        head_macs = _linear_macs(model.head) + _linear_macs(
            getattr(model, "head_dist", nn.Identity())
        )
        pool = getattr(model, "attn_pool", None)
        pool_kwargs: dict[str, Any] = {}
        if isinstance(pool, AttentionPoolLatent):
            queries = pool.latent_len
            pool_kwargs = dict(
                pool_macs_per_token=_linear_macs(pool.kv) + 2 * queries * pool.latent_dim,
                pool_fixed_macs=queries
                * (_linear_macs(pool.q) + _linear_macs(pool.proj) + _linear_macs(pool.mlp)),
                pool_attn_queries=queries,
                pool_include_prefix=bool(model.pool_include_prefix),
            )
        elif pool is not None:
            raise UnsupportedModelError(
                f"unsupported attention pool {type(pool).__name__}; supported: AttentionPoolLatent"
            )
        return ModelDims(
            depth=len(model.blocks),
            embed_dim=model.embed_dim,
            num_heads=attn.num_heads,
            head_dim=attn.head_dim,
            attn_dim=attn.attn_dim,
            num_prefix=model.num_prefix_tokens,
            num_patches=num_patches,
            has_class_token=model.cls_token is not None,
            attn_linear_macs_per_token=_linear_macs(attn),
            mlp_macs_per_token=_linear_macs(model.blocks[0].mlp),
            patch_embed_macs=num_patches * patch_macs,
            head_macs=head_macs,
            model_name=_model_name(model),
            input_size=tuple(model.patch_embed.img_size),
            grid_size=tuple(model.patch_embed.grid_size),
            **pool_kwargs,
        )

    # ---- attach / detach ----------------------------------------------------------------
    def attach(self, model: VisionTransformer) -> None:
        setattr(model, self.ATTR, self)
        model.__class__ = _reducing_class(self.original_class)

    def detach(self, model: VisionTransformer) -> None:
        model.__class__ = self.original_class
        delattr(model, self.ATTR)
        if hasattr(model, TRAINABLE_ATTR):
            delattr(model, TRAINABLE_ATTR)

    # ---- forward --------------------------------------------------------------------------
    def run_blocks(self, model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
        """All blocks with their reductions; records this forward's info for this thread.

        A learned method in training mode (`model.training`) runs its soft-mask forward: every
        token stays, a key mask removes them (docs/methods.md §2.7), and the kept fraction per block
        is recorded with its gradient for the budget loss.
        """
        config = self.config
        batch = x.shape[0]
        source = None
        if config.trace_source:
            source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(batch, -1, -1)
        soft = config.learned and model.training
        mask = x.new_ones(batch, x.shape[1]) if soft else None
        state = TokenState(num_prefix=self.dims.num_prefix, source=source, mask=mask)
        steps = self.steps
        trainable = getattr(model, TRAINABLE_ATTR, None)
        if trainable is not None:
            steps = config.trainable_steps(self.steps, trainable)
        tokens_in = x.shape[1]
        counts, sizes, sources, fused, kept = [], [], [], [], []
        records: list[BlockRecord] = []
        layout = None
        for block, step in zip(model.blocks, steps, strict=True):
            x, state, record, block_fused, layout = block_forward(
                block, x, state, config, step, layout
            )
            counts.append(state.token_counts(x))
            sizes.append(state.size)
            fused.append(block_fused)
            if state.mask is not None:
                kept.append(state.mask.mean(dim=1))
            if state.source is not None:
                sources.append(state.source > 0)
            if record is not None:
                records.append(record)
        if layout is not None:
            x = layout.pad(x)
        self._local.final_state = state
        # per-image counts stay on the device (no sync); plain ints join them there
        device = next((c.device for c in counts if isinstance(c, torch.Tensor)), None)
        per_block = [torch.as_tensor(c, device=device).expand(batch) for c in counts]
        self._local.info = ReductionInfo(
            config=config,
            tokens_per_block=torch.stack(per_block, dim=1).long(),
            tokens_in=tokens_in,
            steps=self.steps,
            sizes=sizes,
            source_blk=sources if config.trace_source else None,
            fused_attention=tuple(fused),
            records=config.record_type.stack(records),
            kept_fraction=torch.stack(kept, dim=1) if kept else None,
        )
        return x

    def last_info(self) -> ReductionInfo:
        info = getattr(self._local, "info", None)
        if info is None:
            raise NotReadyError(
                "no forward pass of this reduced model has run in this thread yet; run the model "
                "first, then call last_info(model)"
            )
        return info

    def weighted_pool(
        self, model: VisionTransformer, x: torch.Tensor, pool_type: str | None
    ) -> torch.Tensor | None:
        """Pooling that accounts for token sizes, padding and training masks, or None when
        timm's own pooling is exact."""
        state = getattr(self._local, "final_state", None)
        if state is None or (state.size is None and state.mask is None):
            return None
        size = state.sizes_like(x)
        if size.shape[:2] != x.shape[:2]:
            return None
        weight = size if state.mask is None else size * state.mask.unsqueeze(-1)
        prefix = model.num_prefix_tokens
        if model.attn_pool is not None:
            if not model.pool_include_prefix:
                x, size, weight = x[:, prefix:], size[:, prefix:], weight[:, prefix:]
            mask = size_bias(size, x.dtype) if self.config.uses_prop_attn else None
            if state.valid is not None or state.mask is not None:
                padding = padding_bias(weight.detach()[..., 0] > 0, x.dtype)
                mask = padding if mask is None else mask + padding
            return model.attn_pool(x, attn_mask=mask)
        pool_type = model.global_pool if pool_type is None else pool_type
        if pool_type not in ("avg", "avgmax"):
            return None
        if not model.pool_include_prefix:
            x, weight = x[:, prefix:], weight[:, prefix:]
        mean = (x * weight).sum(dim=1) / weight.sum(dim=1)
        if pool_type == "avgmax":
            real = weight.detach() > 0
            return 0.5 * (x.masked_fill(~real, -torch.inf).amax(dim=1) + mean)
        return mean


def restore_reduced(
    cls: type[VisionTransformer], state: dict[str, Any], config: MethodConfig
) -> VisionTransformer:
    """A pickled reduced model: the original model of class `cls`, `config` applied again."""
    model = cls.__new__(cls)
    model.__setstate__(state)
    TimmAdapter(model, config).attach(model)
    return model


_REDUCING_CLASSES: dict[type, type] = {}


def _reducing_class(cls: type[VisionTransformer]) -> type[VisionTransformer]:
    """A subclass of the model's class whose blocks run through the attached adapter."""
    if cls in _REDUCING_CLASSES:
        return _REDUCING_CLASSES[cls]

    def forward_features(
        self: VisionTransformer,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise InvalidOptionError(
                f"attn_mask={'given' if attn_mask is not None else None}, is_causal={is_causal}: a "
                "model with token reduction does not accept attention masks (tokens are merged and "
                "pruned, so a mask over the input tokens no longer lines up); accepted: "
                "attn_mask=None, is_causal=False, or tokenreduce.remove(model) first"
            )
        if self.grad_checkpointing and torch.is_grad_enabled():
            raise InvalidOptionError(
                "grad_checkpointing=True is not supported by a model with token reduction; "
                "accepted: model.set_grad_checkpointing(False)"
            )
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x = getattr(self, TimmAdapter.ATTR).run_blocks(self, x)
        return self.norm(x)

    def pool(
        self: VisionTransformer, x: torch.Tensor, pool_type: str | None = None
    ) -> torch.Tensor:
        pooled = getattr(self, TimmAdapter.ATTR).weighted_pool(self, x, pool_type)
        return cls.pool(self, x, pool_type) if pooled is None else pooled

    def __reduce_ex__(self: VisionTransformer, protocol: int) -> tuple:
        # the reducing class is made at run time, so pickle (torch.save, deepcopy) stores the
        # original model and the config, and re-applies the reduction when it loads them
        adapter = getattr(self, ADAPTER_ATTR)
        state = {k: v for k, v in self.__dict__.items() if k != ADAPTER_ATTR}
        return (restore_reduced, (adapter.original_class, state, adapter.config))

    def forward_intermediates(self: VisionTransformer, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "forward_intermediates is not available on a model with token reduction (token counts "
            "change between blocks); use tokenreduce.remove(model) first"
        )

    reducing = type(
        f"TokenReduce{cls.__name__}",
        (cls,),
        {
            "forward_features": forward_features,
            "pool": pool,
            "forward_intermediates": forward_intermediates,
            "__reduce_ex__": __reduce_ex__,
            "__module__": __name__,
        },
    )
    _REDUCING_CLASSES[cls] = reducing
    return reducing


__all__ = ["TimmAdapter", "attention_forward", "block_forward"]
