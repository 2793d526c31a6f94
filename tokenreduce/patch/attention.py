"""Attention as the engine runs it: what a block's attention is asked for (`AttentionCall`), how
a family's attention module computes (`AttentionSpec`), and `attend`, which computes it as timm
does and returns the by-products a method needs — fused where it can, explicit where a by-product
needs the attention matrix, one image at a time on the CPU where that is faster.

On CUDA `attend` takes the GPU path: no per-image loops, and a key bias (proportional
attention, padding) carried into the fused kernel as an extra head dimension rather than as a
mask, which would leave the flash kernel. `gpu_path()` makes it take the same choices on any
device, so that the CPU tests check the code the GPU runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenreduce.ops.attention import (
    PooledAttention,
    attention_by_image,
    class_attention_row,
    fused_attention_by_image,
    fused_attention_with_key_bias,
    masked_softmax,
    policy_softmax,
    received_attention,
    softmax_dtype,
    softmax_in_place,
    sparsify_attention,
)
from tokenreduce.ops.packing import RaggedLayout
from tokenreduce.patch.calls import run
from tokenreduce.state import AttentionOutputs

__all__ = [
    "AttentionCall",
    "AttentionSpec",
    "attend",
    "gpu_path",
    "packed_heads",
    "packed_rows",
    "project_output",
    "split_heads",
]

_gpu_path_on_every_device = False


@contextlib.contextmanager
def gpu_path() -> Iterator[None]:
    """Within it, attention takes the choices of the CUDA path on every device (no per-image
    loops; the key bias as a head dimension of the fused kernel)."""
    global _gpu_path_on_every_device
    previous, _gpu_path_on_every_device = _gpu_path_on_every_device, True
    try:
        yield
    finally:
        _gpu_path_on_every_device = previous


@dataclass(frozen=True)
class AttentionCall:
    """What the engine asks of one block's attention.

    bias: additive key bias [B, 1, 1, N] (log size, padding) or None. needs: the by-products the
    method asks for ("cls_attn", "key_mean", "values", "attn", "received"). key_mask: [B, N] soft
    key mask of a training forward (a learned method's, DiffRate's search), or None.
    key_mask_softmax: how the mask enters the softmax, the method's `MethodConfig.key_mask_softmax`
    ("masked": `ops.attention.masked_softmax`, LTMP and AS-ViT; "policy":
    `ops.attention.policy_softmax`, DiffRate). layout: the input is the flat
    [M, C] real tokens of this ragged batch (None: [B, N, C]). rope: the family's rotary
    embedding of the current tokens, or None. valid: [B, N] real slots of a padded batch (each
    image's real tokens first), None when every slot is real. sparsity: keep only the
    largest fraction `sparsity` of each head's softmax probabilities, zero the rest
    (`ops.attention.sparsify_attention`, GTP's attention sparsification; explicit path); None
    leaves the attention as it is. probs: [B, H, N, N] attention probabilities to use instead
    of the softmax of the scores (which are then not computed; MCTF's fused attention, also as
    a `PooledAttention`), or None. probe: compute only the by-products, not the attention
    output (the adapter's attention half then returns its input unchanged).
    """

    bias: torch.Tensor | None = None
    needs: frozenset[str] = frozenset()
    key_mask: torch.Tensor | None = None
    key_mask_softmax: str = "masked"
    layout: RaggedLayout | None = None
    rope: Any = None
    valid: torch.Tensor | None = None
    sparsity: float | None = None
    probs: torch.Tensor | PooledAttention | None = None
    probe: bool = False

    @property
    def counts_on_host(self) -> bool:
        """Whether each image's real-token count is known without asking the device: a ragged
        layout holds them, and an unpadded batch has one count. A padded batch without a layout
        (packed or masked batching) would need a sync to learn them."""
        return self.layout is not None or self.valid is None

    @property
    def projections(self) -> tuple[bool, bool, bool]:
        """Which of q, k, v the attention reads: v alone with given probabilities, q and k for a
        probe (v too where the method reads the values), else all three."""
        if self.probs is not None:
            return (False, False, True)
        if self.probe:
            return (True, True, "values" in self.needs)
        return (True, True, True)

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
    the explicit masked softmax (docs/methods.md §2.7; DiffRate's policy softmax, §3.9), a
    `sparsity` the explicit path with the probabilities sparsified before they weight the values.
    "attn" and "received" need the explicit path; on a CPU, for a batch of several images
    (ragged or unpadded) and only "received", it runs one image at a time (`attention_by_image`:
    cache-resident, no work on padding). On a CPU the fused kernel also runs one image at a time
    on the flat rows of a ragged batch (`fused_attention_by_image`). On the GPU path (CUDA, or
    within `gpu_path()`) neither loop runs, and a key bias enters the fused kernel as a head
    dimension (`fused_attention_with_key_bias`).
    metric_keys: the keys whose head mean is the merging metric (default k; rotary families pass
    the keys before rotation).
    With `call.probs` the output is probs @ v (no scores, no by-products); with `call.probe` the
    explicit path computes the by-products only.
    Returns the attention output [B, N, H * d] (with a ragged layout: the flat [M, H * d] rows of
    the real tokens; None for a probe) and the by-products.
    """
    dropout = spec.dropout
    if call.probs is not None:
        return attend_given(call.probs, v, call, dropout), AttentionOutputs(fused=False)
    flat = q.dim() == 3
    if flat:
        batch, tokens, heads = call.layout.batch, call.layout.length, q.shape[1]
    else:
        batch, heads, tokens, _ = q.shape
    bias = call.bias
    if bias is not None and bias.dtype != q.dtype:  # autocast: q in the lower precision
        bias = bias.to(q.dtype)
    full = None
    cls_attn = None
    received = None
    explicit = (
        bool({"attn", "received"} & call.needs)
        or call.key_mask is not None
        or call.sparsity is not None
        or call.probe
    )
    fused = spec.fused and not explicit
    gpu = _gpu_path_on_every_device or q.device.type == "cuda"
    several_on_cpu = batch > 1 and dropout == 0.0 and not gpu
    by_image = (
        explicit
        and not call.probe
        and several_on_cpu
        and call.counts_on_host
        and call.key_mask is None
        and call.sparsity is None
        and "attn" not in call.needs
    )
    fused_by_image = (  # a ragged batch: the fused kernel on each image's rows alone
        fused and several_on_cpu and flat and call.needs <= {"cls_attn", "key_mean", "values"}
    )
    metric_keys = k if metric_keys is None else metric_keys
    if flat and not fused_by_image and not (by_image and call.needs <= {"received", "key_mean"}):
        # (None: a projection this call does not read)
        q, k, v, metric_keys = (
            None if t is None else padded_heads(t, call.layout) for t in (q, k, v, metric_keys)
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
        if gpu and bias is not None:
            out = fused_attention_with_key_bias(q, k, v, bias, spec.scale, dropout)
        else:
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
        if bias is None:  # timm's own expression: the same bits as the model's attention
            scores = (q * spec.scale) @ k.transpose(-2, -1)
        else:  # bias and scale inside the product: no extra pass over q or the N x N scores
            # the keys' heads copied row by row and read transposed by the product: a
            # transposing copy of strided heads costs a third more
            keys = k.flatten(0, 1).transpose(-2, -1)
            bias_rows = bias.expand(batch, heads, 1, tokens).flatten(0, 1)
            scores = torch.baddbmm(bias_rows, q.flatten(0, 1), keys, alpha=spec.scale)
            scores = scores.unflatten(0, (batch, heads))
        if call.key_mask is None:
            full = softmax_in_place(scores)
        elif call.key_mask_softmax == "policy":
            full = policy_softmax(scores, call.key_mask.to(scores.dtype))
        else:
            full = masked_softmax(scores, call.key_mask.to(scores.dtype))
        if call.sparsity is not None:
            full = sparsify_attention(full, call.sparsity, in_place=True)
        out = None if call.probe else (F.dropout(full, dropout) if dropout else full) @ v
        if "cls_attn" in call.needs:
            cls_attn = full[:, :, 0].to(softmax_dtype(full.dtype))
        if "received" in call.needs:
            received = received_attention(full, call.valid)
    key_mean = None
    if "key_mean" in call.needs:
        key_mean = metric_keys.mean(dim=-2 if flat else 1)
        if flat:
            key_mean = call.layout.pad(key_mean)
    values = None
    if "values" in call.needs:
        values = v
        if flat:  # the method reads them per image: [B, H, N, d] like the rest of its inputs
            values = padded_heads(v, call.layout)
    byproducts = AttentionOutputs(
        cls_attn=cls_attn,
        key_mean=key_mean,
        values=values,
        attn=full if "attn" in call.needs else None,
        received=received,
        fused=fused,
    )
    if call.probe:
        return None, byproducts
    if by_image or fused_by_image:
        out = rows if call.layout is not None else rows.view(batch, tokens, -1)
    else:
        out = out.transpose(1, 2).reshape(batch, tokens, heads * q.shape[-1])
        if call.layout is not None:
            out = call.layout.unpad(out)
    return out, byproducts


def attend_given(
    probs: torch.Tensor | PooledAttention, v: torch.Tensor, call: AttentionCall, dropout: float
) -> torch.Tensor:
    """Attention output [B, N, H * d] (ragged: flat [M, H * d] rows) of given probabilities
    probs [B, H, N, N] (or pooled ones, applied without forming them unless dropout acts on
    them) and values v [B, H, N, d] (ragged: flat [M, H, d] rows)."""
    if v.dim() == 3:
        v = padded_heads(v, call.layout)
    if isinstance(probs, PooledAttention) and not dropout:
        out = probs.attend(v)
    else:
        if isinstance(probs, PooledAttention):  # dropout acts on the pooled probabilities
            probs = probs.materialized()
        out = (F.dropout(probs, dropout) if dropout else probs) @ v
    batch, heads, tokens, head_dim = v.shape
    out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    return out if call.layout is None else call.layout.unpad(out)


def padded_heads(rows: torch.Tensor, layout: RaggedLayout) -> torch.Tensor:
    """The flat [M, H, d] rows of a ragged batch's real tokens as [B, H, N, d], padded."""
    return layout.pad(rows.flatten(1)).unflatten(-1, rows.shape[1:]).transpose(1, 2)


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


def packed_rows(
    weight: torch.Tensor, bias: torch.Tensor | None, wanted: tuple[bool, ...]
) -> tuple[int, int, torch.Tensor, torch.Tensor | None]:
    """The parts first..last - 1 of a packed projection (weight [parts * a, C]) that cover the
    `wanted` ones, and the weight and bias rows (views) that project them."""
    first = wanted.index(True)
    last = len(wanted) - wanted[::-1].index(True)
    rows = weight.shape[0] // len(wanted)
    window = slice(first * rows, last * rows)
    return first, last, weight[window], None if bias is None else bias[window]


def packed_heads(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x: torch.Tensor,
    call: AttentionCall,
    head_dim: int,
) -> list[torch.Tensor | None]:
    """q, k, v of a packed projection (weight [3 a, C]: timm's qkv, open_clip's in_proj) split
    into heads as `split_heads`, computing only those `call.projections` asks for (None for the
    others): given attention probabilities need v alone, a probe q and k."""
    wanted = call.projections
    first, last, weight, bias = packed_rows(weight, bias, wanted)
    heads = split_heads(F.linear(x, weight, bias), call, head_dim, last - first)
    return [None] * first + heads + [None] * (len(wanted) - last)


def project_output(
    attn: nn.Module, out: torch.Tensor | None, gate: torch.Tensor | None
) -> torch.Tensor | None:
    """The attention module's output half (timm Attention, EvaAttention, AttentionRope): norm,
    optional sigmoid gate, projection, dropout (on the rows `attend` returned; None for a
    probe)."""
    if out is None:
        return None
    out = run(attn.norm, out)
    if gate is not None:
        out = out * gate
    return run(attn.proj_drop, run(attn.proj, out))
