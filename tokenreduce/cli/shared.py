"""Options shared by several commands, and the steps they share: loading the model, building
the dataset, checking numbers, printing and writing results."""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenreduce import calibrate, data, models
from tokenreduce.bench import NOISY_SPREAD
from tokenreduce.errors import InvalidOptionError
from tokenreduce.methods.base import MethodConfig, make_config
from tokenreduce.methods.learned import LearnedConfig
from tokenreduce.options import MethodSpec, format_spec
from tokenreduce.patch import adapter_for
from tokenreduce.recipe import check_recipe_model, is_recipe_path, read_recipe
from tokenreduce.report import check_output_file, format_table, write_results

__all__ = [
    "AMP_DTYPES",
    "DEMO_MODEL",
    "INTERPOLATIONS",
    "MAX_IMG_SIZE",
    "RESULTS_FORMATS",
    "WEIGHTS",
    "add_amp_args",
    "add_data_args",
    "add_matching_args",
    "add_model_args",
    "add_results_args",
    "add_results_format",
    "add_timing_args",
    "add_zero_shot",
    "amp_dtype",
    "available_devices",
    "check_at_least",
    "check_device",
    "check_matching",
    "check_needs",
    "check_ratio",
    "check_recipes",
    "check_results_file",
    "check_timing",
    "image_folder",
    "load_model",
    "method_configs",
    "print_results",
    "readable_images",
    "readable_images_and_labels",
    "real_weights",
    "replaced_by_matching",
    "warn_untrained",
    "weights_label",
]


logger = logging.getLogger("tokenreduce.cli")

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
DEMO_MODEL = "vit_small_patch14_dinov2.imgfocus"
RESULTS_FORMATS = ("json", "csv")
MAX_IMG_SIZE = 4096
"""Largest --img-size: beyond it a ViT's token count and attention exceed any machine's memory."""
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos")
WEIGHTS = ("auto", "pretrained", "random")
"""--weights choices (every command that loads a model takes them)."""


def add_model_args(
    parser: argparse.ArgumentParser, default_model: str, random_by_default: bool = False
) -> None:
    """-m/--model, --checkpoint, weights, --img-size, --num-classes, --head, --threads."""
    parser.add_argument(
        "-m",
        "--model",
        default=default_model,
        help="timm model name, an offline model, hf:PATH (a transformers folder written by "
        "save_pretrained) or open_clip:ARCH (with --checkpoint FILE)",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="local weights file (.safetensors/.pth; open_clip's "
        "state dict of the whole model with open_clip:ARCH)",
    )
    fallback = "random" if random_by_default else "pretrained"
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="auto",
        help="auto: the model's own local weights when it has them (--checkpoint, an offline "
        f"model, the weight files of an hf:PATH folder), else {fallback}"
        + (" (speed does not depend on the weights)" if random_by_default else "")
        + "; pretrained: those, or timm's hub weights (network); random: random initialisation",
    )
    parser.set_defaults(weights_fallback=fallback)
    parser.add_argument("--img-size", type=int, default=None, help="input resolution")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier classes")
    parser.add_argument("--head", default=None, help="linear head file (weight, bias)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def add_data_args(parser: argparse.ArgumentParser, batch_size: int | None = 64) -> None:
    """Batching, loading and preprocessing of an ImageFolder."""
    parser.add_argument(
        "-b", "--batch-size", type=int, default=batch_size, help="images per forward pass"
    )
    parser.add_argument("-j", "--workers", type=int, default=2, help="data loading processes")
    parser.add_argument(
        "--crop-pct", type=float, default=None, help="center-crop fraction in (0, 1]"
    )
    parser.add_argument(
        "--interpolation",
        default=None,
        choices=INTERPOLATIONS,
        help="resize interpolation; default: the model's pretrained config",
    )
    parser.add_argument(
        "--mean", type=float, nargs=3, default=None, help="normalisation mean; default: model's"
    )
    parser.add_argument(
        "--std", type=float, nargs=3, default=None, help="normalisation std; default: model's"
    )
    parser.add_argument(
        "--num-samples", type=int, default=None, help="evenly spaced subset of the images"
    )
    parser.add_argument(
        "--class-map",
        default=None,
        help="class names in label order (.txt one per line, or .json); default: sorted folders",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_amp_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--amp", action="store_true", help="autocast mixed precision")
    parser.add_argument(
        "--amp-dtype",
        default=None,
        choices=sorted(AMP_DTYPES),
        help="dtype with --amp (default with --amp: bfloat16)",
    )


def add_timing_args(parser: argparse.ArgumentParser, warm: int | None, bench: int | None) -> None:
    """Timing rounds; None: the command sets them (demo: 3 / 10, 1 / 1 with --quick)."""
    parser.add_argument(
        "--num-warm-iter",
        type=int,
        default=warm,
        help="untimed rounds before timing" + ("" if warm is not None else " (default 3)"),
    )
    parser.add_argument(
        "--num-bench-iter",
        type=int,
        default=bench,
        help="timed rounds, each one dense then one reduced forward"
        + ("" if bench is not None else " (default 10)"),
    )


def add_results_args(parser: argparse.ArgumentParser, fmt: str = "json") -> None:
    parser.add_argument("--results-file", default=None, help="write every result field here")
    add_results_format(parser, fmt)


def add_results_format(parser: argparse.ArgumentParser, fmt: str) -> None:
    parser.add_argument(
        "--results-format", default=fmt, choices=RESULTS_FORMATS, help="format of the results file"
    )


def real_weights(args: argparse.Namespace) -> bool:
    """Whether --weights asks for real weights; auto: the model's own local weights when it has
    them, else the command's fallback (bench: random, the others: pretrained)."""
    if args.weights == "auto":
        return models.own_weights(args.model, args.checkpoint) or args.weights_fallback != "random"
    return args.weights == "pretrained"


def weights_label(args: argparse.Namespace) -> str:
    return args.checkpoint or ("real weights" if real_weights(args) else "RANDOM weights")


def load_model(args: argparse.Namespace) -> nn.Module:
    """The model of the model options, checked to be one tokenreduce supports."""
    check_at_least(args, {"threads": 1, "img_size": 1, "num_classes": 0})
    if args.img_size is not None and args.img_size > MAX_IMG_SIZE:
        raise InvalidOptionError(
            f"--img-size={args.img_size} is not accepted; accepted: at most {MAX_IMG_SIZE}"
        )
    if args.head and args.num_classes is not None:
        raise InvalidOptionError(
            f"--head {args.head} with --num-classes {args.num_classes}: the head file sets the "
            "classes; accepted: one of the two"
        )
    if args.weights == "random" and args.checkpoint:
        raise InvalidOptionError(
            f"--weights random with --checkpoint {args.checkpoint}: the checkpoint would replace "
            "the random weights; accepted: one of the two"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {
        k: v
        for k, v in (("img_size", args.img_size), ("num_classes", args.num_classes))
        if v is not None
    }
    logger.info("loading %s ...", args.model)
    model = models.load(
        args.model, args.checkpoint, pretrained=real_weights(args), head=args.head, **kwargs
    )
    adapter_for(model)  # an unsupported model is refused before any work
    # method specs: --method, and compare's --config
    specs = [*(getattr(args, "method", None) or []), *(getattr(args, "config", None) or [])]
    check_recipes(specs, model)
    return model


def check_recipes(specs: Sequence[str], model: nn.Module) -> None:
    """Every --method that names a recipe file was tuned for `model` (else one line)."""
    for spec in specs:
        if isinstance(spec, str) and is_recipe_path(spec):
            check_recipe_model(spec, read_recipe(spec), adapter_for(model).describe(model))


def add_zero_shot(args: argparse.Namespace, model: nn.Module, classes: list[str]) -> None:
    """An open_clip tower (-m open_clip:ARCH) gets zero-shot classifier weights for `classes`,
    from the same architecture and checkpoint's text tower, so that it gives class logits."""
    family, _, arch = args.model.partition(":")
    if family != "open_clip":
        return
    from tokenreduce.patch.openclip import set_zero_shot_weights

    logger.info("zero-shot classifier of %s for %d class names ...", args.model, len(classes))
    weights = models.open_clip_zero_shot(arch, args.checkpoint, real_weights(args), classes)
    set_zero_shot_weights(model, weights)


def available_devices() -> list[str]:
    """The torch devices this machine has: cpu, and cuda, cuda:0 ... when CUDA GPUs are present."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(count)] if count else [])


def check_device(option: str, device: str) -> None:
    """A torch device string that names a device this machine has; refused in one line that
    lists the devices it has."""
    available = available_devices()
    accepted = f"accepted on this machine: {', '.join(available)}"
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise InvalidOptionError(
            f"{option}={device!r} is not accepted: not a torch device; {accepted}"
        ) from err
    if parsed.type == "cuda" and len(available) == 1:
        raise InvalidOptionError(
            f"{option}={device!r} is not accepted: no CUDA GPU is available; {accepted}"
        )
    if parsed.type not in ("cpu", "cuda") or (
        parsed.type == "cuda"
        and parsed.index is not None
        and f"cuda:{parsed.index}" not in available
    ):
        raise InvalidOptionError(f"{option}={device!r} is not accepted; {accepted}")


def check_at_least(args: argparse.Namespace, minimums: dict[str, int]) -> None:
    """Each option (attribute name) that is set must be >= its minimum; lists element-wise."""
    for option, minimum in minimums.items():
        value = getattr(args, option, None)
        values = value if isinstance(value, list) else [value]
        bad = next((v for v in values if v is not None and v < minimum), None)
        if bad is not None:
            raise InvalidOptionError(
                f"--{option.replace('_', '-')}={bad} is not accepted; accepted: >= {minimum}"
            )


def check_needs(args: argparse.Namespace, pairs: Sequence[tuple[str, str]]) -> None:
    """An option given without the one it acts with would be ignored: refuse it."""
    for option, partner in pairs:
        if getattr(args, option, None) is not None and not getattr(args, partner, None):
            flag, other = (f"--{name.replace('_', '-')}" for name in (option, partner))
            raise InvalidOptionError(
                f"{flag}={getattr(args, option)} acts only with {other}, which is not given"
            )


def check_results_file(args: argparse.Namespace) -> None:
    """--results-file writable, and its suffix (if .csv/.json) the --results-format."""
    check_output_file("--results-file", args.results_file)
    suffix = Path(args.results_file).suffix.lstrip(".") if args.results_file else ""
    if suffix in RESULTS_FORMATS and suffix != args.results_format:
        raise InvalidOptionError(
            f"--results-file={args.results_file} with --results-format {args.results_format}; "
            f"accepted: a .{args.results_format} file, or --results-format {suffix}"
        )


def amp_dtype(args: argparse.Namespace) -> torch.dtype:
    return AMP_DTYPES[args.amp_dtype or "bfloat16"]


def check_timing(args: argparse.Namespace) -> None:
    check_needs(args, [("amp_dtype", "amp")])
    check_at_least(args, {"num_warm_iter": 0, "num_bench_iter": 1, "batch_size": 1})


def add_matching_args(parser: argparse.ArgumentParser, target: str, images: str) -> None:
    """--gmacs-ratio (a fraction of `target`, matched on `images`) and --calib-images."""
    parser.add_argument(
        "--gmacs-ratio",
        type=float,
        default=None,
        help=f"set each method's strength to this fraction of {target} (matched on {images}) "
        "instead of its given value",
    )
    parser.add_argument(
        "--calib-images",
        type=int,
        default=None,
        help="images --gmacs-ratio is matched on (default with --gmacs-ratio: 32)",
    )


def check_matching(args: argparse.Namespace) -> None:
    """--gmacs-ratio in (0, 1]; --calib-images only with it, >= 1, default 32."""
    check_ratio(args.gmacs_ratio)
    check_needs(args, [("calib_images", "gmacs_ratio")])
    args.calib_images = 32 if args.calib_images is None else args.calib_images
    check_at_least(args, {"calib_images": 1})


def check_ratio(ratio: float | None) -> None:
    if ratio is not None and not 0 < ratio <= 1:
        raise InvalidOptionError(
            f"--gmacs-ratio={ratio} is not accepted; accepted: a number in (0, 1]"
        )


def image_folder(args: argparse.Namespace, model: nn.Module, root: str) -> data.ImageFolder:
    """The ImageFolder at `root`, preprocessed for `model` with the data options' overrides."""
    check_at_least(args, {"workers": 0, "num_samples": 1, "batch_size": 1})
    for option, values, low in (("--mean", args.mean, None), ("--std", args.std, 0.0)):
        if values is not None and not all(
            math.isfinite(v) and (low is None or v > low) for v in values
        ):
            accepted = "finite numbers > 0" if low is not None else "finite numbers"
            raise InvalidOptionError(
                f"{option} {' '.join(map(str, values))} is not accepted; accepted: three {accepted}"
            )
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise InvalidOptionError(
            f"--crop-pct={args.crop_pct} is not accepted; accepted: a number in (0, 1]"
        )
    transform, config = data.eval_transform(
        model,
        input_size=(3, args.img_size, args.img_size) if args.img_size else None,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None,
    )
    classes = data.read_class_map(args.class_map) if args.class_map else None
    dataset = data.ImageFolder(root, transform, args.num_samples, classes)
    logger.info(
        "%d images, %d classes from %s; preprocessing %s",
        len(dataset),
        len(dataset.classes),
        root,
        ", ".join(f"{k}={v}" for k, v in config.items()),
    )
    return dataset


def readable_images(dataset: data.ImageFiles, indices: Sequence[int], purpose: str) -> torch.Tensor:
    """The images at `indices` stacked [K, 3, H, W]; unreadable ones are named and left out."""
    return readable_images_and_labels(dataset, indices, purpose)[0]


def readable_images_and_labels(
    dataset: data.ImageFiles, indices: Sequence[int], purpose: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`readable_images` and the labels of the same images [K] (each decoded once)."""
    items = [dataset[i] for i in indices]
    for _, _, index, ok in items:
        if not ok:
            logger.warning(
                "unreadable image left out of %s: %s", purpose, dataset.samples[index][0]
            )
    readable = [(image, label) for image, label, _, ok in items if ok]
    if not readable:
        raise InvalidOptionError(f"no readable image for {purpose} in {len(items)} tried")
    images, labels = zip(*readable, strict=True)
    return torch.stack(images), torch.tensor(labels)


def replaced_by_matching(config: MethodConfig, options: dict[str, object]) -> list[str]:
    """What of the given options GMACs matching overwrites: the strength option, and for a
    threshold file the per-layer values it held of that kind."""
    strength = type(config).strength
    if strength is None:
        return []
    if isinstance(config, LearnedConfig) and config.trained_for is not None:
        source = json.loads(config.trained_for)["file"]
        return [f"the per-layer {strength.option} read from threshold file {source}"]
    return [strength.option] if strength.option in options else []


def method_configs(
    args: argparse.Namespace,
    specs: Sequence[MethodSpec],
    model: nn.Module,
    dataset: data.ImageFiles,
    given: Sequence[str],
    spread: bool = False,
) -> list[MethodConfig]:
    """The configs of the --method specs; with --gmacs-ratio, each one's strength matched to
    that fraction of `model`'s dense GMACs on --calib-images images of `dataset`, the first ones
    or, with `spread`, evenly spaced over it (saying which given options the matching
    replaces). given: the --method texts."""
    configs = [make_config(name, **options) for name, options in specs]
    if args.gmacs_ratio is None:
        warn_untrained(configs, given)
        return configs
    count = min(args.calib_images, len(dataset))
    indices = range(count)
    if spread:
        indices = data.evenly_spaced(list(range(len(dataset))), count)
    images = readable_images(dataset, indices, "--gmacs-ratio matching")
    for (name, options), config in zip(specs, configs, strict=True):
        replaced = replaced_by_matching(config, options)
        if replaced:
            logger.warning(
                "--gmacs-ratio %s replaces %s (--method %s) by one value matched to the ratio",
                args.gmacs_ratio,
                " and ".join(replaced),
                format_spec(name, options),
            )
    return [
        calibrate.match_gmacs(model, config, args.gmacs_ratio, images).config for config in configs
    ]


def warn_untrained(configs: Sequence[object], specs: Sequence[str]) -> None:
    """A learned method given no thresholds runs as the dense model: say so."""
    for config, spec in zip(configs, specs, strict=True):
        if isinstance(config, LearnedConfig) and not config.has_thresholds:
            logger.warning(
                "--method %s has no thresholds (a thresholds=FILE from tokenreduce train, or "
                "values): it keeps every token, the dense model's cost",
                spec,
            )


def print_results(
    rows: Sequence[dict[str, Any]], columns: str, path: str | Path | None, fmt: str
) -> None:
    """The human table of `columns` (space-separated field names) on stdout; every field to
    `path` (CSV/JSON) when given."""
    print(format_table(rows, columns.split()))
    noisy = [row for row in rows if row.get("noisy")]
    if noisy:
        print(
            f"NOISY: {len(noisy)} of {len(rows)} timings are not to be trusted: the dense "
            f"model's own rounds spread more than {NOISY_SPREAD:.0%} (a busy machine), or it ran "
            "once (no spread to judge by) — re-run them with more rounds on a quiet machine"
        )
    if path:
        write_results(rows, path, fmt)
        print(f"results written to {path}")
