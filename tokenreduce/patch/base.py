"""The family-agnostic engine: runs a model's blocks with a method's reduction inside.

`ModelAdapter` is the small interface a model family implements (the hooks below) and the
engine that every family shares: the per-block forward (attention -> reduction -> MLP), the
token state carried between blocks, per-image (ragged) execution, the record of the last forward
(`last_info`) and size-weighted pooling. A family subclass only knows its own modules: which
blocks the model has, how one block's attention and MLP halves run with an additive key bias,
its embedding and pooling, and its shape facts for FLOPs.

Blocks and parameters are never modified: `attach` swaps the model's class for a subclass whose
forward runs through the adapter, and `detach` restores the class, so the model is bit-for-bit
the original again. Per-forward state lives in local variables; the record of the last forward
is kept per thread.
"""

from __future__ import annotations

import copy
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tokenreduce.errors import InvalidOptionError, NotReadyError, UnsupportedModelError
from tokenreduce.info import ReductionInfo
from tokenreduce.methods.base import BlockRecord, MethodConfig
from tokenreduce.ops.attention import (
    attention_by_image,
    class_attention_row,
    fused_attention_by_image,
    masked_softmax,
    padding_bias,
    received_attention,
    size_bias,
    softmax_dtype,
)
from tokenreduce.ops.owners import fill_from_nearest, held_features, record_exits
from tokenreduce.ops.packing import RaggedLayout
from tokenreduce.state import AttentionOutputs, ModelDims, TokenState

TRAINABLE_ATTR = "tokenreduce_thresholds"
"""Name of the submodule holding a learned method's trainable thresholds (a model attribute, so
that optimisers, DDP and state dicts see it)."""

ADAPTER_ATTR = "_tokenreduce"
"""Name of the model attribute that holds the attached adapter."""


class PatchGrid(NamedTuple):
    """A block's output on the original token grid.

    features: [B, N0, C] (prefix first) each original token's feature: that of the token holding
    it, or, once its token left the sequence (pruned, fused), the feature it had then. held:
    [B, N0] bool, whether a token of the block's output still holds it.
    """

    features: torch.Tensor
    held: torch.Tensor


@dataclass(frozen=True)
class AttentionCall:
    """What the engine asks of one block's attention.

    bias: additive key bias [B, 1, 1, N] (log size, padding) or None. needs: the by-products the
    method asks for ("cls_attn", "key_mean", "values", "attn", "received"). key_mask: [B, N] soft
    key mask of a learned method's training forward, or None. layout: the input is the flat
    [M, C] real tokens of this ragged batch (None: [B, N, C]). rope: the family's rotary
    embedding of the current tokens, or None. valid: [B, N] real slots of a padded batch (each
    image's real tokens first), None when every slot is real.
    """

    bias: torch.Tensor | None = None
    needs: frozenset[str] = frozenset()
    key_mask: torch.Tensor | None = None
    layout: RaggedLayout | None = None
    rope: Any = None
    valid: torch.Tensor | None = None

    def counts(self, batch: int, length: int) -> list[int]:
        """Real tokens per image (of a ragged or unpadded batch)."""
        return self.layout.counts if self.layout is not None else [length] * batch


@dataclass(frozen=True)
class AttentionSpec:
    """How one attention module computes: fused (scaled_dot_product_attention) or explicit, its
    scale, its attention dropout (0 outside training) and the `scale` it passes to the fused
    kernel (None: the kernel's default, as timm does)."""

    fused: bool
    scale: float
    dropout: float = 0.0
    sdpa_scale: float | None = None

    @classmethod
    def of_timm(cls, attn: nn.Module) -> AttentionSpec:
        """A timm attention module's (`fused_attn`, `scale`, `attn_drop`, training mode)."""
        return cls(bool(attn.fused_attn), attn.scale, attn.attn_drop.p if attn.training else 0.0)


def attend(
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    call: AttentionCall,
    metric_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AttentionOutputs]:
    """Multi-head attention of q, k, v [B, H, N, d] with the call's key bias, as timm computes it.

    With a ragged `call.layout`, q, k, v (and metric_keys) may instead be the flat [M, H, d] rows
    of the real tokens: the per-image path reads each image's rows from them directly, the other
    paths pad them to the batch first. `spec` says how the model's attention module computes.
    With no bias the output equals timm's op for op. The fused path stays fused; the
    class-attention row then comes from `class_attention_row` (no N x N matrix). A key mask selects
    the explicit masked softmax (docs/methods.md §2.7). "attn" and "received" need the explicit
    path; on a CPU, for a batch of several images (ragged or unpadded) and only "received", it
    runs one image at a time (`attention_by_image`: cache-resident, no work on padding). On a
    CPU the fused kernel also runs one image at a time on the flat rows of a ragged batch
    (`fused_attention_by_image`).
    metric_keys: the keys whose head mean is the merging metric (default k; rotary families pass
    the keys before rotation).
    Returns the attention output [B, N, H * d] (with a ragged layout: the flat [M, H * d] rows of
    the real tokens) and the by-products.
    """
    flat = q.dim() == 3
    if flat:
        batch, tokens, heads = call.layout.batch, call.layout.length, q.shape[1]
    else:
        batch, heads, tokens, _ = q.shape
    dropout = spec.dropout
    bias = None if call.bias is None else call.bias.to(q.dtype)
    full = None
    cls_attn = None
    received = None
    explicit = bool({"attn", "received"} & call.needs) or call.key_mask is not None
    fused = spec.fused and not explicit
    several_on_cpu = batch > 1 and dropout == 0.0 and q.device.type == "cpu"
    by_image = (  # not on a static padded batch (masked batching): its counts would need a sync
        explicit
        and several_on_cpu
        and (call.layout is not None or call.valid is None)
        and call.key_mask is None
        and "attn" not in call.needs
    )
    fused_by_image = (  # a ragged batch: the fused kernel on each image's rows alone
        fused and several_on_cpu and flat and call.needs <= {"cls_attn", "key_mean"}
    )
    metric_keys = k if metric_keys is None else metric_keys
    if flat and not fused_by_image and not (by_image and call.needs <= {"received", "key_mean"}):
        q, k, v, metric_keys = (
            call.layout.pad(t.flatten(1)).unflatten(-1, t.shape[1:]).transpose(1, 2)
            for t in (q, k, v, metric_keys)
        )
        flat = False
    if fused_by_image:
        rows, cls_attn = fused_attention_by_image(
            q,
            k,
            v,
            bias,
            call.counts(batch, tokens),
            tokens,
            spec.sdpa_scale,
            spec.scale if "cls_attn" in call.needs else None,
        )
    elif fused:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout, scale=spec.sdpa_scale
        )
        if "cls_attn" in call.needs:
            cls_attn = class_attention_row(q, k, spec.scale, bias)
    elif by_image:
        rows, received = attention_by_image(
            q, k, v, spec.scale, bias, call.counts(batch, tokens), tokens
        )
        if "cls_attn" in call.needs:
            cls_attn = class_attention_row(q, k, spec.scale, bias)
    else:
        if bias is None:
            scores = (q * spec.scale) @ k.transpose(-2, -1)
        else:  # bias and scale inside the product: no extra pass over q or the N x N scores
            scores = torch.baddbmm(
                bias.expand(batch, heads, 1, tokens).flatten(0, 1),
                q.flatten(0, 1),
                k.transpose(-2, -1).flatten(0, 1),
                alpha=spec.scale,
            ).unflatten(0, (batch, heads))
        if call.key_mask is None:
            full = scores.softmax(dim=-1)
        else:
            full = masked_softmax(scores, call.key_mask.to(scores.dtype))
        out = (F.dropout(full, dropout) if dropout else full) @ v
        if "cls_attn" in call.needs:
            cls_attn = full[:, :, 0].to(softmax_dtype(full.dtype))
        if "received" in call.needs:
            received = received_attention(full, call.valid)
    key_mean = None
    if "key_mean" in call.needs:
        key_mean = metric_keys.mean(dim=-2 if flat else 1)
        if flat:
            key_mean = call.layout.pad(key_mean)
    byproducts = AttentionOutputs(
        cls_attn=cls_attn,
        key_mean=key_mean,
        values=v if "values" in call.needs else None,
        attn=full if "attn" in call.needs else None,
        received=received,
        fused=fused,
    )
    if by_image or fused_by_image:
        out = rows if call.layout is not None else rows.view(batch, tokens, -1)
    else:
        out = out.transpose(1, 2).reshape(batch, tokens, heads * q.shape[-1])
        if call.layout is not None:
            out = call.layout.unpad(out)
    return out, byproducts


def split_heads(
    projection: torch.Tensor, call: AttentionCall, head_dim: int, parts: int = 1
) -> list[torch.Tensor]:
    """The `parts` projections packed in `projection` (q, k, v: 3) in the layout `attend` takes:
    [B, N, parts * H * d] -> [B, H, N, d] each, or with a ragged layout the flat rows
    [M, parts * H * d] -> [M, H, d] each (views, no copies)."""
    heads = projection.unflatten(-1, (parts, -1, head_dim)).unbind(-3)
    if call.layout is not None:
        return list(heads)
    return [t.transpose(1, 2) for t in heads]


def project_output(attn: nn.Module, out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """The attention module's output half (timm Attention, EvaAttention, AttentionRope): norm,
    optional sigmoid gate, projection, dropout (on the rows `attend` returned)."""
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def grid_positions(grid_size: tuple[int, int], num_prefix: int, batch: int) -> torch.Tensor:
    """(row, column) of every token of an unreduced sequence [B, P + H * W, 2], prefix rows 0."""
    rows, cols = grid_size
    grid = torch.stack(
        torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1
    ).reshape(-1, 2)
    position = torch.cat([torch.zeros(num_prefix, 2, dtype=torch.long), grid])
    return position.to(torch.float32).expand(batch, -1, -1)


def pooling_weights(state: TokenState, x: torch.Tensor) -> torch.Tensor:
    """What each token of x [B, N, C] weighs in a pooling: [B, N, 1] in x's dtype, its size (0
    at padding), times the training mask of a learned method (masked tokens weigh 0)."""
    weight = state.sizes_like(x)
    if state.mask is not None:
        weight = weight * state.mask.unsqueeze(-1)
    return weight.to(x.dtype)


def pooling_key_bias(
    state: TokenState, size: torch.Tensor, weight: torch.Tensor, prop_attn: bool, dtype: torch.dtype
) -> torch.Tensor | None:
    """Key bias [B, 1, 1, N] of an attention pooling over tokens with these sizes and weights
    ([B, N, 1], `pooling_weights`): log(size) with proportional attention, -inf where a token
    weighs 0 (padding, masked in training); None when neither applies."""
    bias = size_bias(size, dtype) if prop_attn else None
    if state.valid is None and state.mask is None:
        return bias
    padding = padding_bias(weight.detach()[..., 0] > 0, dtype)
    return padding if bias is None else bias + padding


def weighted_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of the tokens x [B, N, C] weighted by weight [B, N, 1] (`pooling_weights`): [B, C]."""
    return (x * weight).sum(dim=1) / weight.sum(dim=1)


def check_patches_left(weight: torch.Tensor, method: str, pooling: str) -> None:
    """InvalidOptionError when an image kept no patch token for a pooling that reads only patch
    tokens (an average over nothing is NaN, a max -inf). weight: [B, N, 1] those tokens'
    `pooling_weights`. One host sync: `ModelAdapter.should_check_patches_left` says when to ask."""
    empty = (weight.detach().sum(dim=(1, 2)) <= 0).nonzero().flatten().tolist()
    if empty:
        raise InvalidOptionError(
            f"{method}: image(s) {empty} of the batch kept no patch token, and the model's "
            f"{pooling} pooling reads patch tokens only, so it has nothing to pool; accepted: "
            "method options that keep at least one patch token per image (lower prune "
            "thresholds), or a model that pools its class token"
        )


def weighted_pool(
    x: torch.Tensor,
    state: TokenState | None,
    pool_type: str,
    num_prefix: int,
    include_prefix: bool,
    attn_pool: nn.Module | None,
    prop_attn: bool,
    check_for: str | None = None,
) -> torch.Tensor | None:
    """Pooling that accounts for token sizes, padding and training masks, or None when the
    family's own pooling is exact (nothing was reduced, or a pooling that sizes do not change).

    x: final tokens [B, N, C]. attn_pool: an attention-pooling module taking `attn_mask` (timm's
    AttentionPoolLatent); it gets log(size) as key bias with proportional attention, and -inf at
    padding. Otherwise "avg" is the size-weighted mean, "max" the max over real tokens and
    "avgmax" the mean of the two. check_for: the method's name where a pooling of patch tokens
    only must first check that every image kept one (`check_patches_left`), else None.
    """
    if state is None or (state.size is None and state.mask is None):
        return None
    size = state.sizes_like(x)
    if size.shape[:2] != x.shape[:2]:
        return None
    if attn_pool is None and pool_type not in ("avg", "avgmax", "max"):
        return None
    weight = pooling_weights(state, x)
    if not include_prefix:
        x, size, weight = x[:, num_prefix:], size[:, num_prefix:], weight[:, num_prefix:]
        if check_for is not None:
            check_patches_left(weight, check_for, pool_type if attn_pool is None else "attention")
    if attn_pool is not None:
        return attn_pool(x, attn_mask=pooling_key_bias(state, size, weight, prop_attn, x.dtype))

    def real_max() -> torch.Tensor:
        return x.masked_fill(~(weight.detach() > 0), -torch.inf).amax(dim=1)

    if pool_type == "max":
        return real_max()
    mean = weighted_mean(x, weight)
    return mean if pool_type == "avg" else 0.5 * (real_max() + mean)


def linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of every nn.Linear inside `module`."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


class ModelAdapter(ABC):
    """Holds a method config on one model and runs its reducing forward.

    A model family subclasses this and provides the hooks marked abstract; `adapter_for` picks the
    family by asking each registered adapter's `supports`. The engine methods (`run_blocks`,
    `block_forward`, `last_info`) are shared by all families.
    """

    SUPPORTED: ClassVar[str]
    """What the family supports, in words (listed when a model is refused)."""

    def __init__(self, model: nn.Module, config: MethodConfig) -> None:
        self.dims = self.describe(model)
        config.validate(self.dims)
        self.config = config
        self.steps = tuple(config.schedule(self.dims))
        self.original_class = type(model)
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> ModelAdapter:
        clone = copy.copy(self)
        clone._local = threading.local()
        return clone

    # ---- family hooks: what a model family provides ----------------------------------------
    @staticmethod
    @abstractmethod
    def supports(model: nn.Module) -> bool:
        """Whether the model belongs to this family (a cheap check; details in check_supported)."""

    @classmethod
    @abstractmethod
    def check_supported(cls, model: nn.Module) -> None:
        """UnsupportedModelError naming the first part of the model this adapter cannot run."""

    @classmethod
    def check_family(cls, model: nn.Module) -> None:
        """UnsupportedModelError unless the model belongs to this family."""
        if not cls.supports(model):
            raise UnsupportedModelError(
                f"unsupported model class {type(model).__name__}; supported: {cls.SUPPORTED}"
            )

    @classmethod
    @abstractmethod
    def describe(cls, model: nn.Module) -> ModelDims:
        """Shape facts and MAC coefficients of a supported model."""

    @classmethod
    @abstractmethod
    def pooled_features(cls, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The model's pooled pre-logits features [B, D] of images [B, 3, H, W]."""

    @classmethod
    @abstractmethod
    def grid_features(cls, model: nn.Module, images: torch.Tensor, pruned: str) -> torch.Tensor:
        """Final features of every original token [B, N0, C], prefix first, of images
        [B, 3, H, W]: the model's own output tokens when unreduced (normed where the model norms
        them; transformers CLIP and open_clip towers that norm only their pooled feature do
        not), else put back on the token grid (`PatchGrid`; pruned: one of `PRUNED_RULES`)."""

    @classmethod
    def num_classes(cls, model: nn.Module) -> int:
        """How many classes `logits` scores (0: the model has no classifier)."""
        return getattr(model, "num_classes", 0)

    @classmethod
    def logits(cls, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, K] of images (for accuracy); a family whose models return something
        else overrides this, or refuses models without a classifier."""
        return model(images)

    @abstractmethod
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The model's transformer blocks, in order."""

    @abstractmethod
    def plain_block(self, block: nn.Module, x: torch.Tensor, rope: Any) -> torch.Tensor:
        """The block's own forward (used where nothing is reduced, biased or masked)."""

    @abstractmethod
    def attention_half(
        self, block: nn.Module, x: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, AttentionOutputs]:
        """x plus the block's attention residual, with the call's bias and by-products."""

    @abstractmethod
    def mlp_half(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x plus the block's MLP residual."""

    @classmethod
    @abstractmethod
    def reducing_members(cls, model_class: type[nn.Module]) -> dict[str, Callable]:
        """The methods the reducing subclass of `model_class` overrides (its forward through
        `run_blocks`, size-aware pooling, ...); they find the adapter in the model's `ATTR`."""

    def should_check_patches_left(self) -> bool:
        """Whether a pooling of patch tokens only first asks the host that every image kept one
        (`check_patches_left`, one sync per forward, in training too): only a method with
        per-image counts can remove them all (LTMP, AS-ViT); masked batching, which never syncs,
        and compiled forwards skip it (there such an image pools to NaN)."""
        config = self.config
        return (
            config.learned
            and getattr(config, "batching", None) != "masked"
            and not torch.compiler.is_compiling()
        )

    def attention_fused(self, block: nn.Module) -> bool:
        """Whether the block's attention runs through the fused kernel by default."""
        return bool(block.attn.fused_attn)

    def rotary(self, index: int, state: TokenState, rotary: Any) -> Any:
        """The rotary embedding of the current tokens at block `index`, for families whose
        forward passes `rotary` to `run_blocks`."""
        raise NotImplementedError(f"{type(self).__name__} has no rotary position embeddings")

    # ---- attach / detach ----------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        setattr(model, ADAPTER_ATTR, self)
        model.__class__ = reducing_class(self.original_class, self)

    def detach(self, model: nn.Module) -> None:
        model.__class__ = self.original_class
        delattr(model, ADAPTER_ATTR)
        if hasattr(model, TRAINABLE_ATTR):
            delattr(model, TRAINABLE_ATTR)

    # ---- the engine ---------------------------------------------------------------------------
    def block_forward(
        self,
        block: nn.Module,
        x: torch.Tensor,
        state: TokenState,
        step: Any,
        layout: RaggedLayout | None = None,
        rope: Any = None,
    ) -> tuple[torch.Tensor, TokenState, BlockRecord | None, bool, RaggedLayout | None]:
        """One block with the reduction between attention and MLP.

        x is [B, N, C], or with a ragged `layout` the flat [M, C] real tokens of the padded batch
        that `state` describes. Returns tokens, state, the method's record (None where the block
        does not reduce), whether attention ran fused, and the layout of the returned tokens
        (None: [B, N, C]). A block that neither reduces nor needs a key bias or mask runs the
        block's own forward.
        """
        config = self.config
        bias = state.key_bias(config.uses_prop_attn, x.dtype)
        if step is None and bias is None and state.mask is None:
            fused = self.attention_fused(block)
            return self.plain_block(block, x, rope), state, None, fused, layout
        needs = config.needs if step is not None else frozenset()
        call = AttentionCall(
            bias=bias, needs=needs, key_mask=state.mask, layout=layout, rope=rope, valid=state.valid
        )
        x, byproducts = self.attention_half(block, x, call)
        record = None
        if step is not None:
            if layout is not None:
                x = layout.pad(x)
            before = state
            x_in = x
            x, state, record = config.reduce(x_in, before, byproducts, step)
            if before.owner is not None:
                exited = record_exits(x_in, before.owner, state.owner, before.exited)
                state = replace(state, exited=exited)
            layout = None
            if config.ragged and state.valid is not None:
                layout = RaggedLayout(state.valid)
                x = layout.unpad(x)
        return self.mlp_half(block, x), state, record, byproducts.fused, layout

    def run_blocks(self, model: nn.Module, x: torch.Tensor, rotary: Any = None) -> torch.Tensor:
        """All blocks with their reductions; records this forward's info for this thread.
        See `run_blocks_with_grids` for the arguments."""
        return self.run_blocks_with_grids(model, x, rotary)[0]

    def run_blocks_with_grids(
        self,
        model: nn.Module,
        x: torch.Tensor,
        rotary: Any = None,
        grid_blocks: Sequence[int] = (),
        last_block: int | None = None,
    ) -> tuple[torch.Tensor, list[PatchGrid]]:
        """The blocks with their reductions, and the outputs of `grid_blocks` put back on the
        original token grid; records this forward's info for this thread.

        rotary: for a family with rotary position embeddings, its embedding of this input's
        unreduced grid (with a `grid_size` (rows, columns)); each token then carries its position
        and `rotary(index, state, rotary)` gives the embedding per block. None otherwise.
        A learned method in training mode (`model.training`) runs its soft-mask forward: every
        token stays, a key mask removes them (docs/methods.md §2.7), and the kept fraction per
        block is recorded with its gradient for the budget loss.
        grid_blocks: indices of the blocks whose outputs come back as `PatchGrid`s (each original
        token gets the feature of the token holding it, or the one it had when its token left;
        `ops.owners`). last_block: stop after this block (None: run every block).
        Returns the last block's output tokens and the grids in block order.
        """
        config = self.config
        batch = x.shape[0]
        soft = config.learned and model.training
        if grid_blocks and soft:
            raise InvalidOptionError(
                f"{config.name}: patch grids are not available in the soft-mask training forward "
                "(model.train()); accepted: model.eval()"
            )
        source = None
        if config.trace_source:
            source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(batch, -1, -1)
        position = None
        if rotary is not None:
            position = grid_positions(rotary.grid_size, self.dims.num_prefix, batch).to(
                device=x.device, dtype=torch.promote_types(x.dtype, torch.float32)
            )
        self._local.initial_position = position
        owner = None
        if grid_blocks:
            owner = torch.arange(x.shape[1], device=x.device).expand(batch, -1)
        state = TokenState(
            num_prefix=self.dims.num_prefix,
            source=source,
            mask=x.new_ones(batch, x.shape[1]) if soft else None,
            position=position,
            position_rule=config.rope_position,
            owner=owner,
        )
        steps = self.steps
        trainable = getattr(model, TRAINABLE_ATTR, None)
        if trainable is not None:
            steps = config.trainable_steps(self.steps, trainable)
        if last_block is not None:
            steps = steps[: last_block + 1]
        tokens_in = x.shape[1]
        counts, sizes, sources, fused, kept = [], [], [], [], []
        records: list[BlockRecord] = []
        grids: dict[int, PatchGrid] = {}
        layout = None
        blocks = list(self.blocks(model))[: len(steps)]  # slicing a ModuleList builds a new one
        for index, (block, step) in enumerate(zip(blocks, steps, strict=True)):
            rope = None if rotary is None else self.rotary(index, state, rotary)
            x, state, record, block_fused, layout = self.block_forward(
                block, x, state, step, layout, rope
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
            if index in grid_blocks:
                tokens = x if layout is None else layout.pad(x)
                grids[index] = PatchGrid(*held_features(tokens, state.owner, state.exited))
        if layout is not None:
            x = layout.pad(x)
        self._local.final_state = state
        device = next((c.device for c in counts if isinstance(c, torch.Tensor)), None)
        if device is None:  # every block kept a count shared by the batch: one small tensor
            tokens_per_block = torch.tensor([counts] * batch, dtype=torch.long).view(
                batch, len(counts)
            )
        else:  # per-image counts stay on the device (no sync); plain ints join them there
            per_block = [torch.as_tensor(c, device=device).expand(batch) for c in counts]
            tokens_per_block = torch.stack(per_block, dim=1).long()
        self._local.info = ReductionInfo(
            config=config,
            tokens_per_block=tokens_per_block,
            tokens_in=tokens_in,
            steps=self.steps[: len(steps)],
            sizes=sizes,
            source_blk=sources if config.trace_source else None,
            fused_attention=tuple(fused),
            records=config.record_type.stack(records),
            kept_fraction=torch.stack(kept, dim=1) if kept else None,
        )
        return x, [grids[index] for index in sorted(grids)]

    def last_grid(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        norm: nn.Module | None,
        pruned: str,
        grid_size: tuple[int, int],
        rotary: Any = None,
    ) -> torch.Tensor:
        """The blocks on `tokens` (entering the first block), and the last block's output on the
        original token grid [B, N0, C] through `norm` (see `grid_tokens`): what a family's
        `grid_features` returns for a reduced model."""
        _, (grid,) = self.run_blocks_with_grids(model, tokens, rotary, [self.dims.depth - 1])
        return grid_tokens(grid, norm, pruned, grid_size, self.dims.num_prefix)

    def final_state(self) -> TokenState | None:
        """The token state after the last block of this thread's last forward."""
        return getattr(self._local, "final_state", None)

    def last_info(self) -> ReductionInfo:
        info = getattr(self._local, "info", None)
        if info is None:
            raise NotReadyError(
                "no forward pass of this reduced model has run in this thread yet; run the model "
                "first, then call last_info(model)"
            )
        return info


def restore_reduced(
    cls: type[nn.Module],
    state: dict[str, Any],
    config: MethodConfig,
    adapter_class: type[ModelAdapter],
) -> nn.Module:
    """A pickled reduced model: the original model of class `cls`, `config` applied again."""
    model = cls.__new__(cls)
    model.__setstate__(state)
    adapter_class(model, config).attach(model)
    return model


def _reduce_ex(self: nn.Module, protocol: int) -> tuple:
    # the reducing class is made at run time, so pickle (torch.save, deepcopy) stores the
    # original model and the config, and re-applies the reduction when it loads them
    # (the original class is the reducing class's base: an adapter may reduce a submodule too)
    adapter = getattr(self, ADAPTER_ATTR)
    state = {k: v for k, v in self.__dict__.items() if k != ADAPTER_ATTR}
    original = type(self).__bases__[0]
    return (restore_reduced, (original, state, adapter.config, type(adapter)))


_REDUCING_CLASSES: dict[tuple[type, type], type] = {}


def reducing_class(cls: type[nn.Module], adapter: ModelAdapter) -> type[nn.Module]:
    """A subclass of the model's class with the adapter's reducing members (made once per class)."""
    key = (cls, type(adapter))
    if key not in _REDUCING_CLASSES:
        members = {**adapter.reducing_members(cls), "__reduce_ex__": _reduce_ex}
        members["__module__"] = __name__
        _REDUCING_CLASSES[key] = type(f"TokenReduce{cls.__name__}", (cls,), members)
    return _REDUCING_CLASSES[key]


def check_block_types(
    model_name: str, blocks: Sequence[nn.Module], accepted: dict[type, tuple[type, ...]], what: str
) -> None:
    """UnsupportedModelError unless every block is one of `accepted` (block class -> attention
    classes), naming the first block that is not."""
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if type(attn) not in accepted.get(type(block), ()):
            raise UnsupportedModelError(
                f"unsupported block {i} of {model_name}: {type(block).__name__} with "
                f"{type(attn).__name__}; supported: {what}"
            )


__all__ = [
    "ADAPTER_ATTR",
    "TRAINABLE_ATTR",
    "AttentionCall",
    "ModelAdapter",
    "attend",
    "check_patches_left",
    "pooling_key_bias",
    "pooling_weights",
    "project_output",
    "weighted_mean",
    "weighted_pool",
]


def check_plain_forward(model: nn.Module, attn_mask: Any, is_causal: bool) -> None:
    """InvalidOptionError for forward arguments a reduced model cannot honour."""
    if attn_mask is not None or is_causal:
        raise InvalidOptionError(
            f"attn_mask={'given' if attn_mask is not None else None}, is_causal={is_causal}: a "
            "model with token reduction does not accept attention masks (tokens are merged and "
            "pruned, so a mask over the input tokens no longer lines up); accepted: "
            "attn_mask=None, is_causal=False, or tokenreduce.remove(model) first"
        )
    if getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled():
        raise InvalidOptionError(
            "grad_checkpointing=True is not supported by a model with token reduction; "
            "accepted: model.set_grad_checkpointing(False)"
        )


PRUNED_RULES = ("exit", "zero", "nearest")
"""What a patch grid gives the original tokens whose token left the sequence: "exit", the
feature it had then (through the final norm when the grid is normed); "zero"; or "nearest", the
feature of the nearest patch on the grid that a token still holds (docs/methods.md §1.8)."""


def check_pruned_rule(pruned: object) -> None:
    if pruned not in PRUNED_RULES:
        raise InvalidOptionError(
            f"pruned={pruned!r} is not accepted; accepted: {' or '.join(map(repr, PRUNED_RULES))}"
        )


def grid_tokens(
    grid: PatchGrid,
    norm: nn.Module | None,
    pruned: str,
    grid_size: tuple[int, int],
    num_prefix: int,
) -> torch.Tensor:
    """The [B, N0, C] features of a `PatchGrid` (prefix first, then the `grid_size` patches row by
    row), through `norm` when given, the tokens no longer held as `pruned` says."""
    features = grid.features if norm is None else norm(grid.features)
    if pruned == "zero":
        return features.masked_fill(~grid.held.unsqueeze(-1), 0.0)
    if pruned == "nearest":
        return fill_from_nearest(features, grid.held, grid_size, num_prefix)
    return features
