"""Our methods against the outputs of the official ToMe, EViT and PPT code (float64)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FIXTURES, reduced_forward, require_shared


def expected(name):
    return load_file(require_shared(FIXTURES / f"{name}.safetensors"))


def test_dense_logits(fixture_model, images):
    with torch.no_grad():
        logits = fixture_model(images)
    torch.testing.assert_close(logits, expected("dense")["logits"], atol=1e-10, rtol=0)


@pytest.mark.parametrize("r", [13, 8])
def test_tome_matches_official(fixture_model, images, r):
    ref = expected(f"tome_r{r}")
    logits, info = reduced_forward(fixture_model, images, "tome", trace_source=True, r=r)
    assert torch.equal(info.tokens_per_block, ref["tokens_per_block"])
    for block in range(12):
        assert torch.equal(info.source_blk[block], ref[f"source_blk{block}"]), f"block {block}"
    torch.testing.assert_close(info.final_size, ref["size_final"], atol=1e-12, rtol=0)
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)


def kept_indices_from_sources(info, block, keep):
    """The input-token indices (non-prefix) a block kept, recovered from the source maps."""
    before = info.source_blk[block - 1][:, 1:].float()
    after = info.source_blk[block][:, 1 : 1 + keep].float()
    match = (after.unsqueeze(2) == before.unsqueeze(1)).all(dim=-1)
    assert (match.sum(dim=-1) == 1).all(), "every kept row is one input row"
    return match.float().argmax(dim=-1)


@pytest.mark.parametrize("fuse", [True, False])
def test_evit_matches_official(fixture_model, images, fuse):
    ref = expected(f"evit_kr0.7_{'fuse' if fuse else 'nofuse'}")
    logits, info = reduced_forward(
        fixture_model, images, "evit", trace_source=True, keep_rate=0.7, fuse=fuse
    )
    assert torch.equal(info.tokens_per_block, ref["tokens_per_block"])
    for block in (3, 6, 9):
        kept = ref[f"kept_blk{block}"]
        assert torch.equal(kept_indices_from_sources(info, block, kept.shape[1]), kept)
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)


def test_topk_equals_evit_without_fuse(fixture_model, images):
    ref = expected("evit_kr0.7_nofuse")
    logits, info = reduced_forward(fixture_model, images, "topk", trace_source=True, keep_rate=0.7)
    assert torch.equal(info.tokens_per_block, ref["tokens_per_block"])
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)


PPT_CASES = ["7e-5", "0", "1", "1.55e-4"]


@pytest.mark.parametrize("threshold", PPT_CASES)
def test_ppt_matches_official(fixture_model, images, threshold):
    ref = expected(f"ppt_thr{threshold}")
    logits, info = reduced_forward(
        fixture_model, images, "ppt", trace_source=True, r=50, threshold=float(threshold)
    )
    assert torch.equal(info.tokens_per_block, ref["tokens_per_block"])
    assert torch.equal(info.records.policy, ref["policy"])
    torch.testing.assert_close(
        info.records.score_variance, ref["score_variance"], rtol=1e-5, atol=0
    )
    for block in (3, 6, 9):
        assert torch.equal(info.source_blk[block], ref[f"source_blk{block}"]), f"block {block}"
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("threshold", ["7e-5", "1.55e-4"])
def test_ppt_mixed_batch_equals_each_image_alone(fixture_model, images, threshold):
    batched, info = reduced_forward(
        fixture_model, images, "ppt", trace_source=True, threshold=float(threshold)
    )
    assert 0 < info.records.policy[:, 0].sum() < 4, "the batch mixes pooling and pruning"
    for i in range(images.shape[0]):
        alone, info_alone = reduced_forward(
            fixture_model, images[i : i + 1], "ppt", trace_source=True, threshold=float(threshold)
        )
        torch.testing.assert_close(alone[0], batched[i], atol=1e-10, rtol=0)
        assert torch.equal(info_alone.records.policy[0], info.records.policy[i])
        for block in (3, 6, 9):
            assert torch.equal(info_alone.source_blk[block][0], info.source_blk[block][i])
