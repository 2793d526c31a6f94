"""Images preprocessed for a model: files, and real photographs from installed packages."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config
from torch import nn

from tokenreduce.errors import InvalidOptionError, MissingFileError

# Real photographs inside the scikit-image and matplotlib wheels (licences: skimage.data
# docstrings; matplotlib's sample_data). No download is involved.
PACKAGED_PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/motorcycle_left.png"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)


def packaged_photos() -> list[Path]:
    """Paths of the real photographs available from installed packages."""
    found = []
    for package, relative in PACKAGED_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if path.is_file():
            found.append(path)
    if not found:
        raise MissingFileError(
            "no sample photographs found: they come from scikit-image and matplotlib; install "
            "them with: pip install 'tokenreduce[offline]' (or pass your own image files)"
        )
    return found


def open_rgb(path: str | Path) -> Image.Image:
    """An image file as RGB; a missing or unreadable file is reported by name."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise InvalidOptionError(f"image file {path} could not be read: {err}") from err


def eval_transform(model: nn.Module, **overrides: object):
    """timm's evaluation transform for `model` (its pretrained config, with overrides)."""
    config = resolve_data_config({k: v for k, v in overrides.items() if v is not None}, model=model)
    return create_transform(**config, is_training=False), config


def load_images(paths: Sequence[str | Path], model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Images preprocessed for `model` [B, 3, H, W], and the same crops unnormalised in [0, 1]
    for display."""
    transform, config = eval_transform(model)
    batch = torch.stack([transform(open_rgb(p)) for p in paths])
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    return batch, (batch * std + mean).clamp(0, 1)
