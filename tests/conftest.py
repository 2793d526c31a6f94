"""Shared test helpers: offline timm models and the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

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


def tiny_vit(name: str = "deit_tiny_patch16_224", seed: int = 0, **kwargs) -> torch.nn.Module:
    """A random-weight timm model (no download), in eval mode."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield
