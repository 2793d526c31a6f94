"""BAT: counts, published costs, invariants, DPC-kNN on a hand-made point set."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from tests.conftest import reduced_forward, tiny_vit

# DeiT-S, 224^2 (N0 = 197): published BAT GMACs (official logs, torchprofile) per keep rate
PUBLISHED_GMACS = {0.7: 3.0048, 0.6: 2.5832, 0.5: 2.3444, 0.4: 2.0830, 0.3: 1.8233, 0.2: 1.6451}

# Tokens after blocks 3, 6, 9 with the defaults (M = ceil(0.03 R), r_a = ceil(0.02 K)),
# worked by hand. keep 0.7, block 3: 196 patches -> K = ceil(137.2) = 138, R = 58, M = 2,
# r_a = ceil(2.76) = 3 -> 1 + 138 - 3 + 2 = 138.
COUNTS = {
    0.7: [138, 97, 68],
    0.6: [119, 72, 44],
    0.5: [100, 52, 27],
    0.4: [82, 35, 15],
    0.3: [63, 21, 7],
    0.2: [45, 11, 3],
}


@pytest.mark.parametrize("keep_rate", sorted(PUBLISHED_GMACS))
def test_counts_and_published_gmacs(deit_small, keep_rate):
    x = torch.randn(2, 3, 224, 224)
    _, info = reduced_forward(deit_small, x, "bat", trace_source=True, keep_rate=keep_rate)
    counts = info.tokens_per_block
    assert (counts[:, [3, 6, 9]] == torch.tensor(COUNTS[keep_rate])).all()
    assert (counts[:, :3] == 197).all()
    gmacs = tokenreduce.flops.gmacs(deit_small, info).mean
    published = PUBLISHED_GMACS[keep_rate]
    assert abs(gmacs - published) / published < 0.02, (gmacs, published)


def test_invariants(deit_small):
    x = torch.randn(3, 3, 224, 224)
    _, info = reduced_forward(
        deit_small, x, "bat", trace_source=True, keep_rate=0.5, clusters=7, attentive_matches=5
    )
    for block in (3, 6, 9):
        source = info.source_blk[block]
        assert source[:, 0, 0].all() and not source[:, 0, 1:].any()  # prefix untouched
        assert not source[:, 1:, 0].any()
        # nothing is dropped: every patch sits in exactly one token (one cluster at most)
        assert (source[:, :, 1:].sum(dim=1) == 1).all()
        size = info.sizes[block]
        assert (size[:, 1:].sum(dim=1) == 196).all() and (size[:, 0] == 1).all()
        torch.testing.assert_close(source.sum(-1, keepdim=True).to(size.dtype), size)
    # block 3: K = 98, R = 98 -> 1 + 98 - 5 + 7 = 101; the last 7 tokens are the clusters
    assert info.tokens_per_block[0, 3] == 101
    clusters = info.source_blk[3][:, -7:, 1:]
    assert (clusters.sum(dim=1) <= 1).all() and clusters.sum() >= 3 * 7


def test_mixed_batch_equals_each_image_alone(deit_small):
    x = torch.randn(3, 3, 224, 224)
    together, info = reduced_forward(deit_small, x, "bat", trace_source=True)
    for i in range(3):
        alone, info_one = reduced_forward(deit_small, x[i : i + 1], "bat", trace_source=True)
        torch.testing.assert_close(alone, together[i : i + 1], atol=1e-5, rtol=1e-5)
        assert torch.equal(info_one.source_blk[-1][0], info.source_blk[-1][i])


@pytest.mark.parametrize(
    "options,pattern",
    [
        ({"clusters": 0.0}, r"clusters=0.0 is not accepted"),
        ({"clusters": -1}, r"clusters=-1"),
        ({"attentive_matches": 1.5}, r"attentive_matches=1.5"),
        ({"neighbours": 0}, r"neighbours=0"),
        ({"keep_rate": 0}, r"keep_rate=0"),
    ],
)
def test_bad_options(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        tokenreduce.apply(tiny_vit(), "bat", **options)
