"""Inputs checked at the entry points before any work: one line naming the value and what is
accepted, never a traceback from inside an adapter (images and indices of `patch_features` and
`forward_intermediates`, threshold files and tensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokenreduce
from tests.conftest import tiny_vit
from tokenreduce import models
from tokenreduce.errors import InvalidOptionError, InvalidTypeError, MissingFileError


@pytest.fixture(scope="module")
def reduced() -> torch.nn.Module:
    return tokenreduce.apply(tiny_vit("vit_tiny_patch16_224", img_size=64, depth=4), "tome", r=2)


def images(batch: int = 2, size: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(batch, 3, size, size)


BAD_IMAGES = [
    (lambda: images()[0], InvalidOptionError, r"shape \(3, 64, 64\).*\[B, 3, H, W\].*\[None\]"),
    (lambda: images().tolist(), InvalidTypeError, r"type list .*torch.as_tensor"),
    (lambda: images().numpy(), InvalidTypeError, r"type ndarray .*\[B, 3, H, W\]"),
    (lambda: (images() * 50).long(), InvalidOptionError, r"dtype torch.int64 .*floating"),
    (lambda: images()[:, :1], InvalidOptionError, r"shape \(2, 1, 64, 64\).*\[B, 3, H, W\]"),
    (lambda: images()[:0], InvalidOptionError, r"shape \(0, 3, 64, 64\).*B >= 1"),
    (lambda: images(size=32), InvalidOptionError, r"size 32x32 .*takes 64x64 only"),
    (lambda: images().double(), InvalidOptionError, r"dtype torch.float64 .*in torch.float32"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "error", "match"), BAD_IMAGES)
@pytest.mark.parametrize("entry", ["patch_features", "forward_intermediates", "unreduced"])
def test_bad_images_are_refused_in_one_line(reduced, entry, make, error, match):
    with torch.no_grad(), pytest.raises(error, match=match) as caught:
        if entry == "patch_features":
            tokenreduce.patch_features(reduced, make())
        elif entry == "forward_intermediates":
            reduced.forward_intermediates(make())
        else:
            tokenreduce.patch_features(tiny_vit("vit_tiny_patch16_224", img_size=64), make())
    assert "\n" not in str(caught.value)
    assert caught.traceback[-1].path.name == "grids.py"  # refused before any work


@pytest.mark.parametrize(
    "indices", [[], 1.5, [1.0], "1", True, 0, 5, [4], [-5], np.array([1.0]), torch.ones(1, 1)]
)
def test_bad_indices_are_refused_in_one_line(reduced, indices):
    match = r"indices=.* is not accepted; accepted: None, an int in 1..4 .* in -4..3"
    with torch.no_grad(), pytest.raises(InvalidOptionError, match=match):
        reduced.forward_intermediates(images(), indices=indices)


@pytest.mark.parametrize(
    ("indices", "blocks"),
    [(None, 4), (2, 2), ([1, -1], 2), ((0,), 1), (np.array([1, 3]), 2), (torch.tensor([2]), 1)],
)
def test_accepted_indices_give_their_blocks(reduced, indices, blocks):
    with torch.no_grad():
        grids = reduced.forward_intermediates(images(), indices=indices, intermediates_only=True)
    assert len(grids) == blocks and grids[0].shape == (2, 192, 4, 4)


# ---- threshold files and tensors ------------------------------------------------------------
def test_a_folder_given_as_threshold_file_is_named_a_folder(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidOptionError, match=r"is a folder \(it holds a.safetensors\); acc"):
        tokenreduce.apply(tiny_vit(), "ltmp", thresholds=tmp_path)
    with pytest.raises(InvalidOptionError, match=r"is a folder; accepted: the path of a thre"):
        tokenreduce.apply(tiny_vit(), "asvit", thresholds=str(tmp_path / "empty"))
    with pytest.raises(MissingFileError, match=r"does not exist; accepted: the path of a thre"):
        tokenreduce.apply(tiny_vit(), "asvit", thresholds=tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("method", "shape"),
    [("ltmp", (4, 2)), ("ltmp", (8,)), ("ltmp", (1, 8)), ("ltmp", (2, 2, 2)), ("ltmp", (3, 4)),
     ("asvit", (3, 1)), ("asvit", (2, 3)), ("asvit", (1, 1, 3)), ("asvit", ())],
)  # fmt: skip
def test_threshold_tensors_of_other_shapes_are_refused_not_reshaped(method, shape):
    """A transposed [S, 2] LTMP tensor used to be interleaved into [2, S]."""
    accepted = {"ltmp": r"\[2, S\] \(rows", "asvit": r"\[1, S\] or \[S\] \(rows"}[method]
    with pytest.raises(InvalidOptionError, match=rf"shape {tuple(shape)!r}".replace("(", r"\(")
                       .replace(")", r"\)") + rf"; accepted: {accepted}"):  # fmt: skip
        tokenreduce.apply(tiny_vit(), method, thresholds=torch.full(shape, 0.5))


def test_threshold_tensors_of_the_accepted_shapes_apply():
    ltmp = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.0, 0.01, 0.02, 0.03]])
    model = tokenreduce.apply(tiny_vit(depth=4), "ltmp", thresholds=ltmp)
    config = tokenreduce.patch.attached_engine(model).config
    assert config.merge_thresholds == pytest.approx((0.9, 0.8, 0.7, 0.6))
    assert config.prune_thresholds == pytest.approx((0.0, 0.01, 0.02, 0.03))
    for thresholds in (torch.tensor([0.5, 0.6, 0.7]), torch.tensor([[0.5, 0.6, 0.7]])):
        model = tokenreduce.apply(tiny_vit(), "asvit", thresholds=thresholds)
        assert tokenreduce.patch.attached_engine(model).config.thresholds == pytest.approx(
            (0.5, 0.6, 0.7)
        )


@pytest.mark.parametrize(
    ("method", "option", "value"),
    [("asvit", "thresholds", torch.ones(3, dtype=torch.bool)),
     ("asvit", "thresholds", np.array([True, False, True])),
     ("ltmp", "thresholds", torch.ones(2, 4, dtype=torch.bool)),
     ("ltmp", "merge_thresholds", torch.ones(4, dtype=torch.int64)),
     ("asvit", "thresholds", np.array(["a", "b", "c"]))],
)  # fmt: skip
def test_threshold_tensors_that_are_not_floating_are_refused(method, option, value):
    """A bool mask's 0/1 used to be taken as thresholds."""
    match = rf"(option {option} is a tensor of dtype torch\.(bool|int64)|array of dtype <U1.*);"
    match += " accepted: (a floating|numbers)"
    with pytest.raises(InvalidOptionError, match=match):
        tokenreduce.apply(tiny_vit(depth=4), method, **{option: value})


def test_a_threshold_tensor_of_the_wrong_length_is_named_as_the_tensor():
    """Its rows become merge_thresholds and prune_thresholds, which the user never set."""
    named = r"option thresholds is a tensor of shape \(2, 3\) but the method reduces in 4 blocks"
    with pytest.raises(InvalidOptionError, match=named + r" .*accepted: shape \(2, 4\)"):
        tokenreduce.apply(tiny_vit(depth=4), "ltmp", thresholds=torch.zeros(2, 3))
    with pytest.raises(InvalidOptionError, match=r"shape \(4,\) .*accepted: shape \(3,\)"):
        tokenreduce.apply(tiny_vit(depth=4), "asvit", thresholds=torch.zeros(4))


def test_numpy_thresholds_are_taken_as_tensors_and_numbers():
    ltmp = np.array([[0.9, 0.8, 0.7, 0.6], [0.0, 0.01, 0.02, 0.03]])
    model = tokenreduce.apply(tiny_vit(depth=4), "ltmp", thresholds=ltmp)
    from_numpy = tokenreduce.patch.attached_engine(model).config
    model = tokenreduce.apply(tiny_vit(depth=4), "ltmp", thresholds=torch.from_numpy(ltmp))
    from_tensor = tokenreduce.patch.attached_engine(model).config
    assert from_numpy.merge_thresholds == from_tensor.merge_thresholds
    assert from_numpy.prune_thresholds == from_tensor.prune_thresholds
    for thresholds, expected in (
        (np.array([0.5, 0.6, 0.7]), (0.5, 0.6, 0.7)),
        (np.float32(2), 2.0),
    ):
        model = tokenreduce.apply(tiny_vit(), "asvit", thresholds=thresholds)
        assert tokenreduce.patch.attached_engine(model).config.thresholds == expected
    merge = np.array([0.9, 0.8, 0.7, 0.6])
    model = tokenreduce.apply(tiny_vit(depth=4), "ltmp", merge_thresholds=merge)
    assert tokenreduce.patch.attached_engine(model).config.merge_thresholds == tuple(merge)
    with pytest.raises(InvalidOptionError, match=r"shape \(2, 2\); accepted: \[1, S\] or \[S\]"):
        tokenreduce.apply(tiny_vit(), "asvit", thresholds=np.zeros((2, 2)))


def test_foreign_models_name_the_one_size_they_take():
    """transformers and open_clip towers take their configured size only: refused in one line
    before any work, not deep inside the library."""
    transformers = pytest.importorskip("transformers", reason="tokenreduce[hf] not installed")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8,
    )  # fmt: skip
    hf = tokenreduce.apply(transformers.ViTModel(config).eval(), "tome", r=2)
    with pytest.raises(InvalidOptionError, match=r"size 48x48 .*takes 32x32 only"):
        tokenreduce.patch_features(hf, images(size=48))
    assert tokenreduce.patch_features(hf, images(size=32)).shape == (2, 17, 32)
    open_clip = pytest.importorskip("open_clip", reason="tokenreduce[openclip] not installed")
    tower = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    tokenreduce.apply(tower, "tome", r=2)
    with pytest.raises(InvalidOptionError, match=r"size 64x64 .*takes 224x224 only"):
        tokenreduce.patch_features(tower, images(size=64))


def test_a_threshold_file_that_does_not_fit_is_named_as_the_cause(tmp_path):
    """Layers and thresholds that came from a file are blamed on the file, not on options the
    user never set."""
    from tokenreduce.methods.base import make_config
    from tokenreduce.methods.learned import write_threshold_file

    deep = tiny_vit("vit_tiny_patch16_224", img_size=64)
    config = make_config("ltmp", prune_thresholds=0.01)
    path = write_threshold_file(tmp_path / "t.safetensors", config, tokenreduce.describe(deep), {})
    shallow = tiny_vit("vit_tiny_patch16_224", img_size=64, depth=4)
    with pytest.raises(InvalidOptionError, match=r"with threshold file .*t\.safetensors.*depth 12"):
        tokenreduce.apply(shallow, "ltmp", thresholds=str(path), transfer=True)


def test_the_reduced_forward_checks_its_images(reduced):
    """model(x) of a reduced model is an entry point too: bad images are one line before any
    work, for timm and transformers models alike."""
    for bad, error, match in (
        (torch.randn(3, 64, 64), InvalidOptionError, "one image: images"),
        (np.zeros((1, 3, 64, 64), np.float32), InvalidTypeError, "of type ndarray"),
        (images(size=32), InvalidOptionError, "takes 64x64 only"),
    ):
        with pytest.raises(error, match=match):
            reduced(bad)
    transformers = pytest.importorskip("transformers", reason="tokenreduce[hf] not installed")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=3,
    )  # fmt: skip
    hf = tokenreduce.apply(transformers.ViTForImageClassification(config).eval(), "tome", r=2)
    with pytest.raises(InvalidOptionError, match="takes 32x32 only"):
        hf(pixel_values=images(size=48))
    with torch.no_grad():  # the size check follows the call's own interpolation option
        out = hf(pixel_values=images(size=48), interpolate_pos_encoding=True)
    assert out.logits.shape == (2, 3)


def test_an_image_size_the_patches_do_not_tile_is_refused_unless_padded():
    """timm floors the grid and drops the edge pixels: 63 with 16-px patches used to pass."""
    with pytest.raises(InvalidOptionError, match=r"img_size=63 .*patch size 16 .*e\.g\. 48 or 64"):
        models.load("vit_tiny_patch16_224", pretrained=False, img_size=63)
    padded = models.load(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=63,
        dynamic_img_pad=True,
        dynamic_img_size=True,
    )
    assert padded(torch.randn(1, 3, 63, 63)).shape == (1, 1000)


def test_a_dynamic_size_model_takes_multiples_of_its_patch_only():
    """timm's dynamic_img_size models take any multiple of the patch (their PatchEmbed asserts
    it): other sizes and empty images are one line before any work, in the forward and in
    patch_features; with dynamic_img_pad every size of at least a pixel runs."""
    dynamic = tiny_vit("vit_tiny_patch16_224", img_size=64, depth=2, dynamic_img_size=True)
    tokenreduce.apply(dynamic, "tome", r=2)
    match = r"size 40x32 .*multiples of its patch 16x16; accepted: .*positive multiple of 16"
    for entry in (dynamic, lambda x: tokenreduce.patch_features(dynamic, x)):
        with pytest.raises(InvalidOptionError, match=match) as caught:
            entry(torch.randn(1, 3, 40, 32))
        assert caught.traceback[-1].path.name == "grids.py"
        with pytest.raises(InvalidOptionError, match=r"8x8 .*multiples"):
            entry(torch.randn(1, 3, 8, 8))
        with pytest.raises(InvalidOptionError, match=r"\(1, 3, 0, 16\) .*no pixels"):
            entry(torch.randn(1, 3, 0, 16))
    with pytest.raises(InvalidOptionError, match=r"shape \(0, 3, 64, 64\) .*B >= 1"):
        dynamic(torch.randn(0, 3, 64, 64))  # timm's dynamic position embedding cannot take it
    with torch.no_grad():
        assert tokenreduce.patch_features(dynamic, torch.randn(1, 3, 32, 48)).shape == (1, 7, 192)
    padded = tiny_vit(
        "vit_tiny_patch16_224", img_size=64, depth=2, dynamic_img_size=True, dynamic_img_pad=True
    )
    with torch.no_grad():
        assert padded(torch.randn(1, 3, 8, 8)).shape == (1, 1000)


def rewritten(path, **changes: str):
    """The threshold file at `path` with metadata entries replaced (a file edited by hand)."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata()) | changes
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    path.write_bytes(save(tensors, metadata=metadata))
    return path


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("model_facts", "{not json", r"metadata 'model_facts' is not valid JSON"),
        ("model_facts", "[1, 2]", r"metadata 'model_facts' holds a JSON list, not an object"),
        ("options", "nope", r"metadata 'options' is not valid JSON"),
        ("options", '"text"', r"metadata 'options' holds a JSON str, not an object"),
        ("options", '{"layers": "3"}', r"metadata 'options' has layers='3'; accepted: a list"),
    ],
)
def test_threshold_file_metadata_of_the_wrong_kind_is_named(tmp_path, key, value, match):
    from tokenreduce.methods.base import make_config
    from tokenreduce.methods.learned import write_threshold_file

    model = tiny_vit("vit_tiny_patch16_224", img_size=64, depth=4)
    config = make_config("asvit", thresholds=0.5)
    path = write_threshold_file(tmp_path / "t.safetensors", config, tokenreduce.describe(model), {})
    rewritten(path, **{key: value})
    with pytest.raises(InvalidOptionError, match=match) as caught:
        tokenreduce.apply(model, "asvit", thresholds=str(path))
    assert "t.safetensors" in str(caught.value) and "\n" not in str(caught.value)


def test_threshold_file_layers_other_than_those_asked_are_refused(tmp_path):
    """A file trained at layers (1, 2, 3) is not used at layers (0, 1, 2) as given; left out, the
    file's layers apply; transfer=True uses its thresholds at the layers asked."""
    from tokenreduce.methods.base import make_config
    from tokenreduce.methods.learned import write_threshold_file

    model = tiny_vit("vit_tiny_patch16_224", img_size=64, depth=4)
    config = make_config("asvit", thresholds=0.5, layers=(1, 2, 3))
    path = write_threshold_file(tmp_path / "t.safetensors", config, tokenreduce.describe(model), {})
    match = r"layers=\(0, 1, 2\) differs from the layers \(1, 2, 3\) threshold file .*t\.safet"
    with pytest.raises(InvalidOptionError, match=match):
        tokenreduce.apply(model, "asvit", thresholds=str(path), layers=(0, 1, 2))
    engine = tokenreduce.patch.attached_engine
    tokenreduce.apply(model, "asvit", thresholds=str(path), layers=(3, 1, 2))  # the same set
    tokenreduce.apply(model, "asvit", thresholds=str(path))
    assert engine(model).config.layers == (1, 2, 3)
    tokenreduce.apply(model, "asvit", thresholds=str(path), layers=(0, 1, 2), transfer=True)
    assert engine(model).config.layers == (0, 1, 2)


def test_an_empty_threshold_path_is_named_empty_not_the_current_folder():
    model = tiny_vit("vit_tiny_patch16_224", img_size=64, depth=4)
    with pytest.raises(InvalidOptionError, match=r"threshold file '' is an empty path"):
        tokenreduce.apply(model, "asvit", thresholds="")
    with pytest.raises(InvalidOptionError, match=r"schedule file '' is an empty path"):
        tokenreduce.apply(model, "diffrate", searched="")


def test_a_head_file_holding_a_whole_model_is_one_short_line(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(tiny_vit("vit_tiny_patch16_224", depth=2).state_dict(), path)
    with pytest.raises(InvalidOptionError) as caught:
        models.load_head(tiny_vit("vit_tiny_patch16_224", depth=2), path)
    message = str(caught.value)
    assert "it holds 32 keys (bias, blocks.0.attn.proj.bias, " in message and len(message) < 400
