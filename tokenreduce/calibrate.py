"""Set a method's strength so that it costs a given fraction of the dense model's GMACs.

Methods compare fairly only at matched cost. Each method declares its strength option
(`MethodConfig.strength`); `match_gmacs` searches it by bisection, measuring mean per-image
GMACs with real forward passes on the given images, so that data-dependent methods (PPT's
per-image choice) are matched on the data they will see.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import tokenreduce
from tokenreduce.errors import InvalidOptionError, InvalidTypeError, UnreachableTargetError
from tokenreduce.methods.base import MethodConfig, make_config
from tokenreduce.patch import attached_engine

__all__ = ["UNREACHABLE", "Calibration", "match_gmacs", "mean_gmacs"]


logger = logging.getLogger(__name__)

UNREACHABLE = 0.02
"""How far (relative) above the target the strongest setting may cost before the target counts
as unreachable rather than matched."""


@dataclass(frozen=True)
class Calibration:
    """The matched config, its mean GMACs on the images and the fraction of dense it costs."""

    config: MethodConfig
    gmacs: float
    ratio: float


def mean_gmacs(model: nn.Module, config: MethodConfig, images: torch.Tensor) -> float:
    """Mean per-image GMACs of `config` on `images` (the model is left with `config` applied)."""
    tokenreduce.apply(model, config)
    with torch.inference_mode():
        model(images)
    return tokenreduce.flops.gmacs(model, tokenreduce.last_info(model)).mean


@contextlib.contextmanager
def _clamps_unlogged() -> Iterator[None]:
    """The bisection's candidates are not the user's settings: the engine's warning that one of
    them is clamped is noise (the setting returned warns again where it is applied)."""
    engine_logger = logging.getLogger("tokenreduce.patch.engine")
    level = engine_logger.level
    engine_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        engine_logger.setLevel(level)


def match_gmacs(
    model: nn.Module,
    method: str | MethodConfig,
    ratio: float,
    images: torch.Tensor,
    tolerance: float = 2e-3,
    **options: Any,
) -> Calibration:
    """The strength of `method` whose mean GMACs on `images` is closest to `ratio` x dense.

    Integer strengths (ToMe/PPT r) return the nearest achievable value; continuous ones
    (keep_rate) are bisected on a 1e-4 grid until within `tolerance` (relative). Other options
    are kept fixed.
    `model` is returned to its unreduced state.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise InvalidOptionError(f"ratio={ratio!r} is not accepted; accepted: a number in (0, 1]")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) == 0:
        raise InvalidTypeError(
            "images must be a tensor [B, 3, H, W] with at least one image, got "
            + (
                f"shape {tuple(images.shape)}"
                if isinstance(images, torch.Tensor)
                else type(images).__name__
            )
        )
    size = tokenreduce.describe(model).input_size
    if tuple(images.shape[-2:]) != size:
        raise InvalidOptionError(
            f"images of {tuple(images.shape[-2:])} pixels do not fit the model's {size}; accepted: "
            "images preprocessed for this model (tokenreduce.data.eval_transform)"
        )
    if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
        raise InvalidOptionError(f"tolerance={tolerance!r} is not accepted; accepted: (0, 1)")
    base = make_config(method, **options)
    strength = type(base).strength
    if strength is None:
        raise InvalidOptionError(
            f"method {base.name!r} declares no strength option, so its GMACs cannot be matched"
        )
    dense = tokenreduce.flops.dense_gmacs(model)
    target = ratio * dense
    dims = tokenreduce.describe(model)
    low, high = strength.bounds(dims)
    cache: dict[float, float] = {}

    def cost(value: float) -> float:
        value = int(value) if strength.integer else float(value)
        if value not in cache:
            config = make_config(base, **{strength.option: value})
            with _clamps_unlogged():
                cache[value] = mean_gmacs(model, config, images)
        return cache[value]

    # `weak` is the end that costs more than the target, `strong` the end that costs less.
    weak, strong = (low, high) if strength.larger_reduces_more else (high, low)
    try:
        if cost(strong) > target:
            weak = strong
        elif cost(weak) < target:
            strong = weak
        while True:
            middle = (weak + strong) // 2 if strength.integer else round((weak + strong) / 2, 4)
            if middle in (weak, strong):
                break
            if cost(middle) > target:
                weak = middle
            else:
                strong = middle
            if not strength.integer and abs(cost(middle) - target) <= tolerance * target:
                weak = strong = middle
        best = min((weak, strong), key=lambda v: abs(cost(v) - target))
        best = int(best) if strength.integer else float(best)
        config = make_config(base, **{strength.option: best})
        gmacs = cost(best)
        strongest, weakest = (high, low) if strength.larger_reduces_more else (low, high)
        if best == weakest and gmacs < target * (1 - UNREACHABLE):
            # cheaper than asked is still usable: the one convention's clamp, said once
            logger.warning(
                "ratio=%s of the dense GMACs is more than %s keeps at its weakest: "
                "%s=%s runs, costing %.3f of dense on these images",
                ratio,
                base.name,
                strength.option,
                best,
                gmacs / dense,
            )
        if best == strongest and gmacs > target * (1 + UNREACHABLE):
            raise UnreachableTargetError(
                f"ratio={ratio} of the dense GMACs cannot be reached by {base.name}: its "
                f"strongest setting {strength.option}={best} costs {gmacs / dense:.3f} of dense "
                f"on these images; accepted: a ratio >= {gmacs / dense:.3f} for {base.name}"
            )
    finally:
        if attached_engine(model) is not None:
            tokenreduce.remove(model)
    return Calibration(config=config, gmacs=gmacs, ratio=gmacs / dense)
