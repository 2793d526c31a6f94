"""The timm adapter: no-op exactness, removal, prefix protection, state isolation, errors."""

from __future__ import annotations

import threading

import pytest
import timm
import torch

import tokenreduce
from tests.conftest import apply_unless_refused, tiny_vit

NOOP = [
    ("tome", {"r": 0}),
    ("evit", {"keep_rate": 1.0}),
    ("topk", {"keep_rate": 1.0}),
    ("ppt", {"r": 0}),
]

MODELS = {
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit_small_distilled": ("deit_small_distilled_patch16_224", {}),
    "deit3_small": ("deit3_small_patch16_224", {}),
    "reg4_dinov2": ("vit_small_patch14_reg4_dinov2", {"img_size": 224}),
    "siglip_no_cls": ("vit_base_patch16_siglip_224", {}),
    "avg_pool": ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False}),
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_input(request):
    name, kwargs = MODELS[request.param]
    model = tiny_vit(name, **kwargs)
    size = model.patch_embed.img_size
    return model, torch.randn(2, 3, *size)


def set_fused(model, fused):
    for block in model.blocks:
        block.attn.fused_attn = fused


@pytest.mark.parametrize("fused", [True, False])
def test_noop_reduction_is_bit_identical(model_and_input, fused):
    model, x = model_and_input
    set_fused(model, fused)
    with torch.no_grad():
        dense = model(x)
    ran = 0
    for method, options in NOOP:
        if not apply_unless_refused(model, method, **options):
            continue
        with torch.no_grad():
            out = model(x)
        info = tokenreduce.last_info(model)
        tokenreduce.remove(model)
        assert torch.equal(out, dense), method
        assert (
            info.tokens_per_block == model.patch_embed.num_patches + model.num_prefix_tokens
        ).all()
        ran += 1
    assert ran >= 1
    with torch.no_grad():
        assert torch.equal(model(x), dense)
    set_fused(model, True)


def test_remove_restores_class_and_state(model_and_input):
    model, x = model_and_input
    cls, state = type(model), {k: v.clone() for k, v in model.state_dict().items()}
    tokenreduce.apply(model, "tome", r=8)
    assert type(model) is not cls and isinstance(model, cls)
    assert model.state_dict().keys() == state.keys()
    tokenreduce.remove(model)
    assert type(model) is cls
    assert tokenreduce.patch.attached_engine(model) is None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


REDUCING = [
    ("tome", {"r": 8}),
    ("evit", {}),
    ("topk", {}),
    ("ppt", {"r": 30}),
    ("ppt", {"r": 30, "threshold": 1.0}),
    ("bat", {"keep_rate": 0.5, "clusters": 0.2, "attentive_matches": 4}),
    ("pitome", {"ratio": 0.8}),
]


@pytest.mark.parametrize("method,options", REDUCING)
def test_prefix_tokens_are_never_reduced(model_and_input, method, options):
    model, x = model_and_input
    if model.cls_token is None and method not in ("tome", "ltmp", "pitome"):
        with pytest.raises(ValueError, match="class token"):
            tokenreduce.apply(model, method, **options)
        return
    prefix = model.num_prefix_tokens
    n0 = prefix + model.patch_embed.num_patches
    tokenreduce.apply(model, method, trace_source=True, **options)
    with torch.no_grad():
        model(x)
    info = tokenreduce.last_info(model)
    tokenreduce.remove(model)
    assert info.tokens_per_block[:, -1].lt(n0).all(), "the method reduced something"
    eye = torch.eye(n0, dtype=torch.bool)
    for block, source in enumerate(info.source_blk):
        assert torch.equal(source[:, :prefix], eye[:prefix].expand(x.shape[0], -1, -1)), block
        assert not source[:, prefix:, :prefix].any(), f"a prefix column leaked, block {block}"
        assert (source.sum(dim=1) <= 1).all(), "an original token is in two current tokens"
        size = info.sizes[block]
        if size is not None:
            torch.testing.assert_close(source.sum(dim=-1, keepdim=True).to(size.dtype), size)


@pytest.mark.parametrize(
    "method,options",
    [("tome", {"r": 8}), ("ppt", {"r": 30, "threshold": 1.0}), ("bat", {"clusters": 5})],
)
def test_merging_conserves_size(method, options):
    model = tiny_vit("deit_small_distilled_patch16_224")
    tokenreduce.apply(model, method, **options)
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    info = tokenreduce.last_info(model)
    for size in info.sizes:
        if size is not None:
            assert torch.equal(size[:, :2], torch.ones_like(size[:, :2]))
            assert (size[:, 2:].sum(dim=1) == model.patch_embed.num_patches).all()


@pytest.mark.parametrize(
    "method,options",
    [
        ("tome", {"r": 8}),
        ("ppt", {"r": 30, "threshold": 1.0}),
        ("bat", {"clusters": 5}),
        ("ltmp", {"merge_thresholds": 0.5, "prune_thresholds": 0.001}),
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_recorded_sizes_hold_only_their_own_memory(method, options, batch):
    """Each block's sizes are kept after the forward (state, ReductionInfo.sizes): a view into
    that block's merged [B, N, C + 1] rows would keep all of them alive."""
    model = tiny_vit("deit_small_distilled_patch16_224")
    tokenreduce.apply(model, method, **options)
    with torch.inference_mode():
        model(torch.randn(batch, 3, 224, 224))
    sizes = [size for size in tokenreduce.last_info(model).sizes if size is not None]
    assert sizes
    for size in sizes:
        assert size.untyped_storage().nbytes() == size.numel() * size.element_size()


def test_distilled_model_keeps_head_tokens_in_place():
    """Head reads tokens 0 and 1: they must be the class and distillation tokens after reduction."""
    model = tiny_vit("deit_small_distilled_patch16_224")
    x = torch.randn(2, 3, 224, 224)
    for method in ("evit", "topk", "ppt", "tome", "bat"):
        tokenreduce.apply(model, method, trace_source=True)
        with torch.no_grad():
            model(x)
        source = tokenreduce.last_info(model).source_blk[-1]
        assert source[:, 0, 0].all() and source[:, 1, 1].all(), method
        tokenreduce.remove(model)


@pytest.mark.parametrize("method", ["tome", "evit", "ppt", "bat"])
def test_state_does_not_leak_between_calls(method):
    torch.manual_seed(1)
    x8, x3 = torch.randn(8, 3, 224, 224), torch.randn(3, 3, 224, 224)
    reused = tokenreduce.apply(tiny_vit(), method)
    with torch.no_grad():
        reused(x8)
        second = reused(x3)
        info = tokenreduce.last_info(reused)
        fresh = tokenreduce.apply(tiny_vit(), method)(x3)
    assert torch.equal(second, fresh)
    assert info.tokens_per_block.shape[0] == 3


def test_two_threads_share_one_model():
    model = tokenreduce.apply(tiny_vit(), "ppt", trace_source=True)
    inputs = [torch.randn(5, 3, 224, 224), torch.randn(2, 3, 224, 224)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results: dict[int, tuple] = {}
    barrier = threading.Barrier(2)

    def work(i):
        barrier.wait()
        with torch.no_grad():
            for _ in range(3):
                out = model(inputs[i])
                info = tokenreduce.last_info(model)
                assert info.tokens_per_block.shape[0] == inputs[i].shape[0]
        results[i] = (out, info)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        torch.testing.assert_close(results[i][0], expected[i], atol=1e-5, rtol=1e-5)
        assert results[i][1].source_blk[-1].shape[0] == inputs[i].shape[0]


def test_size_weighted_average_pool():
    model = tiny_vit("vit_tiny_patch16_224", global_pool="avg", class_token=False)
    x = torch.randn(2, 3, 224, 224)
    tokenreduce.apply(model, "tome", r=8)
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model.pool(tokens)
    size = tokenreduce.last_info(model).final_size
    torch.testing.assert_close(pooled, (tokens * size).sum(1) / size.sum(1))
    assert not torch.allclose(pooled, tokens.mean(1), atol=1e-4)


def test_attention_pool_weights_keys_by_size():
    model = tiny_vit("vit_base_patch16_siglip_224")
    tokenreduce.apply(model, "tome", r=8)
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(1, 3, 224, 224))
        pooled = model.forward_head(tokens, pre_logits=True)
        size = tokenreduce.last_info(model).final_size
        bias = size.log().transpose(1, 2).unsqueeze(1)
        torch.testing.assert_close(pooled, model.attn_pool(tokens, attn_mask=bias))
        assert not torch.allclose(pooled, model.attn_pool(tokens), atol=1e-4)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method", ["ltmp", "asvit"])
def test_pooling_patch_tokens_keeps_a_patch_token_per_image(pool, batch, method):
    """Thresholds that would prune every patch token leave each image its best one
    (docs/methods.md §1.6): no average over nothing (NaN), no max over nothing (-inf)."""
    options = {"ltmp": {"prune_thresholds": 1.0}, "asvit": {"thresholds": 1e9, "min_keep": 0}}
    options = options[method]
    x = torch.randn(batch, 3, 224, 224)
    model = tokenreduce.apply(tiny_vit("vit_tiny_patch16_224", global_pool=pool), method, **options)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    assert (tokenreduce.last_info(model).tokens_per_block[:, -1] == 2).all()


def test_last_info_before_forward_is_an_error():
    model = tokenreduce.apply(tiny_vit(), "tome")
    with pytest.raises(RuntimeError, match="no forward pass"):
        tokenreduce.last_info(model)


def test_reapply_replaces_previous_method():
    model = tiny_vit()
    tokenreduce.apply(model, "tome", r=4)
    tokenreduce.apply(model, "evit")
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert tokenreduce.last_info(model).method == "evit"
    tokenreduce.remove(model)
    assert type(model) is timm.models.vision_transformer.VisionTransformer


def test_apply_accepts_config_dataclass():
    model = tiny_vit()
    tokenreduce.apply(model, tokenreduce.PPTConfig(r=20), threshold=0.0)
    engine = tokenreduce.patch.attached_engine(model)
    assert engine.config == tokenreduce.PPTConfig(r=20, threshold=0.0)


def test_attention_masks_are_rejected_not_ignored():
    model = tokenreduce.apply(tiny_vit(), "tome")
    with pytest.raises(ValueError, match="attn_mask"):
        model.forward_features(torch.randn(1, 3, 224, 224), attn_mask=torch.zeros(1, 1, 197, 197))


def test_grad_checkpointing_is_rejected_not_ignored():
    model = tokenreduce.apply(tiny_vit(), "tome")
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="grad_checkpointing"):
        model(torch.randn(1, 3, 224, 224))


def test_unsupported_model_class():
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(TypeError, match="unsupported model class ResNet; supported: .*timm Vision"):
        tokenreduce.apply(model, "tome")


def test_unsupported_block_class():
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        block_fn=timm.models.vision_transformer.ResPostBlock,
    )
    with pytest.raises(TypeError, match="unsupported block 0 .*ResPostBlock"):
        tokenreduce.apply(model, "tome")


def test_remove_without_apply():
    with pytest.raises(ValueError, match="no token reduction"):
        tokenreduce.remove(tiny_vit())


def test_failed_apply_leaves_model_untouched():
    model = tiny_vit()
    with pytest.raises(ValueError):
        tokenreduce.apply(model, "evit", layers=(99,))
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
