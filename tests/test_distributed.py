"""`tokenreduce train` and `tokenreduce eval` under torchrun: 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import tiny_vit

MODEL = ["-m", "vit_tiny_patch16_224", "--img-size", "64", "--num-classes", "10"]


def make_image_folder(root: Path, per_class: int, classes: int = 2) -> Path:
    """`root/<class>/<i>.png` random RGB images."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def checkpoint(tmp_path: Path) -> Path:
    """A tiny model's weights with peaky attention, so both processes load the same model."""
    model = tiny_vit("vit_tiny_patch16_224", img_size=64, num_classes=10)
    with torch.no_grad():
        for block in model.blocks:
            dim = block.attn.qkv.in_features
            block.attn.qkv.weight[: 2 * dim] *= 12
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def cli(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "tokenreduce.cli"]
    if processes > 1:
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            "-m",
            "tokenreduce.cli",
        ]
    result = subprocess.run(
        launch + args, capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_train_under_torchrun_shards_data_and_rank0_writes(tmp_path):
    root = make_image_folder(tmp_path / "train", per_class=6)
    weights = checkpoint(tmp_path)
    out = tmp_path / "asvit.safetensors"
    result = cli(
        ["train", str(root), *MODEL, "--checkpoint", str(weights), "--method", "asvit"]
        + ["--target", "0.5", "-b", "2", "-j", "0", "--lr", "thresholds=0.5", "--out", str(out)]
        + ["--no-progress"],
        processes=2,
    )
    assert result.stdout.count("written to") == 1  # only rank 0 reports and writes
    log = json.loads(Path(f"{out}.json").read_text())
    assert log["world_size"] == 2
    rank0, rank1 = (set(seen) for seen in log["seen_per_rank"])
    assert rank0 and rank1 and not rank0 & rank1  # each rank trained on its own shard
    assert rank0 | rank1 == set(range(12))
    trained = json.loads(result.stdout.split("thresholds: ")[1].splitlines()[0])["thresholds"]
    assert any(value > 0 for value in trained)


def test_eval_under_torchrun_equals_one_process(tmp_path):
    root = make_image_folder(tmp_path / "test", per_class=5)
    weights = checkpoint(tmp_path)
    common = [*MODEL, "--checkpoint", str(weights), "-b", "3", "-j", "0", "--no-progress"]
    methods = ["--method", "asvit:thresholds=1.0", "--method", "ltmp:merge_thresholds=0.6"]
    files = []
    for processes in (1, 2):
        path = tmp_path / f"eval_{processes}.json"
        cli(["eval", str(root), *common, *methods, "--results-file", str(path)], processes)
        files.append(json.loads(path.read_text()))
    single, multi = files
    assert multi == single
    assert single[0]["num_images"] == 10
    assert single[0]["gmacs_ratio"] < 1


@pytest.mark.parametrize("spec", ["tome:r=2", "asvit:thresholds=1.0,fuse=True"])
def test_train_cli_rejects_bad_options(tmp_path, spec):
    root = make_image_folder(tmp_path / "train", per_class=1)
    args = ["train", str(root), *MODEL, "--random-weights", "--method", spec, "--target", "0.5"]
    args += ["--out", str(tmp_path / "t.safetensors"), "-b", "2", "-j", "0", "--no-progress"]
    result = subprocess.run(
        [sys.executable, "-m", "tokenreduce.cli", *args], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "error" in result.stderr and ("accepted" in result.stderr or "fuse" in result.stderr)
