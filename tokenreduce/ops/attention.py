"""Attention helpers: the proportional-attention bias, the class-attention row, the attention
each token receives, attention one image at a time (explicit or fused), and attention
probabilities whose tokens were pooled."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from tokenreduce.ops.merging import reduce_by_destination
from tokenreduce.ops.packing import cached_index

__all__ = [
    "PooledAttention",
    "attention_by_image",
    "class_attention_row",
    "fused_attention_by_image",
    "fused_attention_with_key_bias",
    "image_heads",
    "masked_softmax",
    "padding_bias",
    "policy_softmax",
    "received_attention",
    "size_bias",
    "softmax_dtype",
    "softmax_in_place",
    "sparsify_attention",
    "writable",
]


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax precision for attention scores: at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def writable(scores: torch.Tensor) -> bool:
    """Whether an attention helper may overwrite `scores`, a temporary its caller drops: nothing
    records it for a gradient, no tracer is compiling the code and no autocast would change the
    precision of the out-of-place op it replaces."""
    return not (
        (scores.requires_grad and torch.is_grad_enabled())
        or torch.compiler.is_compiling()
        or torch.is_autocast_enabled(scores.device.type)
    )


def softmax_in_place(scores: torch.Tensor) -> torch.Tensor:
    """scores.softmax(-1), over `scores` itself where `writable` allows (the same bits).

    On a CPU each N x N buffer past the allocator's mmap threshold (32 MiB, e.g. 192 heads at
    N >= 210) comes as fresh pages whose first writes cost more than the softmax itself.
    """
    if writable(scores):
        return torch.softmax(scores, dim=-1, out=scores)
    return scores.softmax(dim=-1)


def size_bias(size: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Proportional attention as an additive key bias: log s, shape [B, 1, 1, N].

    A size of 0 (a padding slot) gives -inf and removes the key. None when sizes are implicit ones.
    """
    if size is None:
        return None
    bias = size.log().view(size.shape[0], 1, 1, size.shape[1])
    return bias if bias.dtype == dtype else bias.to(dtype)


def class_attention_row(
    q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None
) -> torch.Tensor:
    """Softmax attention of query 0 over all keys, without forming the N x N matrix.

    q, k: [B, H, N, d]; bias: [B, 1, 1, N] or None. Returns [B, H, N] in at least float32.
    Costs N * H * d multiply-adds, against N^2 * H * d for the full matrix.
    """
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.to(softmax_dtype(logits.dtype)).softmax(dim=-1)[:, :, 0]


@cached_index
def _query_columns(
    extra: int, scale: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """[extra], each 1 / (scale * extra): the columns `fused_attention_with_key_bias` adds to q."""
    return torch.full((extra,), 1.0 / (scale * extra), dtype=dtype, device=device)


def fused_attention_with_key_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """softmax(scale * q k^T + bias) v through the fused kernel with no attention mask: the
    per-key bias travels as e more head dimensions (e pads d to a multiple of 8, as the flash
    kernel requires), q' = [q, c, ..., c] and k' = [k, bias, ..., bias] with c = 1 / (scale * e),
    so that scale * q'.k' = scale * q.k + bias (no column of q is 0, which would make a -inf bias
    NaN); v is padded with zeros to the same width and the padding is cut from the output. Three
    operators (two concatenations and a pad) besides the kernel.

    A mask makes the CUDA backend leave the flash kernel for a slower one; this keeps it. q, k, v:
    [B, H, N, d]; bias: [B, 1, 1, N] (-inf removes a key). Returns [B, H, N, d].
    """
    batch, heads, tokens, dim = q.shape
    extra = -(-(dim + 1) // 8) * 8 - dim
    columns = _query_columns(extra, scale, q.dtype, q.device)
    q = torch.cat([q, columns.expand(batch, heads, tokens, extra)], dim=-1)
    key_columns = bias.reshape(bias.shape[0], 1, tokens, 1).expand(batch, heads, tokens, extra)
    k = torch.cat([k, key_columns], dim=-1)
    v = F.pad(v, (0, extra))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)
    return out[..., :dim]


def padding_bias(valid: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Padding slots removed as keys: 0 for real tokens, -inf for padding; [B, 1, 1, N]."""
    if valid is None:
        return None
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    return torch.where(valid, zero, -torch.inf)[:, None, None, :]


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Attention with a soft key mask, as LTMP trains (docs/methods.md §2.7).

    logits: [B, H, N, N] (size bias included); mask: [B, N] with values in [0, 1]. Masked keys get
    no weight while the mask's straight-through gradient still flows:
    A = (exp(min(l - c, 0)) * m + eps / N) / (sum_j exp(min(l - c, 0)) * m + eps).
    c is the row maximum over the keys the mask keeps ([deviation] the official code takes it
    over all keys: when a masked key's logit dominates, every kept weight underflows and the row
    degenerates to uniform eps / N; with c over kept keys the row stays the softmax over them,
    and the clamp keeps the mask's gradient exp(l - c) of masked keys at most 1, as official).
    """
    kept = (mask.detach() > 0)[:, None, None, :]
    shift = logits.detach().masked_fill(~kept, -torch.inf).amax(dim=-1, keepdim=True)
    weights = (logits - shift).clamp_max(0).exp() * mask[:, None, None, :]
    return (weights + eps / logits.shape[-1]) / (weights.sum(dim=-1, keepdim=True) + eps)


def policy_softmax(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Attention with a soft key policy, as DiffRate searches (official `softmax_with_policy`,
    DiffRate/patch/deit.py, after DynamicViT; docs/methods.md §3.9).

    logits: [B, H, N, N] (size bias included); policy: [B, N] with values in [0, 1]. Key j weighs
    policy_j, except that every query keeps itself (a masked token still attends to itself):
    A = (exp(l - c) * w + eps / N) / (sum_j exp(l - c) * w + eps), w_ij = p_j + (1 - p_j) [i = j],
    c the row maximum over all keys (with its gradient, as the official `torch.max`), the
    exponentials and the sums in float32 or wider (the official casts to float32 for mixed
    precision), the result in the logits' dtype.
    """
    batch, tokens = policy.shape
    weight = policy.reshape(batch, 1, 1, tokens)
    eye = torch.eye(tokens, dtype=weight.dtype, device=weight.device).view(1, 1, tokens, tokens)
    weight = weight + (1.0 - weight) * eye
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    dtype = softmax_dtype(logits.dtype)
    weights = shifted.to(dtype).exp() * weight.to(dtype)
    attn = (weights + eps / tokens) / (weights.sum(dim=-1, keepdim=True) + eps)
    return attn.to(logits.dtype)


def sparsify_attention(attn: torch.Tensor, sparsity: float, in_place: bool = False) -> torch.Tensor:
    """GTP's attention sparsification (docs/methods.md §3.13): in each head, the probabilities
    below the k-th smallest of its N x N, k = int(N * N * (1 - sparsity)), become 0 (not
    renormalised), as the official code filters them. attn: [B, H, N, N] softmax probabilities;
    returns a tensor of the same shape: a new one, or with `in_place` (where `writable` allows)
    attn itself. k = 0 filters nothing.
    """
    batch, heads, tokens, _ = attn.shape
    k = int(tokens * tokens * (1 - sparsity))
    if k < 1:
        return attn
    flat = attn.reshape(batch, heads, tokens * tokens)
    # the largest of the k smallest is the k-th smallest; topk selects it faster than kthvalue
    smallest = flat.topk(k, dim=-1, largest=False, sorted=False).values
    threshold = smallest.amax(dim=-1, keepdim=True).unsqueeze(-1)  # [B, H, 1, 1]
    if in_place and writable(attn):
        return attn.masked_fill_(attn < threshold, 0)
    return attn * (attn >= threshold)


def received_attention(attn: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean attention each token receives over heads and real query rows: [B, H, N, N] -> [B, N].

    With padding, the sum over real query rows is one vector-matrix product per head (a single
    read of the matrix, no masked copy of it). valid: [B, N] real query rows, None when all are.
    """
    if valid is None:
        return attn.mean(dim=(1, 2))
    rows = valid.to(attn.dtype)
    rows = (rows / (attn.shape[1] * rows.sum(dim=1, keepdim=True)))[:, None, None, :]
    return (rows @ attn).sum(dim=1)[:, 0]


def image_heads(
    tensors: tuple[torch.Tensor, ...], image: int, start: int, count: int
) -> list[torch.Tensor]:
    """One image's real tokens of each tensor as [H, count, d]: rows start..start + count of
    the flat [M, H, d] rows of a ragged batch, or the first `count` tokens of image `image` of a
    padded [B, H, T, d] batch (views, no copies)."""
    if tensors[0].dim() == 3:
        return [t[start : start + count].transpose(0, 1) for t in tensors]
    return [t[image, :, :count] for t in tensors]


def attention_by_image(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    counts: list[int],
    length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention of each image's first counts[i] tokens alone, and the attention
    each of them receives (`received_attention` over its real rows).

    q, k, v: [B, H, T, d] with each image's real tokens first, or the flat [sum(counts), H, d]
    rows of the real tokens, image after image (a ragged batch: nothing padded at all); bias:
    [B, 1, 1, T] or None; length: T. Returns the output rows of the real tokens only, image after
    image, [sum(counts), H * d] (heads concatenated, as attention modules project them), and
    received [B, T] (0 at padding). Equal to the batched explicit path up to float rounding; on
    a CPU one image's [H, n, n] matrix stays in cache through scores, softmax, A @ V and the
    column sums, where the batched [B, H, T, T] matrix is streamed through memory four times,
    and padding costs nothing.
    """
    heads = q.shape[-2] if q.dim() == 3 else q.shape[1]
    out = q.new_empty(sum(counts), heads * v.shape[-1])
    received = q.new_zeros(len(counts), length)
    no_bias = q.new_zeros(1, 1, 1)
    start = 0
    for image, count in enumerate(counts):
        queries, keys, values = image_heads((q, k, v), image, start, count)
        image_bias = no_bias if bias is None else bias[image, :, :, :count]
        # the scale and the bias inside the product: no pass over q or the scores (each op in
        # this loop is paid once per image)
        scores = torch.baddbmm(
            image_bias.expand(heads, 1, count), queries, keys.transpose(-2, -1), alpha=scale
        )
        weights = scores.softmax(dim=-1)
        out[start : start + count] = (weights @ values).transpose(0, 1).flatten(1)
        received[image, :count] = weights.mean(dim=(0, 1))
        start += count
    return out, received


def fused_attention_by_image(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    counts: list[int],
    length: int,
    sdpa_scale: float | None,
    class_scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused kernel (scaled_dot_product_attention) on each image's real tokens alone, and,
    with `class_scale`, its class-attention row (`class_attention_row`).

    q, k, v: the flat [sum(counts), H, d] rows of the real tokens, image after image, or a padded
    [B, H, T, d] batch with each image's real tokens first (`image_heads`); bias:
    [B, 1, 1, T] or None; length: T. Returns the output rows [sum(counts), H * d] and the class
    rows [B, H, T] (0 at padding, as the padded batch's softmax gives) or None. No padded copy
    of q, k, v and no work on padding: on a CPU faster than one padded call.
    """
    heads = q.shape[-2] if q.dim() == 3 else q.shape[1]
    out = q.new_empty(sum(counts), heads * v.shape[-1])
    class_rows = None
    if class_scale is not None:
        class_rows = q.new_zeros(len(counts), heads, length, dtype=softmax_dtype(q.dtype))
    start = 0
    for image, count in enumerate(counts):
        queries, keys, values = (
            t.unsqueeze(0) for t in image_heads((q, k, v), image, start, count)
        )
        image_bias = None if bias is None else bias[image : image + 1, :, :, :count]
        attended = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=image_bias, scale=sdpa_scale
        )
        out[start : start + count] = attended[0].transpose(0, 1).flatten(1)
        if class_rows is not None:
            row = class_attention_row(queries, keys, class_scale, image_bias)
            class_rows[image, :, :count] = row[0]
        start += count
    return out, class_rows


class PooledAttention(NamedTuple):
    """Attention probabilities over N tokens whose tokens were then pooled into N' (MCTF's
    one-step-ahead attention, docs/methods.md §3.10): the probability of a pooled key is the sum
    of its members', a pooled query's row the `weight`-weighted mean of its members' rows.

    probs: [B, H, N, N]; destination: [B, N] output token of each token; weight: [B, N, 1]
    (> 0); num_out: N'. `attend` applies the [B, H, N', N'] matrix without forming it: the keys'
    sum is each token reading its destination's value, and the rows' mean pools N outputs of
    d channels instead of N rows of N probabilities.
    """

    probs: torch.Tensor
    destination: torch.Tensor
    weight: torch.Tensor
    num_out: int

    def _pool(self, rows: torch.Tensor, dim: int) -> torch.Tensor:
        """rows [B, H, N, M] (dim 2) or [B, H, M, N] (dim 3) summed into the N' outputs."""
        return reduce_by_destination(rows, self.destination, self.num_out, dim=dim)

    def _row_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's weight [B, 1, N, 1] and each output's total [B, 1, N', 1]."""
        weight = self.weight.to(self.probs.dtype).unsqueeze(1)
        return weight, self._pool(weight, 2)

    def attend(self, v: torch.Tensor) -> torch.Tensor:
        """The pooled attention applied to the pooled tokens' values v [B, H, N', d]:
        [B, H, N', d]."""
        index = self.destination[:, None, :, None].expand(-1, v.shape[1], -1, v.shape[-1])
        rows = self.probs @ v.gather(2, index)  # [B, H, N, d]
        weight, total = self._row_weight()
        return self._pool(rows * weight, 2) / total

    def materialized(self) -> torch.Tensor:
        """The pooled probabilities [B, H, N', N'] (for attention dropout, which acts on them)."""
        weight, total = self._row_weight()
        return self._pool(self._pool(self.probs, 3) * weight, 2) / total
