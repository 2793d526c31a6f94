"""Images for a model: files, image folders with class maps, evaluation transforms, and real
photographs from installed packages."""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config
from torch import nn
from torch.utils.data import Dataset

from tokenreduce.api import describe
from tokenreduce.errors import InvalidOptionError, InvalidTypeError, MissingFileError

__all__ = [
    "IMAGE_SUFFIXES",
    "PACKAGED_PHOTOS",
    "ImageFiles",
    "ImageFolder",
    "check_folder",
    "eval_transform",
    "evenly_spaced",
    "load_images",
    "open_rgb",
    "packaged_photos",
    "read_class_map",
]


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
    if path.is_dir():
        raise InvalidOptionError(f"image file {path} is a folder; accepted: an image file")
    if not path.is_file():
        raise MissingFileError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise InvalidOptionError(f"image file {path} could not be read: {err}") from err


def eval_transform(
    model: nn.Module, **overrides: object
) -> tuple[Callable[[Image.Image], torch.Tensor], dict[str, Any]]:
    """timm's evaluation transform for `model` (its pretrained config, with overrides), and the
    resolved config. The input size is the model's own (e.g. built with another img_size than
    its pretrained config's) unless overridden."""
    given = {k: v for k, v in overrides.items() if v is not None}
    given.setdefault("input_size", (3, *describe(model).input_size))
    config = resolve_data_config(given, model=model)
    return create_transform(**config, is_training=False), config


def load_images(paths: Sequence[str | Path], model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Images preprocessed for `model` [B, 3, H, W], and the same crops unnormalised in [0, 1]
    for display."""
    transform, config = eval_transform(model)
    batch = torch.stack([transform(open_rgb(p)) for p in paths])
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    return batch, (batch * std + mean).clamp(0, 1)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def read_class_map(path: str | Path) -> list[str]:
    """Class names in label order from a .txt file (one per line, as timm's --class-map) or a
    .json file (a list of names, or {name: index})."""
    path = Path(path)
    if path.is_dir():
        raise InvalidOptionError(
            f"class map file {path} is a folder; accepted: a .txt or .json file"
        )
    if not path.is_file():
        raise MissingFileError(f"class map file not found: {path}")
    try:
        if path.suffix == ".json":
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                loaded = sorted(loaded, key=loaded.__getitem__)
        else:
            loaded = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, TypeError) as err:  # TypeError: {name: index} not comparable
        raise InvalidOptionError(f"class map file {path} could not be read: {err}") from err
    if not isinstance(loaded, list) or not all(isinstance(n, str) for n in loaded):
        raise InvalidOptionError(f"class map file {path} must list class names in label order")
    if not loaded:
        raise InvalidOptionError(
            f"class map file {path} lists no classes; accepted: one class name per line (.txt), "
            "or a .json list of names or {name: index}"
        )
    repeated = sorted({name for name in loaded if loaded.count(name) > 1})
    if repeated:
        raise InvalidOptionError(f"class map file {path} names {repeated} more than once")
    return loaded


def check_folder(root: object, transform: object, num_samples: object) -> Path:
    """The dataset folder `root` as a Path, with the transform and num_samples checked."""
    if not isinstance(root, (str, Path)):
        raise InvalidTypeError(f"root must be a folder path, got {type(root).__name__}")
    root = Path(root)
    if root.is_file():
        raise InvalidOptionError(f"dataset folder {root} is a file; accepted: a folder")
    if not root.is_dir():
        raise MissingFileError(f"dataset folder not found: {root}")
    if not callable(transform):
        raise InvalidTypeError(f"transform must be callable, got {type(transform).__name__}")
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
    ):
        raise InvalidOptionError(
            f"num_samples={num_samples!r} is not accepted; accepted: an int >= 1, or None"
        )
    return root


logger = logging.getLogger(__name__)


def subset(samples: list, num_samples: int | None, root: Path) -> list:
    """`evenly_spaced(samples, num_samples)`, saying in one line when the folder `root` has
    fewer images than asked for (then all of them are used)."""
    if num_samples is not None and num_samples > len(samples):
        count = len(samples)
        logger.warning(
            "%d images asked for, %s has %d: using all %d", num_samples, root, count, count
        )
    return evenly_spaced(samples, num_samples)


def evenly_spaced(samples: list, num_samples: int | None) -> list:
    """`num_samples` items evenly spaced over `samples` (all of them when None or more)."""
    if num_samples is None or num_samples >= len(samples):
        return samples
    stride = len(samples) / num_samples
    return [samples[int(i * stride)] for i in range(num_samples)]


class ImageFiles(Dataset):
    """Every image file under `root` (its sub-folders too), sorted by path, with label 0: images
    without classes (e.g. for dense outputs). Items are (image, 0, index, ok) as `ImageFolder`'s.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], torch.Tensor],
        num_samples: int | None = None,
    ):
        root = check_folder(root, transform, num_samples)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InvalidOptionError(
                f"folder {root} has no images ({', '.join(IMAGE_SUFFIXES)}) in it or below it"
            )
        self.samples = subset([(path, 0) for path in files], num_samples, root)
        self.transform = transform
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, bool]:
        path, label = self.samples[index]
        try:
            image = open_rgb(path)
        except (ValueError, FileNotFoundError):
            return torch.zeros(self.sample_shape()), label, index, False
        return self.transform(image), label, index, True

    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed image (from a blank image through the transform)."""
        if self._shape is None:
            self._shape = tuple(self.transform(Image.new("RGB", (32, 32))).shape)
        return self._shape


class ImageFolder(ImageFiles):
    """`root/<class>/<image>` files. Labels follow `classes` (e.g. from `read_class_map`), or the
    sorted folder names (torchvision's order); files are sorted by name.

    An unreadable image is not fatal: its item carries `ok = False` (a zero image), so that it is
    reported by name, counted, and left out of the accuracy.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], torch.Tensor],
        num_samples: int | None = None,
        classes: Sequence[str] | None = None,
    ):
        root = check_folder(root, transform, num_samples)
        if classes is not None and len(set(classes)) != len(classes):
            raise InvalidOptionError("classes names a class more than once")
        folders = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not folders:
            raise InvalidOptionError(
                f"dataset folder {root} has no class sub-folders (root/<class>/*)"
            )
        if classes is not None:
            unknown = sorted(set(folders) - set(classes))
            if unknown:
                raise InvalidOptionError(
                    f"class folders {unknown} in {root} are not in the class map"
                )
        self.classes = list(classes) if classes is not None else folders
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            if (root / name).is_dir()
            for path in sorted((root / name).iterdir())
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.samples:
            raise InvalidOptionError(
                f"dataset folder {root} has no images ({', '.join(IMAGE_SUFFIXES)}) in its class "
                "folders"
            )
        # evenly spaced over the sorted list, so that every class is represented
        self.samples = subset(self.samples, num_samples, root)
        self.transform = transform
        self._shape = None
