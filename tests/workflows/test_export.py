"""Export: a reduced model as ONNX and as a torch.export program, with a dynamic batch, equal to
PyTorch in ONNX Runtime; what cannot be exported is refused in one line."""

from __future__ import annotations

import pytest
import timm
import torch

import tokenreduce
from tests.conftest import EVERY_METHOD_SMALL
from tokenreduce.errors import InvalidOptionError, InvalidTypeError
from tokenreduce.exporting import export, onnx_max_difference

pytest.importorskip("onnxruntime", reason="tokenreduce[export] not installed")
pytest.importorskip("onnxscript", reason="tokenreduce[export] not installed")

PER_IMAGE = ("ltmp", "asvit", "ats")
FIXED_COUNT = [(m, o) for m, o in EVERY_METHOD_SMALL if m not in PER_IMAGE]


def small(name: str = "vit_tiny_patch16_224", size: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=size, depth=4).eval()


@pytest.mark.parametrize(("method", "options"), FIXED_COUNT, ids=[m for m, _ in FIXED_COUNT])
def test_every_fixed_count_method_exports_to_onnx_equal_to_pytorch_at_any_batch(
    method, options, tmp_path
):
    model = tokenreduce.apply(small(), method, **options)
    path = export(model, tmp_path / f"{method}.onnx")
    for batch in (1, 3):
        assert onnx_max_difference(path, model, torch.randn(batch, 3, 64, 64)) <= 1e-4


def test_rotary_eva_exports_to_onnx_equal_to_pytorch(tmp_path):
    model = tokenreduce.apply(small("eva02_tiny_patch14_224", 56), "tome", r=3)
    path = export(model, tmp_path / "eva.onnx")
    assert onnx_max_difference(path, model, torch.randn(2, 3, 56, 56)) <= 1e-4


def test_transformers_and_open_clip_export_to_onnx_equal_to_pytorch(tmp_path):
    transformers = pytest.importorskip("transformers", reason="tokenreduce[hf] not installed")
    open_clip = pytest.importorskip("open_clip", reason="tokenreduce[openclip] not installed")
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = tokenreduce.apply(transformers.ViTModel(config).eval(), "tome", r=3)
    tower = open_clip.transformer.VisionTransformer(
        image_size=32, patch_size=8, width=64, layers=4, heads=4, mlp_ratio=4.0, output_dim=32
    ).eval()
    tower = tokenreduce.apply(tower, "evit", keep_rate=0.6, layers=(1, 2))
    for name, model in (("hf", hf), ("open_clip", tower)):
        path = export(model, tmp_path / f"{name}.onnx")
        assert onnx_max_difference(path, model, torch.randn(3, 3, 32, 32)) <= 1e-4, name


def test_an_exported_program_round_trips_with_a_dynamic_batch(tmp_path):
    model = tokenreduce.apply(small(), "tome", r=3)
    path = export(model, tmp_path / "tome.pt2")
    loaded = torch.export.load(path).module()
    for batch in (1, 4):
        images = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), model(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("ltmp", {"merge_thresholds": 0.2, "prune_thresholds": 0.02}),
        ("asvit", {"thresholds": (0.3, 0.4, 0.5)}),
        ("ats", {}),
    ],
)
def test_a_per_image_method_exports_its_masked_path_equal_to_pytorch(method, options, tmp_path):
    model = tokenreduce.apply(small(), method, batching="masked", **options)
    path = export(model, tmp_path / f"{method}.onnx")
    for batch in (1, 3):
        assert onnx_max_difference(path, model, torch.randn(batch, 3, 64, 64)) <= 1e-4


def test_a_learned_method_on_its_host_reading_path_is_refused(tmp_path):
    model = tokenreduce.apply(small(), "ltmp", merge_thresholds=0.2, prune_thresholds=0.02)
    with pytest.raises(InvalidOptionError, match=r"ltmp with batching='auto' reads each .*accep"):
        export(model, tmp_path / "ltmp.onnx")


def test_bad_export_arguments_are_one_line(tmp_path):
    model = tokenreduce.apply(small(), "tome", r=3)
    with pytest.raises(InvalidOptionError, match=r"suffix '.onnxx'; accepted: .onnx .*\.pt2"):
        export(model, tmp_path / "m.onnxx")
    with pytest.raises(
        InvalidOptionError, match=r"opset=17 is not accepted; accepted: an int >= 18"
    ):
        export(model, tmp_path / "m.onnx", opset=17)
    with pytest.raises(InvalidTypeError, match=r"images must be a \[B, 3, H, W\] tensor"):
        export(model, tmp_path / "m.onnx", images=torch.randn(3, 64, 64))
    with pytest.raises(InvalidOptionError, match=r"training mode; accepted: model.eval\(\)"):
        export(model.train(), tmp_path / "m.onnx")


class _TracedDifferently(torch.nn.Module):
    """Adds 1 only while torch.export traces it: its exported file is wrong by exactly 1."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3)) + (1.0 if torch.compiler.is_exporting() else 0.0)


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_export_refuses_a_file_that_differs_from_pytorch_and_leaves_it(suffix, tmp_path):
    path = tmp_path / f"wrong{suffix}"
    images = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r"differs from PyTorch by 1 > 0.0001; the file is left"):
        export(_TracedDifferently().eval(), path, images)
    assert path.exists()
    assert export(_TracedDifferently().eval(), path, images, check=False) == path


def test_export_check_must_be_a_bool_and_needs_a_float32_model(tmp_path):
    with pytest.raises(InvalidOptionError, match=r"export: option check='no' must be True or"):
        export(_TracedDifferently(), tmp_path / "m.pt2", torch.randn(2, 3, 8, 8), check="no")
    model = tokenreduce.apply(small(), "tome", r=3).half()
    with pytest.raises(
        InvalidOptionError,
        match=r"in float32 and the model is torch.float16; accepted: a float32 model, or check=F",
    ):
        export(model, tmp_path / "m.pt2")
