"""The shared ops against independent reference implementations."""

from __future__ import annotations

import math

import pytest
import torch

from tokenreduce.ops import bipartite_soft_matching, class_attention_row, merge_wavg
from tokenreduce.ops.attention import softmax_in_place
from tokenreduce.ops.merging import merge_source


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_class_attention_equals_explicit_row(with_bias):
    q, k = torch.randn(2, 3, 50, 16), torch.randn(2, 3, 50, 16)
    bias = torch.rand(2, 1, 1, 50).mul(5).add(1).log() if with_bias else None
    scale = 16**-0.5
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    explicit = logits.softmax(-1)[:, :, 0]
    torch.testing.assert_close(class_attention_row(q, k, scale, bias), explicit, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_softmax_in_place_gives_the_bits_of_softmax_and_keeps_autograd_inputs(dtype):
    scores = torch.randn(2, 3, 33, 33).mul(6).to(dtype)
    expected = scores.softmax(-1)
    work = scores.clone()
    assert softmax_in_place(work) is work
    assert torch.equal(work, expected)
    graded = scores.clone().requires_grad_()
    out = softmax_in_place(graded)
    assert out is not graded and torch.equal(out, expected)
    out[..., 0].sum().backward()  # autograd still has what the backward needs
    assert graded.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = scores.clone()
        assert softmax_in_place(kept) is not kept and torch.equal(kept, scores)


def reference_tome(metric, x, size, r, num_prefix):
    """ToMe's algorithm written out per image with Python loops (class token: P >= 1 sorts)."""
    outputs = []
    for b in range(metric.shape[0]):
        m = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        n = m.shape[0]
        a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
        r_b = min(r, (n - num_prefix) // 2)
        best = []
        for ai, pa in enumerate(a_pos):
            candidates = [
                (float(m[pa] @ m[pb]), bi) for bi, pb in enumerate(b_pos) if pb >= num_prefix
            ]
            score, partner = max(candidates, key=lambda c: (c[0], -c[1]))
            best.append((-math.inf if pa < num_prefix else score, partner, ai))
        order = sorted(range(len(a_pos)), key=lambda i: -best[i][0])
        merged, kept = order[:r_b], order[r_b:]
        if num_prefix > 0:
            kept = sorted(kept)
        xs, ss = x[b] * size[b], size[b].clone()
        dst_x = xs[b_pos].clone()
        dst_s = ss[b_pos].clone()
        for ai in merged:
            dst_x[best[ai][1]] += xs[a_pos[ai]]
            dst_s[best[ai][1]] += ss[a_pos[ai]]
        tokens = [(a_pos[ai], xs[a_pos[ai]], ss[a_pos[ai]]) for ai in kept]
        tokens += [(b_pos[bi], dst_x[bi], dst_s[bi]) for bi in range(len(b_pos))]
        prefix = sorted([t for t in tokens if t[0] < num_prefix], key=lambda t: t[0])
        rest = [t for t in tokens if t[0] >= num_prefix]
        tokens = prefix + rest
        out_x = torch.stack([t[1] / t[2] for t in tokens])
        outputs.append((out_x, torch.stack([t[2] for t in tokens]), [t[0] for t in tokens]))
    return outputs


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("num_tokens", [17, 20])
def test_bipartite_matching_equals_reference(num_prefix, num_tokens):
    torch.manual_seed(num_prefix * 100 + num_tokens)
    metric = torch.randn(3, num_tokens, 8, dtype=torch.float64)
    x = torch.randn(3, num_tokens, 4, dtype=torch.float64)
    size = torch.randint(1, 4, (3, num_tokens, 1)).double()
    r = 6
    matching = bipartite_soft_matching(metric, r, num_prefix, sort_unmerged=num_prefix > 0)
    out_x, out_s = merge_wavg(matching, x, size)
    for b, (ref_x, ref_s, _) in enumerate(reference_tome(metric, x, size, r, num_prefix)):
        torch.testing.assert_close(out_x[b], ref_x)
        torch.testing.assert_close(out_s[b], ref_s)


def test_matching_never_touches_prefix_and_sources_partition():
    metric = torch.randn(2, 21, 8)
    source = torch.eye(21).expand(2, -1, -1)
    matching = bipartite_soft_matching(metric, 10, num_prefix=3)
    merged = merge_source(matching, source)
    assert merged.shape == (2, 21 - 9, 21)  # r clips to the non-prefix tokens of set A
    assert torch.equal(merged[:, :3], source[:, :3])
    assert torch.equal(merged.sum(dim=1), torch.ones(2, 21))


def test_r_zero_is_identity():
    assert bipartite_soft_matching(torch.randn(1, 9, 4), 0, 1) is None
    assert bipartite_soft_matching(torch.randn(1, 3, 4), 5, 2) is None


def test_merged_positions_hand_case():
    """Tokens 0..5, no prefix; A = (0, 2, 4), B = (1, 3, 5). Token 2 (size 3, at (2, 0)) merges
    into token 1 (size 1, at (0, 4)); token 4 into token 5."""
    from tokenreduce.ops.merging import Matching, merge_positions

    position = torch.tensor([[[0.0, 0], [0, 4], [2, 0], [1, 1], [3, 3], [3, 5]]])
    size = torch.tensor([[[1.0], [1], [3], [1], [2], [2]]])
    matching = Matching(
        unm_idx=torch.tensor([[0]]),
        src_idx=torch.tensor([[1, 2]]),
        dst_idx=torch.tensor([[0, 2]]),
        order=None,
    )
    _, merged_size = merge_wavg(matching, torch.zeros(1, 6, 1), size)
    mean = merge_positions(matching, position, size, merged_size, destination=False)
    destination = merge_positions(matching, position, size, merged_size, destination=True)
    # outputs: [token 0, token 1 + token 2, token 3, token 5 + token 4]
    assert merged_size[0, :, 0].tolist() == [1, 4, 1, 4]
    assert mean[0].tolist() == [[0, 0], [1.5, 1], [1, 1], [3, 4]]
    assert destination[0].tolist() == [[0, 0], [0, 4], [1, 1], [3, 5]]
    assert merge_positions(matching, None, size, merged_size, destination=False) is None


def test_fused_attention_by_image_equals_the_padded_fused_call():
    """The fused kernel on each image's flat rows = one padded call with -inf key bias at
    padding (real rows), and the class rows = `class_attention_row` of the padded batch."""
    import torch.nn.functional as F

    from tokenreduce.ops.attention import class_attention_row, fused_attention_by_image, size_bias

    batch, heads, length, dim = 3, 2, 7, 4
    counts = [7, 4, 5]
    q, k, v = (torch.randn(batch, heads, length, dim, dtype=torch.float64) for _ in range(3))
    valid = torch.arange(length) < torch.tensor(counts)[:, None]
    size = (torch.rand(batch, length, 1, dtype=torch.float64) + 0.5) * valid.unsqueeze(-1)
    bias = size_bias(size, torch.float64)
    scale = dim**-0.5
    padded = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    want_rows = padded.transpose(1, 2).flatten(2)[valid]
    want_class = class_attention_row(q, k, scale, bias)
    flat = [t.transpose(1, 2)[valid] for t in (q, k, v)]
    for inputs in (flat, (q, k, v)):
        rows, class_rows = fused_attention_by_image(*inputs, bias, counts, length, None, scale)
        torch.testing.assert_close(rows, want_rows, rtol=0, atol=1e-12)
        torch.testing.assert_close(class_rows, want_class, rtol=0, atol=1e-12)
        assert (class_rows[~valid[:, None, :].expand(-1, heads, -1)] == 0).all()
    rows, class_rows = fused_attention_by_image(*flat, None, counts, length, None, None)
    assert class_rows is None
    unbiased = F.scaled_dot_product_attention(q[2:, :, :5], k[2:, :, :5], v[2:, :, :5])
    torch.testing.assert_close(rows[11:], unbiased[0].transpose(0, 1).flatten(1))


def test_attention_by_image_equals_the_batched_explicit_path():
    """Each image alone over its real tokens (first counts[i] slots) = the padded batch with -inf
    key bias at padding: the outputs of the real rows and the attention each token receives."""
    from tokenreduce.ops.attention import attention_by_image, received_attention, size_bias

    batch, heads, length, dim = 3, 2, 7, 4
    counts = [7, 4, 5]
    q, k, v = (torch.randn(batch, heads, length, dim, dtype=torch.float64) for _ in range(3))
    size = torch.rand(batch, length, 1, dtype=torch.float64) + 0.5
    valid = torch.arange(length) < torch.tensor(counts)[:, None]
    size = size * valid.unsqueeze(-1)
    bias = size_bias(size, torch.float64)
    scale = dim**-0.5
    weights = ((q * scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
    want_out = (weights @ v).transpose(1, 2).flatten(2)[valid]  # real rows, image after image
    want_received = received_attention(weights, valid).masked_fill(~valid, 0)
    flat = [t.transpose(1, 2)[valid] for t in (q, k, v)]  # the ragged layout: [M, H, d]
    for inputs in ((q, k, v), flat):
        out, received = attention_by_image(*inputs, scale, bias, counts, length)
        assert out.shape == (sum(counts), heads * dim)
        torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
        torch.testing.assert_close(received, want_received, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim", [4, 7, 8, 64])
def test_a_key_bias_as_a_head_dimension_equals_the_masked_softmax(dim):
    """softmax(scale q k^T + bias) v with the bias carried in an extra column of q and k, in
    float64: proportional attention's log sizes, and padding keys (-inf) that get no weight."""
    from tokenreduce.ops.attention import fused_attention_with_key_bias, size_bias

    batch, heads, length = 3, 2, 9
    q, k, v = (torch.randn(batch, heads, length, dim, dtype=torch.float64) for _ in range(3))
    size = torch.rand(batch, length, 1, dtype=torch.float64).mul(6).add(0.5)
    size[1, 6:] = 0  # padding slots
    bias = size_bias(size, torch.float64)
    scale = dim**-0.5
    want = ((q @ k.transpose(-2, -1)) * scale + bias).softmax(-1) @ v
    got = fused_attention_with_key_bias(q, k, v, bias, scale)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    shifted = fused_attention_with_key_bias(q, k, v, bias + 3.0, scale)  # a shift of every key
    torch.testing.assert_close(shifted, want, rtol=0, atol=1e-12)
    unbiased = fused_attention_with_key_bias(q, k, v, torch.zeros_like(bias), scale)
    assert (unbiased - want).abs().max() > 1e-3
