"""What the methods with learned thresholds (LTMP, AS-ViT) share: per-layer threshold options,
the threshold file, trainable threshold parameters and the per-image batching
(docs/methods.md §1.6).

Each such method names its per-layer threshold vectors (`kinds`, also its option names). Options
accept one number for every reducing layer, one per reducing layer, or — through `thresholds` —
a tensor or a file written by `tokenreduce train`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from tokenreduce.batching import Batching
from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError, MissingFileError
from tokenreduce.methods.base import (
    BlockRecord,
    MethodConfig,
    RecordT,
    check_bool,
    check_layers_type,
    clamped,
    resolve_layers,
)
from tokenreduce.ops.packing import Packing, pack_kept

__all__ = [
    "MODEL_FACTS",
    "THRESHOLD_FORMAT",
    "LearnedConfig",
    "LearnedRecord",
    "Step",
    "ThresholdParameters",
    "ThresholdSource",
    "ThresholdValues",
    "check_threshold_values",
    "describe_facts",
    "metadata_object",
    "model_facts",
    "read_threshold_file",
    "write_threshold_file",
]


THRESHOLD_FORMAT = "tokenreduce-thresholds/1"

Step = dict[str, float | torch.Tensor]
"""A reducing block's thresholds by kind: floats at inference, 0-d tensors while training."""


ThresholdValues = float | Sequence[float] | torch.Tensor
"""One threshold for every reducing layer, or one per reducing layer."""
ThresholdSource = str | Path | torch.Tensor
"""A threshold file written by `tokenreduce train`, or a [kinds, S] tensor."""


def _as_tensor_if_array(value: object) -> object:
    """A numpy array or scalar (anything with `__array__` but a tensor) as a tensor; other values
    as they are, so that arrays are accepted wherever tensors are."""
    if hasattr(value, "__array__") and not isinstance(value, torch.Tensor):
        try:
            tensor = torch.as_tensor(value)
        except TypeError as err:  # an array of strings or objects
            raise InvalidOptionError(
                f"thresholds: an array of dtype {getattr(value, 'dtype', '?')} is not accepted; "
                "accepted: numbers, or a floating-point array or tensor of them"
            ) from err
        return tensor.item() if tensor.dim() == 0 else tensor
    return value


def check_threshold_values(method: str, option: str, value: object) -> float | tuple[float, ...]:
    """One finite number, or a 1-d sequence/tensor/array of them, as a float or a tuple of
    floats."""
    value = _as_tensor_if_array(value)
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise InvalidOptionError(
                f"{method}: option {option} is a tensor of shape {tuple(value.shape)}; accepted: "
                "a number or a 1-d tensor with one threshold per reducing layer"
            )
        if not value.is_floating_point():  # a bool mask's 0/1 are no thresholds
            raise InvalidOptionError(
                f"{method}: option {option} is a tensor of dtype {value.dtype}; accepted: a "
                "floating-point tensor of thresholds (e.g. torch.tensor([0.5, 0.3]))"
            )
        value = value.detach().double().cpu().tolist()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    numbers = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
    if numbers and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        return tuple(float(v) for v in value)
    raise InvalidOptionError(
        f"{method}: option {option}={value!r} is not accepted; accepted: a finite number (every "
        "reducing layer), a sequence or 1-d tensor with one per reducing layer"
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


MODEL_FACTS = ("name", "depth", "embed_dim", "num_tokens")
"""What a threshold file records of the model it was trained for, and `apply` checks."""


def model_facts(dims: ModelDims) -> dict[str, str | int]:
    """The facts of a model that a threshold file records (`MODEL_FACTS`)."""
    return {
        "name": dims.model_name,
        "depth": dims.depth,
        "embed_dim": dims.embed_dim,
        "num_tokens": dims.num_tokens,
    }


def describe_facts(facts: dict[str, Any]) -> str:
    name = facts.get("name") or "unnamed model"
    return (
        f"{name} (depth {facts.get('depth')}, width {facts.get('embed_dim')}, "
        f"{facts.get('num_tokens')} tokens)"
    )


def read_threshold_file(path: str | Path, method: str, kinds: Sequence[str]) -> tuple[dict, dict]:
    """Threshold vectors {kind: tuple} and metadata of a file written by `tokenreduce train`."""
    from safetensors import SafetensorError, safe_open

    if str(path) == "":  # Path("") is the current folder
        raise InvalidOptionError(
            "threshold file '' is an empty path; accepted: the path of a threshold file "
            "(.safetensors) written by tokenreduce train"
        )
    path = Path(path)
    if path.is_dir():
        files = sorted(entry.name for entry in path.glob("*.safetensors"))
        held = f" (it holds {', '.join(files)})" if files else ""
        raise InvalidOptionError(
            f"threshold file {str(path)!r} is a folder{held}; accepted: the path of a threshold "
            "file (.safetensors) written by tokenreduce train"
        )
    if not path.is_file():
        raise MissingFileError(
            f"threshold file {str(path)!r} does not exist; accepted: the path of a threshold "
            "file (.safetensors) written by tokenreduce train"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as error:
        raise InvalidOptionError(
            f"threshold file {str(path)!r} is not a safetensors file written by tokenreduce train "
            f"({error})"
        ) from error
    if metadata.get("format") != THRESHOLD_FORMAT:
        raise InvalidOptionError(
            f"threshold file {str(path)!r} has format {metadata.get('format')!r}; accepted: "
            f"{THRESHOLD_FORMAT!r} (a file written by tokenreduce train)"
        )
    if metadata.get("method") != method:
        raise InvalidOptionError(
            f"threshold file {str(path)!r} holds thresholds of method {metadata.get('method')!r}, "
            f"not {method!r}"
        )
    if sorted(tensors) != sorted(kinds):
        raise InvalidOptionError(
            f"threshold file {str(path)!r} holds {sorted(tensors)}; method {method!r} needs "
            f"{sorted(kinds)}"
        )
    lengths = {tensor.shape for tensor in tensors.values()}
    values = {}
    for kind, tensor in tensors.items():
        if tensor.dim() != 1 or len(lengths) != 1 or not torch.isfinite(tensor).all():
            raise InvalidOptionError(
                f"threshold file {str(path)!r}: {kind} must be a finite 1-d tensor, one per "
                f"reducing layer, all of the same length; got shapes {sorted(lengths)}"
            )
        values[kind] = tuple(tensor.double().tolist())
    return values, metadata


def metadata_object(
    path: str | Path,
    metadata: dict[str, str],
    key: str,
    what: str = "threshold file",
    written: str = "a file written by tokenreduce train",
) -> dict[str, Any]:
    """A safetensors file's metadata entry `key` read as a JSON object ({} where absent), or
    InvalidOptionError naming the file (as `what`), the key and what is accepted (`written`)."""
    try:
        value = json.loads(metadata.get(key, "{}"))
    except json.JSONDecodeError as err:
        raise InvalidOptionError(
            f"{what} {str(path)!r}: metadata {key!r} is not valid JSON ({err}); accepted: {written}"
        ) from err
    if not isinstance(value, dict):
        raise InvalidOptionError(
            f"{what} {str(path)!r}: metadata {key!r} holds a JSON {type(value).__name__}, not "
            f"an object; accepted: {written}"
        )
    return value


def write_threshold_file(
    path: str | Path, config: LearnedConfig, dims: ModelDims, metadata: dict[str, Any]
) -> Path:
    """Save the config's thresholds with the method, its options and `metadata` (JSON values).
    The file gets the permissions of any other output (safetensors' save_file would create it
    readable by its owner only)."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vectors = config.threshold_vectors(dims)
    tensors = {kind: torch.tensor(values, dtype=torch.float64) for kind, values in vectors.items()}
    options = {
        key: value
        for key, value in config.options().items()
        if key not in config.kinds and key not in ("thresholds", "transfer")
    }
    options["layers"] = list(config.reduce_layers(dims))
    header = {
        "format": THRESHOLD_FORMAT,
        "method": config.name,
        "options": json.dumps(options),
        "model_facts": json.dumps(model_facts(dims)),
        **{key: json.dumps(value) for key, value in metadata.items()},
    }
    path.write_bytes(save(tensors, metadata=header))
    return path


class ThresholdParameters(nn.Module):
    """Trainable thresholds, one vector per kind (one entry per reducing layer)."""

    def __init__(self, vectors: dict[str, Sequence[float]]) -> None:
        super().__init__()
        self.values = nn.ParameterDict(
            {kind: nn.Parameter(torch.tensor(v)) for kind, v in vectors.items()}
        )

    def vectors(self) -> dict[str, tuple[float, ...]]:
        return {kind: tuple(p.detach().double().tolist()) for kind, p in self.values.items()}


@dataclass(frozen=True)
class LearnedRecord(BlockRecord):
    """overflow: [B] tokens the thresholds kept beyond `max_tokens` (dropped); only recorded
    when `max_tokens` is set."""

    overflow: torch.Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class LearnedConfig(MethodConfig[RecordT]):
    """Options shared by methods with learned per-image thresholds.

    tau: temperature of the soft masks in training. batching, how images with different counts
    share a batch (docs/architecture.md, "Per-image token counts"):
    - "auto" (default): "ragged" — the fastest correct path measured at every batch size; at
      batch 1, and whenever every image keeps the same count, there is no padding at all;
    - "ragged": kept tokens packed to the batch's largest count for attention and the method's
      decisions, while per-token work (norms, qkv, proj, MLP) runs on the real tokens only;
    - "packed": kept tokens packed to the batch's largest count, every op on the padded batch;
    - "masked": static shapes with padding slots (no host sync, compiles with fullgraph).
    ragged and packed read the B counts from the device once per reducing block (ragged: once
    more, to build its flat layout); masked reads nothing. max_tokens (masked only): a static
    cap on the tokens after each reducing block; an image above it drops its lowest-score
    surplus, counted in `info.records.overflow`.
    """

    learned: ClassVar[bool] = True
    trainable: ClassVar[bool] = True
    per_image_counts: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]]
    train_init: ClassVar[dict[str, float]]
    train_lr: ClassVar[dict[str, float]]
    clamp: ClassVar[tuple[float, float | None]] = (0.0, None)

    layers: tuple[int, ...] | None = None
    tau: float = 0.1
    batching: str = "auto"
    max_tokens: int | None = None
    transfer: bool = False
    trained_for: str | None = field(default=None, repr=False, metadata={"internal": True})
    """JSON of the threshold file's path and recorded model facts, set when thresholds come from
    a file; `validate` refuses a model with other facts unless `transfer=True`."""
    tensor_shape: tuple[int, ...] | None = field(
        default=None, repr=False, metadata={"internal": True}
    )
    """The shape of the `thresholds` tensor the vectors came from, so that a misfit names it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        # every learned method has a `thresholds` option (a source or values): arrays are tensors
        object.__setattr__(self, "thresholds", _as_tensor_if_array(self.thresholds))
        check_layers_type(self.name, self.layers)
        check_bool(self.name, "transfer", self.transfer)
        tau = self.tau
        number = isinstance(tau, (int, float)) and not isinstance(tau, bool)
        if not number or not math.isfinite(tau) or tau <= 0:
            raise InvalidOptionError(
                f"{self.name}: option tau={self.tau!r} is not accepted; accepted: a number > 0"
            )
        if self.batching not in Batching.names():
            raise InvalidOptionError(
                f"{self.name}: option batching={self.batching!r} is not accepted; accepted: "
                f"{Batching.names()}"
            )
        if self.max_tokens is not None:
            if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
                ok = False
            else:
                ok = self.max_tokens >= 1 and self.batching == "masked"
            if not ok:
                raise InvalidOptionError(
                    f"{self.name}: option max_tokens={self.max_tokens!r} (batching="
                    f"{self.batching!r}) is not accepted; accepted: None, or a positive int "
                    "with batching='masked'"
                )

    def requested_batching(self) -> Batching:
        return Batching(self.batching)

    def load_thresholds(self, source: ThresholdSource | None) -> dict[str, Any]:
        """Option values {kind: tuple, maybe layers} from a threshold file or tensor."""
        if isinstance(source, str) and _is_number(source) and not Path(source).exists():
            raise InvalidOptionError(
                f"{self.name}: option thresholds={source!r} is not accepted; accepted: finite "
                "numbers, or a threshold file written by tokenreduce train"
            )
        if isinstance(source, (str, Path)):
            vectors, metadata = read_threshold_file(source, self.name, self.kinds)
            updates: dict[str, Any] = dict(vectors)
            facts = metadata_object(source, metadata, "model_facts")
            updates["trained_for"] = json.dumps({"file": str(source), **facts})
            layers = metadata_object(source, metadata, "options").get("layers")
            if layers is not None and not (
                isinstance(layers, list)
                and layers
                and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
            ):
                raise InvalidOptionError(
                    f"threshold file {str(source)!r}: metadata 'options' has layers={layers!r}; "
                    "accepted: a list of block indices (a file written by tokenreduce train)"
                )
            if self.layers is None and layers is not None:
                updates["layers"] = tuple(layers)
            elif layers is not None and sorted(self.layers) != sorted(layers) and not self.transfer:
                raise InvalidOptionError(
                    f"{self.name}: option layers={tuple(self.layers)!r} differs from the layers "
                    f"{tuple(layers)!r} threshold file {str(source)!r} was trained for; accepted: "
                    "layers left out (the file's), the file's layers, or transfer=True to use its "
                    "thresholds at other layers"
                )
            return updates
        if isinstance(source, torch.Tensor):
            # exact shapes only: a reshape would silently interleave a transposed tensor
            kinds = len(self.kinds)
            rows = source if source.dim() == 2 and source.shape[0] == kinds else None
            if kinds == 1 and source.dim() == 1:
                rows = source[None]
            if rows is None:
                shapes = f"[{kinds}, S]" + (" or [S]" if kinds == 1 else "")
                raise InvalidOptionError(
                    f"{self.name}: option thresholds is a tensor of shape {tuple(source.shape)}; "
                    f"accepted: {shapes} (rows {list(self.kinds)}, S = one per reducing layer, "
                    "never reshaped), or a threshold file"
                )
            updates = {
                kind: check_threshold_values(self.name, "thresholds", row)
                for kind, row in zip(self.kinds, rows, strict=True)
            }
            return {**updates, "tensor_shape": tuple(source.shape)}
        raise InvalidOptionError(
            f"{self.name}: option thresholds={source!r} is not accepted; accepted: a path to a "
            "file written by tokenreduce train, or a tensor"
        )

    def options(self) -> dict[str, Any]:
        """The options a user can give (internal fields, set from a threshold source, left out)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.init and not f.metadata.get("internal")
        }

    def default_layers(self, dims: ModelDims) -> tuple[int, ...]:
        return resolve_layers(self.name, None, dims.depth)

    def reduce_layers(self, dims: ModelDims) -> tuple[int, ...]:
        if self.layers is None:
            return self.default_layers(dims)
        return resolve_layers(self.name, self.layers, dims.depth)

    def identity_values(self) -> dict[str, float]:
        """Thresholds that keep every token (an untrained model is the dense model)."""
        raise NotImplementedError

    def threshold_vectors(self, dims: ModelDims) -> dict[str, tuple[float, ...]]:
        """Per kind, one threshold per reducing layer (a single number is broadcast)."""
        count = len(self.reduce_layers(dims))
        vectors = {}
        for kind in self.kinds:
            value = getattr(self, kind)
            if value is None:
                value = self.identity_values()[kind]
            if isinstance(value, float):
                value = (value,) * count
            if len(value) != count:
                raise InvalidOptionError(
                    f"{self.name}: option {kind} has {len(value)} thresholds but the method "
                    f"reduces in {count} blocks {self.reduce_layers(dims)}; accepted: one number "
                    f"or {count}"
                )
            vectors[kind] = tuple(value)
        return vectors

    def validate(self, dims: ModelDims) -> None:
        self.check_trained_for(dims)
        if self.tensor_shape is not None:
            layers = self.reduce_layers(dims)
            if self.tensor_shape[-1] != len(layers):
                shape = (*self.tensor_shape[:-1], len(layers))
                raise InvalidOptionError(
                    f"{self.name}: option thresholds is a tensor of shape {self.tensor_shape} but "
                    f"the method reduces in {len(layers)} blocks {layers}; accepted: shape "
                    f"{shape} (rows {list(self.kinds)})"
                )
        try:
            super().validate(dims)
            self.threshold_vectors(dims)
        except InvalidOptionError as err:
            if self.trained_for is None:
                raise
            # the layers and thresholds came from the file: say so, or the message blames
            # options the user never set
            recorded = json.loads(self.trained_for)
            raise InvalidOptionError(
                f"{self.name}: with threshold file {recorded['file']!r} (trained for "
                f"{describe_facts(recorded)}; this model: {describe_facts(model_facts(dims))}): "
                f"{err}"
            ) from err

    def check_trained_for(self, dims: ModelDims) -> None:
        """A threshold file's recorded model facts against this model (first: a file for
        another model fails every other check too, and this says why)."""
        if self.trained_for is None or self.transfer:
            return
        recorded = json.loads(self.trained_for)
        ours = model_facts(dims)
        differ = [
            key
            for key in MODEL_FACTS
            if recorded.get(key) not in (None, "")
            and ours[key] not in (None, "")
            and recorded[key] != ours[key]
        ]
        if differ:
            raise InvalidOptionError(
                f"{self.name}: threshold file {recorded['file']!r} was trained for "
                f"{describe_facts(recorded)}, not for this model, {describe_facts(ours)} "
                f"({', '.join(differ)} differ); accepted: a threshold file trained for this model, "
                "or the option transfer=True to use it anyway"
            )

    @property
    def has_thresholds(self) -> bool:
        """Whether any threshold was given (a file, a tensor or values), not the defaults."""
        defaults = {f.name: f.default for f in fields(self) if f.name in self.kinds}
        return any(getattr(self, kind) != defaults[kind] for kind in self.kinds)

    def check_ranges(self) -> None:
        """Thresholds inside the range training clamps them to (`clamp`)."""
        low, high = self.clamp
        for kind in self.kinds:
            value = getattr(self, kind)
            if value is None or isinstance(value, (str, Path, torch.Tensor)):
                continue
            values = value if isinstance(value, tuple) else (value,)
            if any(v < low or (high is not None and v > high) for v in values):
                bound = f"[{low}, {high}]" if high is not None else f">= {low}"
                raise InvalidOptionError(
                    f"{self.name}: option {kind}={value!r} is not accepted; accepted: values "
                    f"in {bound} (the range training keeps them in)"
                )

    def schedule(self, dims: ModelDims) -> list[Step | None]:
        layers = self.reduce_layers(dims)
        vectors = self.threshold_vectors(dims)
        steps: list[Step | None] = [None] * dims.depth
        for slot, block in enumerate(layers):
            steps[block] = {kind: vectors[kind][slot] for kind in self.kinds}
        return steps

    def trainable_steps(
        self, steps: Sequence[Step | None], parameters: ThresholdParameters
    ) -> list[Step | None]:
        """The schedule with each reducing block reading its trainable thresholds."""
        out: list[Step | None] = []
        slot = 0
        for step in steps:
            if step is None:
                out.append(None)
                continue
            out.append({kind: parameters.values[kind][slot] for kind in self.kinds})
            slot += 1
        return out

    def with_vectors(self, vectors: dict[str, Sequence[float]]) -> LearnedConfig:
        return replace(self, **{kind: tuple(float(v) for v in vectors[kind]) for kind in vectors})

    def max_tokens_for(self, num_prefix: int) -> int | None:
        """The cap `max_tokens` as applied: at least the prefix and one patch token, which every
        image keeps (docs/methods.md §1.6)."""
        return None if self.max_tokens is None else max(self.max_tokens, num_prefix + 1)

    def clamped_options(self, dims: ModelDims) -> list[str]:
        cap = self.max_tokens
        if cap is None:
            return []
        if cap <= dims.num_prefix:
            why = (
                f"leaves no room for a patch token after the model's {dims.num_prefix} prefix "
                "token(s), and every image keeps one"
            )
            return [clamped(self.name, "max_tokens", cap, why, dims.num_prefix + 1)]
        if cap > dims.num_tokens:
            why = f"is more than the {dims.num_tokens} tokens this model holds, so it caps nothing"
            return [clamped(self.name, "max_tokens", cap, why, dims.num_tokens)]
        return []

    def pack(
        self, keep: torch.Tensor, score: torch.Tensor, num_prefix: int, batching: Batching
    ) -> tuple[Packing, torch.Tensor | None]:
        """Compact kept tokens [B, N] per image as the engine's `batching` lays them out; also
        the overflow [B] to record (None without `max_tokens`). The cap drops the lowest
        `score`s, so an image's prefix (score inf) and its best patch token stay."""
        length = None
        if batching.static:
            length = keep.shape[1]
            if self.max_tokens is not None:
                length = min(length, self.max_tokens_for(num_prefix))
        packing = pack_kept(keep, length, score)
        return packing, packing.overflow if self.max_tokens is not None else None
