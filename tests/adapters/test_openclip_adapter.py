"""open_clip image towers: nothing reduced is the tower bit for bit, every method runs with the
tower's pooling made size-aware, and the same weights in timm reduce alike."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from tests.conftest import EVERY_METHOD_SMALL, assert_gmacs_match, pixels
from tokenreduce.errors import InvalidOptionError
from tokenreduce.patch import attached_engine

open_clip = pytest.importorskip("open_clip", reason="tokenreduce[openclip] not installed")
from open_clip.transformer import VisionTransformer  # noqa: E402

TOWERS = {
    "tok": {},
    "avg": {"pool_type": "avg"},
    "avg_final_ln": {"pool_type": "avg", "final_ln_after_pool": True},
    "coca_pooler": {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 4},
    "layer_scale_tokens": {"ls_init_value": 0.1, "output_tokens": True},
}


def tower(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, width=64, layers=4, heads=4, mlp_ratio=4.0, output_dim=32,
        **options,
    )  # fmt: skip
    return model.double().eval()


def outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("key", sorted(TOWERS))
def test_nothing_reduced_is_bit_identical_and_remove_restores(key):
    model = tower(**TOWERS[key])
    x = pixels()
    with torch.no_grad():
        dense = outputs(model(x))
        tokenreduce.apply(model, "tome", r=0)
        same = outputs(model(x))
        grid = tokenreduce.patch_features(model, x)
        tokenreduce.remove(model)
        again = outputs(model(x))
        features = model.transformer(model._embeds(x))
        if model.attn_pool is None and not model.final_ln_after_pool:
            features = model.ln_post(features)
    assert type(model) is VisionTransformer
    for a, b, c in zip(same, dense, again, strict=True):
        assert torch.equal(a, b) and torch.equal(c, b)
    assert torch.equal(grid, features)


def test_our_attention_path_matches_multihead_attention():
    """top-k with keep rate 1 runs the adapter's attention (fused kernel) in every block."""
    model = tower()
    x = pixels()
    with torch.no_grad():
        dense = model(x)
        tokenreduce.apply(model, "topk", keep_rate=1.0, layers=(0, 1, 2, 3))
        ours = model(x)
    torch.testing.assert_close(ours, dense, rtol=0, atol=1e-12)


@pytest.mark.parametrize("key", sorted(TOWERS))
def test_every_method_runs(key):
    model = tower(**TOWERS[key])
    x = pixels(4)
    with torch.no_grad():
        dense = outputs(model(x))
    for method, options in EVERY_METHOD_SMALL:
        tokenreduce.apply(model, method, **options)
        with torch.no_grad():
            out = outputs(model(x))
            grid = tokenreduce.patch_features(model, x)
        counts = tokenreduce.last_info(model).tokens_per_block
        assert (counts[:, -1] < 17).any(), (method, counts)
        assert out[0].shape == dense[0].shape and torch.isfinite(out[0]).all()
        assert grid.shape == (4, 17, 64)
    tokenreduce.remove(model)


def test_average_pooling_weighs_merged_tokens_by_size():
    """'avg' pooling of a merged tower equals the plain mean over the unmerged patch grid."""
    model = tower(pool_type="avg")
    x = pixels()
    tokenreduce.apply(model, "tome", r=3)
    with torch.no_grad():
        pooled = model(x)
        grid = tokenreduce.patch_features(model, x)
    expected = grid[:, 1:].mean(dim=1) @ model.proj
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-12)


def test_average_pooling_in_training_weighs_masked_tokens_zero():
    """A learned method's training forward masks tokens instead of removing them: the tower's
    average counts each unmasked patch token by its size and a masked one not at all."""
    model = tower(pool_type="avg", output_tokens=True)
    tokenreduce.apply(model, "ltmp", merge_thresholds=0.2, prune_thresholds=0.02)
    model.train()
    pooled, tokens = model(pixels())
    state = attached_engine(model).final_state()
    weight = state.size[:, 1:] * state.mask[:, 1:, None]
    assert 0 < (weight > 0).sum() < weight.numel()  # some tokens masked, not all
    expected = (tokens * weight).sum(dim=1) / weight.sum(dim=1) @ model.proj
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("batching", ["ragged", "masked"])
def test_average_pooling_keeps_a_patch_token_per_image(batching):
    """Thresholds that prune every patch token leave each image its best one (docs/methods.md
    §1.6): the average is never over nothing."""
    model = tower(pool_type="avg")
    tokenreduce.apply(model, "ltmp", prune_thresholds=1.0, batching=batching)
    with torch.no_grad():
        assert torch.isfinite(model(pixels())).all()
    assert (tokenreduce.last_info(model).tokens_per_block == 2).all()


def test_vit_b_32_tower_and_timm_reduce_alike():
    """open_clip ViT-B-32's tower and timm's vit_base_patch32_clip_224 with the same (random)
    weights: the same image embeddings within 1e-5 and the same token counts."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    torch.manual_seed(0)
    clip_model = open_clip.create_model("ViT-B-32", pretrained=None)
    visual = clip_model.visual.eval()
    timm_model = timm.create_model("vit_base_patch32_clip_224", pretrained=False, num_classes=512)
    timm_model.load_state_dict(checkpoint_filter_fn(clip_model.state_dict(), timm_model))
    timm_model.eval()
    x = torch.randn(2, 3, 224, 224)
    for method, options in [("tome", {"r": 4}), ("evit", {"keep_rate": 0.7}), ("ppt", {"r": 10})]:
        tokenreduce.apply(visual, method, **options)
        tokenreduce.apply(timm_model, method, **options)
        with torch.no_grad():
            clip_embedding = visual(x)
            clip_counts = tokenreduce.last_info(visual).tokens_per_block
            timm_embedding = timm_model(x)
            timm_counts = tokenreduce.last_info(timm_model).tokens_per_block
        tokenreduce.remove(visual)
        tokenreduce.remove(timm_model)
        assert torch.equal(clip_counts, timm_counts), method
        assert (clip_counts[:, -1] < 50).all()
        torch.testing.assert_close(clip_embedding, timm_embedding, rtol=0, atol=1e-5, msg=method)


@pytest.mark.parametrize("key", ["tok", "coca_pooler"])
def test_gmacs_match_torch_flop_counter(key):
    """Counted with gradients on and the math attention kernel: nn.MultiheadAttention's
    inference fast path and the fused kernels are single ops that torch's counter does not see."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tower(**TOWERS[key])
    x = pixels(2)
    for method in (None, "tome", "tofu"):
        if method:
            tokenreduce.apply(model, method, r=3)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)
        # FLOPs of the batch of 2 -> multiply-accumulates per image
        assert_gmacs_match(model, counter.get_total_flops() / 2 / 2 / 1e9, method)
        if method:
            tokenreduce.remove(model)


def test_forward_intermediates_is_refused_on_a_reduced_tower():
    model = tower()
    tokenreduce.apply(model, "tome", r=3)
    with pytest.raises(InvalidOptionError, match="forward_intermediates of an open_clip tower"):
        model.forward_intermediates(pixels(1))
