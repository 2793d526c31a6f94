"""The method interface and registry.

A method is a frozen config dataclass that knows which blocks reduce (`schedule`), what each
reducing block needs from its attention (`needs`), how to reduce (`reduce`), and what its own
decision costs (`overhead_macs`). It never touches a model class: it sees tokens, attention
by-products and the token state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch

from tokenreduce.batching import Batching
from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError, InvalidTypeError
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = [
    "ROPE_POSITIONS",
    "BlockRecord",
    "ConfigT",
    "MethodConfig",
    "RecordT",
    "Strength",
    "check_bool",
    "check_keep_rate",
    "check_layers_type",
    "clamped",
    "class_attention_macs",
    "learned_method_names",
    "make_config",
    "matching_macs",
    "method_names",
    "register",
    "resolve_layers",
    "trainable_method_names",
]


RecordT = TypeVar("RecordT", bound="BlockRecord")


@dataclass(frozen=True)
class BlockRecord:
    """Per-image values a method records at each reducing block.

    A method declares its fields in a subclass (its config's `record_type`); each field is a
    tensor [B] at one block, or None where the forward does not record it (e.g. in training).
    `ReductionInfo.records` holds the same class with every field stacked over the reducing
    blocks to [B, S]. The base class records nothing.
    """

    @classmethod
    def stack(cls: type[RecordT], records: Sequence[BlockRecord]) -> RecordT:
        """One record with each field stacked over `records` (the reducing blocks) to [B, S]."""
        stacked: dict[str, torch.Tensor | None] = {}
        for name in cls.__dataclass_fields__:  # dataclasses.fields(cls) breaks torch.compile
            values = [getattr(record, name) for record in records]
            present = [v is not None for v in values]
            if any(present) and not all(present):
                raise RuntimeError(f"{cls.__name__}.{name} recorded at some blocks only")
            stacked[name] = torch.stack(values, dim=1) if values and all(present) else None
        return cls(**stacked)

    def at(self: RecordT, slot: int) -> RecordT:
        """The record of reducing block number `slot` out of a stacked record."""
        return dataclasses.replace(
            self,
            **{
                field.name: value[:, slot]
                for field in dataclasses.fields(self)
                if (value := getattr(self, field.name)) is not None
            },
        )


_REGISTRY: dict[str, type[MethodConfig]] = {}

ROPE_POSITIONS = ("mean", "destination")
"""Accepted values of the `rope_position` option."""


@dataclass(frozen=True)
class Strength:
    """The one option that sets how much a method reduces, so that a GMACs budget can be met
    (`tokenreduce.calibrate`). GMACs must be monotone in it over `bounds(dims)`."""

    option: str
    integer: bool
    larger_reduces_more: bool
    bounds: Callable[[ModelDims], tuple[float, float]]


@dataclass(frozen=True, kw_only=True)
class MethodConfig(Generic[RecordT]):
    """Base of every method config.

    trace_source: record original-token maps per block.
    rope_position: on models with rotary position embeddings, the position a merged or fused token
        is rotated by: "mean" (the size-weighted mean of its patches' positions) or "destination"
        (the position of the token it was merged into; merging methods only; fused tokens, which
        have no destination, take the mean). docs/methods.md §1.7.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    requires_class_token: ClassVar[bool] = False
    sweep: ClassVar[tuple[dict[str, Any], ...]] = ()
    strength: ClassVar[Strength | None] = None
    learned: ClassVar[bool] = False
    """Whether the method has trainable thresholds and a soft-mask training forward."""
    trainable: ClassVar[bool] = False
    """Whether `tokenreduce train` learns it: its forward reads the parameters registered with
    `Engine.set_trainable` (`trainable_steps`) and, in training mode, runs a soft-mask forward
    (the learned methods, and DiffRate's rate search)."""
    key_mask_softmax: ClassVar[str] = "masked"
    """How the soft key mask of its training forward enters attention
    (`patch.attention.AttentionCall.key_mask_softmax`): "masked" (LTMP, AS-ViT) or "policy"
    (DiffRate)."""
    per_image_counts: ClassVar[bool] = False
    """Whether images of one batch may keep different counts (the engine then lays the batch out
    by `requested_batching`)."""
    merges: ClassVar[bool] = False
    """Whether the method merges tokens into destination tokens (rope_position="destination"
    acts only then)."""
    record_type: ClassVar[type[BlockRecord]] = BlockRecord

    trace_source: bool = False
    rope_position: str = "mean"

    def __new__(cls, *args: Any, **options: Any) -> MethodConfig:
        # the dataclass __init__ would say only "takes 1 positional argument" or "unexpected
        # keyword argument": name the config, the value and its options instead
        accepted = [
            f.name for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")
        ]
        if args:
            raise InvalidTypeError(
                f"{cls.__name__}{args!r}: options are given by keyword; accepted: "
                f"{cls.__name__}(OPTION=VALUE, ...) with OPTION one of {', '.join(accepted)}"
            )
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls) if f.init})
        if unknown:
            raise InvalidOptionError(
                f"{cls.__name__}: option(s) {', '.join(unknown)} are not options of method "
                f"{cls.name!r}; accepted: {', '.join(accepted)}"
            )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        check_bool(self.name, "trace_source", self.trace_source)
        if self.rope_position not in ROPE_POSITIONS:
            raise InvalidOptionError(
                f"{self.name}: option rope_position={self.rope_position!r} is not accepted; "
                f"accepted: {' or '.join(map(repr, ROPE_POSITIONS))}"
            )

    @property
    def uses_prop_attn(self) -> bool:
        """Whether attention adds log(size) to its logits (proportional attention)."""
        return False

    @property
    def attention_sparsity(self) -> float | None:
        """Fraction of each head's attention probabilities kept in every block, the rest zeroed
        (GTP's attention sparsification, `ops.attention.sparsify_attention`); None: the
        attention is left as it is (every method but GTP)."""
        return None

    def initial_state(self, x: torch.Tensor, state: TokenState, dims: ModelDims) -> TokenState:
        """The state entering block 0, from the tokens x [B, N0, C] entering it: a method that
        carries something of its own between blocks (`TokenState.carry`) builds it here. The
        state as it is by default."""
        return state

    @property
    def reduces_at(self) -> str:
        """Where a reducing block reduces (docs/methods.md §1.2): "mid" between attention and MLP
        (every method but MCTF); "end" after the MLP, with the by-products of the block's
        attention; "start" before the attention, with the by-products of the block's attention
        on the unreduced tokens, and the block's attention then uses the attention matrix the
        reduction hands over in `TokenState.attention` (MCTF's one-step-ahead attention)."""
        return "mid"

    def requested_batching(self) -> Batching:
        """The batch layout the method asks the engine for once images keep different counts
        (read once, when the reduction is put on a model)."""
        return Batching.AUTO

    @property
    def appends_fused_token(self) -> bool:
        """Whether a reducing block's last output token is a fusion of the pruned tokens
        (drawn as pruned in token maps)."""
        return False

    def fused_token(self, records: RecordT, slot: int) -> torch.Tensor | bool:
        """Whether reducing block number `slot` ended with a fused token ([B] bool per image, or
        one bool for the batch); `records` is the stacked record of the forward."""
        return self.appends_fused_token

    def validate(self, dims: ModelDims) -> None:
        """Raise ValueError when the options do not fit this model."""
        if self.rope_position == "destination" and not self.merges:
            raise InvalidOptionError(
                f"{self.name}: option rope_position='destination' acts on merged tokens, and "
                f"{self.name} merges none (its fused tokens take the mean position); accepted: "
                "the default 'mean', or a merging method ("
                + ", ".join(n for n, c in sorted(_REGISTRY.items()) if c.merges)
                + ")"
            )
        if self.rope_position != "mean" and not dims.rotary:
            raise InvalidOptionError(
                f"{self.name}: option rope_position={self.rope_position!r} applies to models with "
                "rotary position embeddings only; this model has none. Accepted: the default "
                "'mean', or a model with rotary embeddings (timm Eva family: DINOv3, EVA-02, ...)"
            )
        if self.requires_class_token and not dims.has_class_token:
            raise InvalidOptionError(
                f"method {self.name!r} scores tokens by class attention and needs a model with a "
                "class token (model.cls_token is not None); this model has none. Accepted: a model "
                "with a class token, or a method that needs none: "
                + ", ".join(n for n, c in sorted(_REGISTRY.items()) if not c.requires_class_token)
            )

    def clamped_options(self, dims: ModelDims) -> list[str]:
        """One line per option value this model cannot honour as given (`clamped`): the value is
        clamped to what the model allows, and the engine logs the line as a warning once per
        `apply` (docs/methods.md §3, "Values a method cannot honour"). None by default."""
        return []

    def schedule(self, dims: ModelDims) -> list[Any | None]:
        """Per block: the argument of its reduction step, or None when the block does not reduce.

        The step's type is the method's own (ToMe/PPT: r, an int; keep-rate methods: a float;
        learned methods: thresholds by kind), so the base class leaves it open.
        """
        raise NotImplementedError

    def trainable_steps(self, steps: Sequence[Any | None], parameters: Any) -> list[Any | None]:
        """A trainable method's schedule as one forward reads it from the `parameters` that
        `Engine.set_trainable` registered (called once per forward)."""
        raise NotImplementedError

    def reduce(
        self, x: torch.Tensor, state: TokenState, attn: AttentionOutputs, step: Any
    ) -> tuple[torch.Tensor, TokenState, RecordT]:
        """Reduce post-attention tokens x [B, N, C]; returns new tokens, state and a record."""
        raise NotImplementedError

    def overhead_macs(
        self, n_in: torch.Tensor, dims: ModelDims, step: Any, record: RecordT, fused: bool
    ) -> torch.Tensor:
        """Per-image MACs [B] of this block's reduction decision itself (docs/methods.md §4)."""
        raise NotImplementedError


ConfigT = TypeVar("ConfigT", bound="MethodConfig")


def register(cls: type[ConfigT]) -> type[ConfigT]:
    """Register a method config class under its `name` (a class decorator)."""
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def learned_method_names() -> list[str]:
    """Names of the methods with learned per-image thresholds."""
    return sorted(name for name, cls in _REGISTRY.items() if cls.learned)


def trainable_method_names() -> list[str]:
    """Names of the methods `tokenreduce train` learns (thresholds, or DiffRate's rates)."""
    return sorted(name for name, cls in _REGISTRY.items() if cls.trainable)


def make_config(method: str | MethodConfig, **options: Any) -> MethodConfig:
    """A config from a registered name or an existing config, with options applied."""
    if isinstance(method, MethodConfig):
        cls, base = type(method), method
    elif isinstance(method, str):
        if method not in _REGISTRY:
            raise InvalidOptionError(
                f"method={method!r} is not a registered method; accepted: {method_names()}"
            )
        cls, base = _REGISTRY[method], None
    else:
        raise InvalidTypeError(
            f"method must be a method name (str) or a MethodConfig, got {type(method).__name__}"
        )
    accepted = [
        f.name for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")
    ]
    for key in options:
        if key not in accepted:
            raise InvalidOptionError(
                f"option {key!r} is not an option of method {cls.name!r}; accepted: {accepted}"
            )
    if base is not None:
        return dataclasses.replace(base, **options)
    return cls(**options)


def check_bool(method: str, option: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidOptionError(f"{method}: option {option}={value!r} must be True or False")


def clamped(method: str, option: str, given: object, why: str, effective: object) -> str:
    """The warning for an option value clamped to what the model allows: the value, why it
    cannot be honoured, and the value used instead."""
    return f"{method}: option {option}={given!r} {why}; using {option}={effective!r} instead"


def check_keep_rate(method: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise InvalidOptionError(
            f"{method}: option keep_rate={value!r} is not accepted; accepted: a number in (0, 1]"
        )


def resolve_layers(method: str, layers: Sequence[int] | None, depth: int) -> tuple[int, ...]:
    """Reducing block indices; default (L//4, L//2, 3L//4) = (3, 6, 9) for 12 blocks."""
    if layers is None:
        return tuple(sorted({depth // 4, depth // 2, 3 * depth // 4}))
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth]
    if bad or len(set(layers)) != len(layers):
        raise InvalidOptionError(
            f"{method}: option layers={tuple(layers)!r} is not accepted; accepted: distinct block "
            f"indices in 0..{depth - 1}"
        )
    return tuple(sorted(layers))


def check_layers_type(method: str, layers: object) -> None:
    ok = layers is None or (
        isinstance(layers, (list, tuple))
        and len(layers) > 0
        and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    )
    if not ok:
        raise InvalidOptionError(
            f"{method}: option layers={layers!r} is not accepted; accepted: a tuple of block "
            "indices"
        )


def class_attention_macs(n_in: torch.Tensor, dims: ModelDims, fused: bool) -> torch.Tensor:
    """q_cls . K^T on the fused path (the explicit path already has the row)."""
    return n_in * dims.attn_dim if fused else torch.zeros_like(n_in)


def matching_macs(n_in: torch.Tensor, dims: ModelDims) -> torch.Tensor:
    """Bipartite similarity of head-mean keys plus the size-weighted merge (x*s and /s)."""
    half_up = torch.div(n_in + 1, 2, rounding_mode="floor")
    half_down = torch.div(n_in, 2, rounding_mode="floor")
    return half_up * half_down * dims.head_dim + 2 * n_in * dims.embed_dim
