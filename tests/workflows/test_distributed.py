"""`tokenreduce train` and `tokenreduce eval` under torchrun: 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import make_image_folder, peaky_vit, run_cli

MODEL = ["-m", "vit_tiny_patch16_224", "--img-size", "64", "--num-classes", "10"]


def peaky_checkpoint(tmp_path: Path) -> Path:
    """The weights of `peaky_vit` in a file, so that every process loads the same model."""
    path = tmp_path / "tiny.safetensors"
    state = peaky_vit(dtype=torch.float32).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def cli(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    """The CLI on one thread per process (2 cores), which must succeed."""
    result = run_cli(*args, processes=processes, threads=1, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_train_under_torchrun_shards_data_and_rank0_writes(tmp_path):
    root = make_image_folder(tmp_path / "train", per_class=6)
    weights = peaky_checkpoint(tmp_path)
    out = tmp_path / "asvit.safetensors"
    result = cli(
        *["train", str(root), *MODEL, "--checkpoint", str(weights), "--method", "asvit"],
        *["--target", "0.5", "-b", "2", "-j", "0", "--lr", "thresholds=0.5", "--out", str(out)],
        "--no-progress",
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
    weights = peaky_checkpoint(tmp_path)
    common = [*MODEL, "--checkpoint", str(weights), "-b", "3", "-j", "0", "--no-progress"]
    methods = ["--method", "asvit:thresholds=1.0", "--method", "ltmp:merge_thresholds=0.6"]
    files = []
    for processes in (1, 2):
        path = tmp_path / f"eval_{processes}.json"
        cli("eval", str(root), *common, *methods, "--results-file", str(path), processes=processes)
        files.append(json.loads(path.read_text()))
    single, multi = files
    assert multi == single
    assert single[0]["num_images"] == 10
    assert single[0]["gmacs_ratio"] < 1


@pytest.mark.parametrize("spec", ["tome:r=2", "asvit:thresholds=1.0,fuse=True"])
def test_train_cli_rejects_bad_options(tmp_path, spec):
    root = make_image_folder(tmp_path / "train", per_class=1)
    args = ["train", str(root), *MODEL, "--weights", "random", "--method", spec, "--target", "0.5"]
    args += ["--out", str(tmp_path / "t.safetensors"), "-b", "2", "-j", "0", "--no-progress"]
    result = run_cli(*args)
    assert result.returncode == 2
    assert "error" in result.stderr and ("accepted" in result.stderr or "fuse" in result.stderr)
