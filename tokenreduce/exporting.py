"""A reduced model out of Python: a torch.export `ExportedProgram` (.pt2) or an ONNX file
(.onnx, for ONNX Runtime, OpenVINO, TensorRT), with a dynamic batch dimension.

The forward is traced on the GPU path (`patch.attention.gpu_path`): static shapes, no per-image
loops, proportional attention's key bias as head dimensions of the fused attention kernel. That
is one graph that runs on any device, with every reduction inside it: token counts are fixed by
the method, so the exported model is as fast as the method allows wherever it runs. Only a
static reduction exports (every fixed-count method; LTMP, AS-ViT and ATS with
batching="masked").
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenreduce.api import describe
from tokenreduce.errors import InvalidOptionError, InvalidTypeError, MissingFileError
from tokenreduce.methods.base import MethodConfig, check_bool
from tokenreduce.patch import attached_engine
from tokenreduce.patch.attention import gpu_path

__all__ = [
    "FORMATS",
    "MAX_DIFFERENCE",
    "MIN_OPSET",
    "ONNX_PACKAGES",
    "TRANSLATIONS",
    "check_exportable",
    "check_exported",
    "check_onnx_packages",
    "check_suffix",
    "export",
    "exported_program",
    "onnx_max_difference",
    "program_max_difference",
]

logger = logging.getLogger(__name__)

FORMATS = {".onnx": "ONNX", ".pt2": "torch.export ExportedProgram"}
"""File suffix -> what is written."""

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
"""The `export` extra: writing ONNX (onnx, onnxscript) and running it (onnxruntime)."""

MIN_OPSET = 18
"""The oldest ONNX opset written (the translations below use opset-18 operators)."""

MAX_DIFFERENCE = 1e-4
"""The largest absolute difference (float32) accepted between a written file and PyTorch."""


def check_exportable(config: MethodConfig) -> None:
    """Refuse, in one line saying why, a reduction whose shapes follow the data: a per-image
    method (LTMP, AS-ViT, ...) on a batching that reads each image's count on the host.

    Args:
        config: the method's config, before or after it is put on a model.
    """
    batching = config.requested_batching()
    if config.per_image_counts and not batching.static:
        raise InvalidOptionError(
            f"export: {config.name} with batching={batching.value!r} reads each "
            "image's token count on the host, so its shapes follow the data and cannot be "
            "exported as one graph; accepted: batching='masked' (its static path), or a "
            "fixed-count method"
        )


def check_suffix(path: str | Path, option: str = "export") -> None:
    """Refuse in one line a file whose suffix picks no format (`FORMATS`).

    Args:
        path: the file to write.
        option: what names the file in the message (the function, or a CLI option).
    """
    given = Path(path).suffix
    if given not in FORMATS:
        raise InvalidOptionError(
            f"{option}: {str(path)!r} has suffix {given!r}; accepted: "
            + ", ".join(f"{suffix} ({what})" for suffix, what in FORMATS.items())
        )


def check_onnx_packages(purpose: str, packages: tuple[str, ...] = ONNX_PACKAGES) -> None:
    """Refuse in one line when a package of the `export` extra (onnx, onnxscript, onnxruntime)
    is missing, before any work.

    Args:
        purpose: what needs them, for the message (e.g. "export to ONNX").
        packages: the ones needed (default: all three).
    """
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingFileError(
            f"{purpose} needs {', '.join(missing)}, not installed; accepted: install them with "
            'pip install "tokenreduce[export]"'
        )


def _check_static(model: nn.Module) -> None:
    engine = attached_engine(model)
    if engine is not None:
        check_exportable(engine.config)


def _example(model: nn.Module, images: torch.Tensor | None) -> torch.Tensor:
    """Images to trace with: at least two (torch.export fixes a batch dimension of size 1)."""
    if images is None:
        height, width = describe(model).input_size
        parameter = next(model.parameters())
        return torch.randn(2, 3, height, width, device=parameter.device, dtype=parameter.dtype)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) == 0:
        raise InvalidTypeError(
            f"export: images must be a [B, 3, H, W] tensor with B >= 1, got "
            f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}"
        )
    return images if len(images) > 1 else images.expand(2, -1, -1, -1).contiguous()


def exported_program(
    model: nn.Module, images: torch.Tensor | None = None, max_batch: int = 4096
) -> torch.export.ExportedProgram:
    """The model (reduced or dense) as a torch.export `ExportedProgram` whose batch dimension is
    dynamic (1 to `max_batch`).

    Args:
        model: a model in eval mode, reduced by a static reduction or not reduced.
        images: example input [B, 3, H, W] (default: random images of the model's input size).
        max_batch: the largest batch the program accepts.
    """
    _check_static(model)
    if model.training:
        raise InvalidOptionError("export: the model is in training mode; accepted: model.eval()")
    example = _example(model, images)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with gpu_path(), torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)


def _sort_stable(self: Any, stable: bool | None = None, dim: int = -1, descending: bool = False):
    """aten.sort(stable=True) in ONNX: TopK over the whole axis, which breaks ties by the lower
    index, i.e. a stable sort (torch.onnx has no translation of the stable overload)."""
    from onnxscript import opset18 as op

    length = op.Shape(self, start=-1) if dim == -1 else op.Shape(self, start=dim, end=dim + 1)
    return op.TopK(self, length, axis=dim, largest=int(descending), sorted=1)


def _cdist_forward(x1: Any, x2: Any, p: float, compute_mode: int | None = None):
    """aten._cdist_forward (torch.cdist on small inputs) in ONNX: the p-norm of every
    difference, computed directly as torch does (no |a|^2 + |b|^2 - 2ab shortcut)."""
    from onnxscript import opset18 as op

    diff = op.Abs(op.Sub(op.Unsqueeze(x1, [-2]), op.Unsqueeze(x2, [-3])))
    if p == 1.0:
        return op.ReduceSum(diff, [-1], keepdims=0)
    if p == 2.0:
        return op.Sqrt(op.ReduceSum(op.Mul(diff, diff), [-1], keepdims=0))
    powered = op.ReduceSum(op.Pow(diff, op.CastLike(p, diff)), [-1], keepdims=0)
    return op.Pow(powered, op.CastLike(1.0 / p, diff))


TRANSLATIONS = {
    torch.ops.aten.sort.stable: _sort_stable,
    torch.ops.aten._cdist_forward.default: _cdist_forward,
}
"""ATen operators a reduction uses that torch.onnx does not translate itself."""


def export(
    model: nn.Module,
    path: str | Path,
    images: torch.Tensor | None = None,
    opset: int = MIN_OPSET,
    max_batch: int = 4096,
    check: bool = True,
) -> Path:
    """Write the model (reduced or dense) to `path`: .onnx (ONNX, opset `opset`) or .pt2 (a
    torch.export ExportedProgram, `torch.export.load` reads it). The batch dimension is dynamic.
    The file is loaded back and checked against PyTorch (`check_exported`) unless `check` is False.

    Args:
        model: a model in eval mode, reduced by a static reduction or not reduced.
        path: the file to write; its suffix picks the format (`FORMATS`).
        images: example input [B, 3, H, W] (default: random images of the model's input size).
        opset: the ONNX opset (at least `MIN_OPSET`).
        max_batch: the largest batch the exported model accepts.
        check: compare the file's outputs with PyTorch's on `images` (and on its first image)
            and raise when they differ by more than `MAX_DIFFERENCE`; ONNX needs onnxruntime.
    Returns the path written.
    """
    path = Path(path)
    check_suffix(path)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise InvalidOptionError(
            f"export: opset={opset!r} is not accepted; accepted: an int >= {MIN_OPSET}"
        )
    check_bool("export", "check", check)
    if path.suffix == ".onnx":
        # writing needs onnx and onnxscript; the check runs the file in onnxruntime
        packages = ONNX_PACKAGES if check else ONNX_PACKAGES[:2]
        check_onnx_packages(f"export to {path}" + (" with check=True" if check else ""), packages)
    parameter = next(model.parameters(), None)
    if check and parameter is not None and parameter.dtype != torch.float32:
        raise InvalidOptionError(
            f"export: check=True compares the file with PyTorch in float32 and the model is "
            f"{parameter.dtype}; accepted: a float32 model, or check=False"
        )
    example = _example(model, images)
    program = exported_program(model, example, max_batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pt2":
        torch.export.save(program, path)
    else:
        _write_onnx(program, path, opset)
    logger.info("wrote %s (%s)", path, FORMATS[path.suffix])
    if check:
        difference = check_exported(path, model, example)
        logger.info("%s: max abs difference to PyTorch %.3g", path, difference)
    return path


def check_exported(path: str | Path, model: nn.Module, images: torch.Tensor) -> float:
    """The largest absolute difference between the written file, loaded back (ONNX Runtime on
    the CPU for .onnx, `torch.export.load` for .pt2), and the model in PyTorch, on `images` and
    on its first image alone (the batch dimension is dynamic).

    Raises RuntimeError when it exceeds `MAX_DIFFERENCE`: the exporter or our translation of the
    model is wrong, not the caller's input; the file is left for inspection."""
    compare = onnx_max_difference if Path(path).suffix == ".onnx" else program_max_difference
    difference = max(compare(path, model, batch) for batch in (images, images[:1]))
    if not difference <= MAX_DIFFERENCE:
        raise RuntimeError(
            f"{path} differs from PyTorch by {difference:.3g} > {MAX_DIFFERENCE:g}; the file is "
            "left for inspection"
        )
    return difference


def _write_onnx(program: torch.export.ExportedProgram, path: Path, opset: int) -> None:
    torch.onnx.export(
        program,
        f=path,
        input_names=["images"],
        opset_version=opset,
        dynamo=True,
        external_data=False,
        custom_translation_table=TRANSLATIONS,
        verbose=False,
    )


def onnx_max_difference(path: str | Path, model: nn.Module, images: torch.Tensor) -> float:
    """The largest absolute difference between the ONNX file run in ONNX Runtime (CPU) and the
    model in PyTorch on the CPU, on `images` (float32)."""
    try:
        import onnxruntime
    except ImportError as err:
        raise MissingFileError(
            "running an ONNX file needs onnxruntime: pip install 'tokenreduce[export]'"
        ) from err
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images = images.detach().float().cpu()
    outputs = session.run(None, {name: images.numpy()})
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type != "cpu":
        # the same kernels as ONNX Runtime's: a GPU's (TF32 convolutions) differ by more
        model = copy.deepcopy(model).cpu()
    with torch.no_grad():
        expected = model(images)
    expected = torch.utils._pytree.tree_leaves(expected)
    return max(
        float((torch.from_numpy(got) - want.float().cpu()).abs().max())
        for got, want in zip(outputs, expected, strict=True)
    )


def program_max_difference(path: str | Path, model: nn.Module, images: torch.Tensor) -> float:
    """The largest absolute difference between the ExportedProgram file (.pt2) loaded back with
    `torch.export.load` and the model in PyTorch, on `images`."""
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        got = torch.utils._pytree.tree_leaves(loaded(images))
        expected = torch.utils._pytree.tree_leaves(model(images))
    return max(
        float((a.float() - b.float()).abs().max()) for a, b in zip(got, expected, strict=True)
    )
