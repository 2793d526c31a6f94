"""Attention helpers: the proportional-attention bias and the class-attention row."""

from __future__ import annotations

import torch


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax precision for attention scores: at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def size_bias(size: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Proportional attention as an additive key bias: log s, shape [B, 1, 1, N].

    A size of 0 (a padding slot) gives -inf and removes the key. None when sizes are implicit ones.
    """
    if size is None:
        return None
    return size.log().to(dtype).transpose(1, 2).unsqueeze(1)


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
