"""GMACs matching, token maps, and `tokenreduce demo` end to end."""

from __future__ import annotations

import csv
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

import tokenreduce
from tests.conftest import run_cli, tiny_vit
from tokenreduce import calibrate, data, viz
from tokenreduce.methods import make_config


@pytest.mark.parametrize("method", ["tome", "evit", "ppt"])
def test_match_gmacs_is_the_closest_strength(method):
    model = tiny_vit()
    images = torch.randn(3, 3, 224, 224)
    dense = tokenreduce.flops.dense_gmacs(model)
    matched = calibrate.match_gmacs(model, method, 0.6, images)
    assert tokenreduce.patch.attached_engine(model) is None
    strength = type(matched.config).strength
    value = getattr(matched.config, strength.option)
    step = 1 if strength.integer else 1e-4
    error = abs(matched.gmacs - 0.6 * dense)
    for neighbour in (value - step, value + step):
        config = make_config(method, **{strength.option: neighbour})
        other = calibrate.mean_gmacs(model, config, images)
        assert error <= abs(other - 0.6 * dense) + 1e-12
    assert matched.ratio == pytest.approx(matched.gmacs / dense)


def test_match_gmacs_errors():
    model = tiny_vit()
    with pytest.raises(ValueError, match="ratio=1.5"):
        calibrate.match_gmacs(model, "tome", 1.5, torch.randn(1, 3, 224, 224))


def test_patch_owners_and_fused_token():
    # tokens: cls, a group of patches {0, 1}, patch 3, a fused token holding patch 2
    source = torch.tensor(
        [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 1, 0]], dtype=torch.bool
    )
    assert viz.patch_owners(source, 1, fused_last=False).tolist() == [1, 1, 3, 2]
    assert viz.patch_owners(source, 1, fused_last=True).tolist() == [1, 1, -1, 2]


def test_token_map_colours_groups_and_greys_pruned():
    image = torch.zeros(3, 4, 4)
    image[0, :, :2] = 1.0  # left half red, right half black
    owners = torch.tensor([0, 0, 1, -1])  # 2x2 grid: top row one group, bottom-right pruned
    picture = torch.from_numpy(viz.token_map(image, owners, (2, 2)))
    assert picture.shape == (4, 4, 3)
    torch.testing.assert_close(picture[0, 0], torch.tensor([0.5, 0.0, 0.0]))  # group mean
    torch.testing.assert_close(picture[3, 0], torch.tensor([1.0, 0.0, 0.0]))  # single patch
    torch.testing.assert_close(picture[3, 3], torch.full((3,), viz.PRUNED_GREY))
    torch.testing.assert_close(picture[1, 1], torch.full((3,), viz.BORDER))  # group border


def test_token_maps_need_traced_sources(tmp_path):
    model = tokenreduce.apply(tiny_vit(), "tome", r=8)
    with torch.inference_mode():
        model(torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match="trace_source=True"):
        viz.draw_token_maps(
            torch.rand(1, 3, 224, 224), tokenreduce.last_info(model), (14, 14), tmp_path / "x.png"
        )


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        data.open_rgb(bad)


def test_packaged_photos_are_real_files():
    for package in ("skimage", "matplotlib"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} not installed (pip install 'tokenreduce[offline]')")
    photos = data.packaged_photos()
    assert len(photos) == len(data.PACKAGED_PHOTOS)
    assert all(data.open_rgb(p).size[0] >= 300 for p in photos)


def test_demo_end_to_end_on_a_tiny_model(tmp_path):
    photos = []
    for i, size in enumerate([(320, 200), (200, 260)]):
        photos.append(tmp_path / f"image{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (*size, 3), np.uint8)).save(
            photos[-1]
        )
    out = tmp_path / "demo"
    result = run_cli(
        *["demo", "-m", "test_vit", "--weights", "random", "--quick", "--out-dir", str(out)],
        *["--images", *map(str, photos[:2])],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    with (out / "demo_results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["method"] for r in rows) == tokenreduce.methods()
    for row in rows:
        assert abs(float(row["gmacs_ratio"]) - 0.65) < 0.05
        assert 0 < float(row["feature_cosine"]) <= 1.0 + 1e-6
        assert float(row["measured_speedup"]) > 0
        with Image.open(row["token_maps"]) as picture:
            assert picture.format == "PNG" and picture.width > 200
        assert row["method"] in result.stdout


def test_demo_rejects_bad_options(tmp_path):
    from tokenreduce.cli import main

    assert main(["demo", "-m", "test_vit", "--weights", "random", "--gmacs-ratio", "2"]) == 2
    assert main(["demo", "-m", "test_vit", "--weights", "random", "--method", "nope"]) == 2
    missing = str(tmp_path / "nope.jpg")
    assert main(["demo", "-m", "test_vit", "--weights", "random", "--images", missing]) == 2
