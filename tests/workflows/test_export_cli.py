"""`tokenreduce export` and `tokenreduce bench --backend onnxruntime`: the written files equal
PyTorch (checked here again, on other images), refusals are one line with exit status 2."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from safetensors.torch import save_file

import tokenreduce
from tests.conftest import make_image_folder
from tokenreduce import models
from tokenreduce.cli import main
from tokenreduce.exporting import onnx_max_difference
from tokenreduce.options import parse_method

pytest.importorskip("onnxruntime", reason="tokenreduce[export] not installed")
pytest.importorskip("onnxscript", reason="tokenreduce[export] not installed")

FIXED_COUNT = [
    "tome:r=4",
    "evit:keep_rate=0.6",
    "topk:keep_rate=0.6",
    "ppt:r=8",
    "bat:keep_rate=0.6",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A test_vit checkpoint (so that the test rebuilds the exported model) and real image
    files to check on."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(1)
    checkpoint = root / "test_vit.safetensors"
    save_file(models.load("test_vit", pretrained=False, num_classes=3).state_dict(), checkpoint)
    images = make_image_folder(root / "images", per_class=2, size=None)
    return {"checkpoint": str(checkpoint), "images": str(images)}


def model_args(files: dict[str, str]) -> list[str]:
    return ["-m", "test_vit", "--checkpoint", files["checkpoint"], "--num-classes", "3"]


def reported_difference(printed: str) -> float:
    return float(re.search(r"max abs difference to PyTorch: (\S+)", printed)[1])


@pytest.mark.parametrize("spec", FIXED_COUNT)
def test_export_writes_onnx_equal_to_the_reduced_model(spec, files, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    argv = ["export", *model_args(files), "--method", spec, "--data", files["images"]]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (ONNX, " in printed and "4 real images" in printed
    assert reported_difference(printed) <= 1e-4
    name, options = parse_method(spec)
    dense = models.load("test_vit", files["checkpoint"], num_classes=3)
    images = torch.randn(3, 3, 160, 160)
    with torch.no_grad():
        dense_logits = dense(images)
    reduced = tokenreduce.apply(dense, name, **options)
    assert onnx_max_difference(out, reduced, images) <= 1e-4
    with torch.no_grad():  # the file is the reduced model, not the dense one
        assert (reduced(images) - dense_logits).abs().max() > 1e-3


def test_export_writes_an_exported_program_equal_to_the_reduced_model(files, tmp_path, capsys):
    out = tmp_path / "model.pt2"
    assert main(["export", *model_args(files), "--method", "tome:r=4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (torch.export ExportedProgram, " in printed
    assert reported_difference(printed) <= 1e-4
    loaded = torch.export.load(out).module()
    model = tokenreduce.apply(
        models.load("test_vit", files["checkpoint"], num_classes=3), "tome", r=4
    )
    for batch in (1, 2):
        images = torch.randn(batch, 3, 160, 160)
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), model(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--method", "ltmp:merge_thresholds=0.2", "--out", "m.onnx"],
            "export: ltmp with batching='auto' reads each image's token count on the host, so "
            "its shapes follow the data and cannot be exported as one graph; accepted: "
            "batching='masked' (its static path), or a fixed-count method",
        ),
        (
            ["--method", "tome:r=4", "--out", "m.onnxx"],
            "--out: '{tmp}/m.onnxx' has suffix '.onnxx'; accepted: .onnx (ONNX), .pt2 "
            "(torch.export ExportedProgram)",
        ),
        (
            ["--method", "tome:r=4", "--out", "m.onnx", "--opset", "17"],
            "--opset=17 is not accepted; accepted: >= 18",
        ),
        (
            ["--out", "m.onnx", "--num-images", "2"],
            "--num-images=2 acts only with --data, which is not given",
        ),
        (
            ["--out", "m.pt2", "--opset", "18"],
            "--opset=18 acts only with a .onnx --out, not {tmp}/m.pt2; accepted: no --opset, or "
            "a .onnx file",
        ),
    ],
    ids=[
        "learned-method-on-its-ragged-path",
        "suffix",
        "opset",
        "num-images-without-data",
        "opset-with-pt2",
    ],
)
def test_export_refusals_are_one_line_before_any_work(args, message, files, tmp_path, capsys):
    args = [str(tmp_path / a) if a.startswith("m.") else a for a in args]
    assert main(["export", *model_args(files), *args]) == 2
    stderr = capsys.readouterr().err
    assert stderr.splitlines() == [f"tokenreduce export: error: {message.format(tmp=tmp_path)}"]
    assert list(tmp_path.iterdir()) == []


def test_export_to_an_existing_folder_is_refused(files, tmp_path, capsys):
    assert main(["export", *model_args(files), "--out", str(tmp_path)]) == 2
    assert "--out: " in capsys.readouterr().err


def test_export_without_onnxruntime_names_the_extra(files, tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a),
    )
    assert main(["export", *model_args(files), "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"tokenreduce export: error: --out {tmp_path / 'm.onnx'} needs onnxruntime, not installed; "
        'accepted: install them with pip install "tokenreduce[export]"'
    ]
    assert main(["bench", *model_args(files), "--backend", "onnxruntime"]) == 2
    assert "--backend onnxruntime needs onnxruntime, not installed" in capsys.readouterr().err


def test_bench_onnxruntime_times_dense_and_reduced_exports(files, tmp_path, capsys):
    results = tmp_path / "bench.json"
    argv = ["bench", *model_args(files), "--backend", "onnxruntime", "-b", "1", "2"]
    argv += ["--method", "evit:keep_rate=0.6", "--num-warm-iter", "0", "--num-bench-iter", "1"]
    assert main([*argv, "--results-file", str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["method", "options", "batch_size"]
    assert [line.split()[:3] for line in lines[2:4]] == [
        ["evit", "keep_rate=0.6", "1"],
        ["evit", "keep_rate=0.6", "2"],
    ]
    rows = json.loads(results.read_text())
    model = models.load("test_vit", files["checkpoint"], num_classes=3)
    dense_gmacs = tokenreduce.flops.dense_gmacs(model)
    tokenreduce.apply(model, "evit", keep_rate=0.6)
    with torch.inference_mode():
        model(torch.randn(1, 3, 160, 160))
    gmacs = tokenreduce.flops.gmacs(model, tokenreduce.last_info(model)).mean
    for row in rows:
        assert (row["backend"], row["device"], row["precision"]) == ("onnxruntime", "cpu", "fp32")
        assert row["gmacs"] == round(gmacs, 4) and row["dense_gmacs"] == round(dense_gmacs, 4)
        assert row["dense_ms"] > 0 and row["method_ms"] > 0
        share = row["measured_speedup"] / row["ideal_speedup"]  # both rounded to 3 decimals
        assert row["of_ideal"] == pytest.approx(share, rel=2e-3, abs=1e-3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--amp"], "--amp with --backend onnxruntime: ONNX Runtime runs the float32 export"),
        (["--compile"], "--compile with --backend onnxruntime: ONNX Runtime runs the float32"),
        (
            ["--method", "asvit:thresholds=0.9"],
            "--method asvit:thresholds=0.9: export: asvit with batching='auto' reads each",
        ),
    ],
    ids=["amp", "compile", "learned-method-on-its-ragged-path"],
)
def test_bench_onnxruntime_refusals_are_one_line(args, message, files, capsys):
    assert main(["bench", *model_args(files), "--backend", "onnxruntime", *args]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("tokenreduce bench: error: " + message)
