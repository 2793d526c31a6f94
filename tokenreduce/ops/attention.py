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
