"""Helpers shared by every test layer: offline timm models, reduced forwards, image folders,
the CLI in a subprocess, and the real data that lives outside the repository when present.

Tests are grouped by layer: ops/ (pure tensor functions), methods/ (each method's semantics and
the official-code fixtures), adapters/ (the timm adapter, the API and GMACs), workflows/ (model
loading, bench/eval/compare/viz/train/demo and the CLI).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import tokenreduce
from tokenreduce.info import ReductionInfo
from tokenreduce.methods.base import make_config

SHARED_DATA = Path(
    os.environ.get(
        "TOKENREDUCE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"
    )
)
FIXTURES = SHARED_DATA / "fixtures"


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not present: {path}")
    return path


EVERY_METHOD_SMALL = [
    ("tome", {"r": 3}),
    ("evit", {"keep_rate": 0.6, "layers": (1, 2)}),
    ("topk", {"keep_rate": 0.6, "layers": (1, 2)}),
    ("ppt", {"r": 4, "layers": (1, 2)}),
    ("bat", {"keep_rate": 0.6, "layers": (1, 2)}),
    ("ltmp", {"merge_thresholds": 0.2, "prune_thresholds": 0.02}),
    ("asvit", {"thresholds": 0.98}),
    ("pitome", {"ratio": 0.8}),
    ("diffrate", {}),
    ("ats", {}),
    ("tofu", {"r": 3}),
    ("gtp", {"num_prop": 3}),
    ("mctf", {"r": 3}),
]
"""Every method with options that reduce a small model (4 blocks, 16 patches of 32x32 pixels):
the transformers and open_clip adapter tests."""


def pixels(batch: int = 3) -> torch.Tensor:
    """Random float64 32x32 images for the small transformers and open_clip models."""
    torch.manual_seed(1)
    return torch.randn(batch, 3, 32, 32, dtype=torch.float64)


def assert_gmacs_match(model: torch.nn.Module, counted: float, method: str | None) -> None:
    """tokenreduce's GMACs per image (of the last forward when `method` reduced the model, else
    the dense model's) within 1% of `counted`, a FLOP counter's."""
    if method:
        expected = tokenreduce.flops.gmacs(model, tokenreduce.last_info(model)).mean
    else:
        expected = tokenreduce.flops.dense_gmacs(model)
    assert abs(expected - counted) / counted < 0.01, (method, expected, counted)


def tiny_vit(name: str = "deit_tiny_patch16_224", seed: int = 0, **kwargs) -> torch.nn.Module:
    """A random-weight timm model (no download), in eval mode."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def peaky_vit(
    name: str = "vit_tiny_patch16_224", dtype: torch.dtype = torch.float64, **kwargs
) -> torch.nn.Module:
    """A random tiny ViT (64x64 input, 10 classes) whose attention is far from uniform (scaled
    query/key weights), so that learned thresholds keep different token counts per image."""
    model = tiny_vit(name, img_size=64, num_classes=10, **kwargs)
    with torch.no_grad():
        for block in model.blocks:
            dim = block.attn.qkv.in_features
            block.attn.qkv.weight[: 2 * dim] *= 12
    return model.to(dtype)


def reduced_forward(
    model: torch.nn.Module, images: torch.Tensor, method: str, **options
) -> tuple[torch.Tensor, ReductionInfo]:
    """Logits and info of `model` reduced by `method` on `images`; the model is left as it was."""
    tokenreduce.apply(model, method, **options)
    try:
        with torch.no_grad():
            logits = model(images)
        return logits, tokenreduce.last_info(model)
    finally:
        tokenreduce.remove(model)


def apply_unless_refused(model: torch.nn.Module, method: str, **options) -> bool:
    """Apply `method`; for a class-attention method on a model without a class token, check that
    it is refused (ValueError naming the class token) and return False."""
    if make_config(method, **options).requires_class_token and model.cls_token is None:
        with pytest.raises(ValueError, match="class token"):
            tokenreduce.apply(model, method, **options)
        return False
    tokenreduce.apply(model, method, **options)
    return True


def make_image_folder(
    root: Path,
    per_class: int,
    classes: Sequence[str] = ("class0", "class1"),
    size: tuple[int, int] | None = (48, 48),
) -> Path:
    """`root/<class>/<i>.png` random RGB images; size None gives assorted sizes (20-89 px)."""
    rng = np.random.default_rng(0)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = size or (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
            pixels = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def run_cli(
    *args: str, processes: int = 1, threads: int | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python -m tokenreduce ARGS` in a subprocess (under torchrun when processes > 1)."""
    launch = [sys.executable, "-m", "tokenreduce"]
    if processes > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launch += [f"--nproc-per-node={processes}", "-m", "tokenreduce"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    return subprocess.run(
        launch + list(args), capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def deit_small() -> torch.nn.Module:
    """A random-weight DeiT-S (224², N0 = 197): the reference model for counts and GMACs."""
    return tiny_vit("deit_small_patch16_224")


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield
