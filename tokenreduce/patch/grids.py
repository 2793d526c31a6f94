"""Patch grids: a block's output put back on the original token grid (docs/methods.md §1.8), the
grid positions of an unreduced sequence, and the checks of what a grid request is given (images,
block indices, the `pruned` rule), made before any work.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from tokenreduce.errors import InvalidOptionError, InvalidTypeError
from tokenreduce.ops.owners import fill_from_nearest

__all__ = [
    "PRUNED_RULES",
    "PatchGrid",
    "check_images",
    "check_indices",
    "check_pruned_rule",
    "grid_positions",
    "grid_tokens",
    "patch_multiple",
    "strict_patch_embed_size",
]


class PatchGrid(NamedTuple):
    """A block's output on the original token grid.

    features: [B, N0, C] (prefix first) each original token's feature: that of the token holding
    it, or, once its token left the sequence (pruned, fused), the feature it had then. held:
    [B, N0] bool, whether a token of the block's output still holds it.
    """

    features: torch.Tensor
    held: torch.Tensor


PRUNED_RULES = ("exit", "zero", "nearest")
"""What a patch grid gives the original tokens whose token left the sequence: "exit", the
feature it had then (through the final norm when the grid is normed); "zero"; or "nearest", the
feature of the nearest patch on the grid that a token still holds (docs/methods.md §1.8)."""


def check_pruned_rule(pruned: object) -> None:
    if pruned not in PRUNED_RULES:
        raise InvalidOptionError(
            f"pruned={pruned!r} is not accepted; accepted: {' or '.join(map(repr, PRUNED_RULES))}"
        )


def _patch_embedding(model: nn.Module) -> nn.Conv2d | None:
    """The model's first 2-d convolution: the patch embedding of every supported family."""
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def strict_patch_embed_size(model: nn.Module) -> tuple[int, int] | None:
    """The one image size a model takes, where a module of it declares a strict size that it
    does not adapt (timm's PatchEmbed: `strict_img_size` without `dynamic_img_size`), else None."""
    for module in model.modules():
        strict = getattr(module, "strict_img_size", False) is True
        if strict and not getattr(module, "dynamic_img_size", False):
            size = getattr(module, "img_size", None)
            return tuple(size) if isinstance(size, (tuple, list)) else None
    return None


def patch_multiple(model: nn.Module) -> tuple[int, int] | None:
    """The patch size (h, w) that a model's images must be multiples of, where a module of it
    takes any such size but no other (timm's PatchEmbed with `dynamic_img_size` and without
    `dynamic_img_pad`, which asserts it), else None."""
    for module in model.modules():
        sized = getattr(module, "img_size", None) is not None
        dynamic = getattr(module, "strict_img_size", True) is False
        if sized and dynamic and getattr(module, "dynamic_img_pad", True) is False:
            patch = module.patch_size
            return tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    return None


def check_images(
    model: nn.Module, images: object, size: tuple[int, int] | None, min_batch: int = 1
) -> None:
    """InvalidTypeError / InvalidOptionError in one line unless `images` is what the model takes:
    a tensor [B, C, H, W] with B >= 1, the model's channel count C, a floating dtype (the
    model's, outside autocast), on the model's device, and of `size` (H, W) where the model
    takes that size only (`ModelAdapter.fixed_input_size`; None: any). min_batch: 0 where an
    empty batch is a valid call (a model's forward returns an empty output, as the dense one)."""
    conv = _patch_embedding(model)
    channels = 3 if conv is None else conv.in_channels
    accepted = f"accepted: a floating-point tensor [B, {channels}, H, W] with B >= {min_batch}"
    if not isinstance(images, torch.Tensor):
        raise InvalidTypeError(
            f"images of type {type(images).__name__} are not accepted; {accepted} "
            "(torch.as_tensor turns an array or nested list into one)"
        )
    shape = tuple(images.shape)
    if images.dim() != 4 or shape[0] < min_batch or shape[1] != channels:
        hint = " (one image: images[None])" if images.dim() == 3 else ""
        raise InvalidOptionError(f"images of shape {shape} are not accepted; {accepted}{hint}")
    if 0 in shape[2:]:
        raise InvalidOptionError(
            f"images of shape {shape} are not accepted: they have no pixels; {accepted}, H, W >= 1"
        )
    if not images.is_floating_point():
        raise InvalidOptionError(
            f"images of dtype {images.dtype} are not accepted; {accepted} (pixel values after "
            "the model's normalisation, e.g. images.float())"
        )
    if conv is not None:
        weight = conv.weight
        if images.device != weight.device:
            raise InvalidOptionError(
                f"images on {images.device} are not accepted by a model on {weight.device}; "
                f"accepted: images on {weight.device} (images.to(device))"
            )
        autocast = torch.is_autocast_enabled(images.device.type)
        if images.dtype != weight.dtype and not autocast:
            raise InvalidOptionError(
                f"images of dtype {images.dtype} are not accepted by a model in {weight.dtype}; "
                f"accepted: images.to({weight.dtype}), or torch.autocast"
            )
    if size is not None and shape[2:] != tuple(size):
        raise InvalidOptionError(
            f"images of size {shape[2]}x{shape[3]} are not accepted by this model, which takes "
            f"{size[0]}x{size[1]} only; accepted: [B, {channels}, {size[0]}, {size[1]}] (resize "
            "the images, or use a model built for their size)"
        )
    multiple = patch_multiple(model) if size is None else None
    if multiple is not None and any(
        n % p or n < p for n, p in zip(shape[2:], multiple, strict=True)
    ):
        raise InvalidOptionError(
            f"images of size {shape[2]}x{shape[3]} are not accepted by this model, whose patch "
            f"embedding takes sizes that are multiples of its patch {multiple[0]}x{multiple[1]}; "
            f"accepted: [B, {channels}, H, W] with H a positive multiple of {multiple[0]} and W "
            f"of {multiple[1]} (resize or crop the images)"
        )


def check_indices(indices: Any, depth: int) -> int | list[int] | None:
    """The `indices` of `forward_intermediates` as timm takes them, or InvalidOptionError in one
    line: None (every block), an int n in 1..depth (the last n blocks), or a non-empty sequence
    (list, tuple, 1-d integer array or tensor) of block indices in -depth..depth-1."""
    accepted = (
        f"accepted: None, an int in 1..{depth} (the last n blocks), or a non-empty list of "
        f"block indices in {-depth}..{depth - 1}"
    )
    if indices is None:
        return None
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 1 <= indices <= depth:
            raise InvalidOptionError(f"indices={indices!r} is not accepted; {accepted}")
        return indices
    values = indices
    if isinstance(indices, torch.Tensor) or type(indices).__module__ == "numpy":
        values = indices.tolist()  # integer 1-d: ints; floats, bools or nesting fail below
    is_list = isinstance(values, (list, tuple)) and len(values) > 0
    if is_list and all(
        isinstance(i, int) and not isinstance(i, bool) and -depth <= i < depth for i in values
    ):
        return list(values)
    raise InvalidOptionError(f"indices={indices!r} is not accepted; {accepted}")


def grid_tokens(
    grid: PatchGrid,
    norm: nn.Module | None,
    pruned: str,
    grid_size: tuple[int, int],
    num_prefix: int,
) -> torch.Tensor:
    """The [B, N0, C] features of a `PatchGrid` (prefix first, then the `grid_size` patches row by
    row), through `norm` when given, the tokens no longer held as `pruned` says."""
    features = grid.features if norm is None else norm(grid.features)
    if pruned == "zero":
        return features.masked_fill(~grid.held.unsqueeze(-1), 0.0)
    if pruned == "nearest":
        return fill_from_nearest(features, grid.held, grid_size, num_prefix)
    return features


def grid_positions(grid_size: tuple[int, int], num_prefix: int, batch: int) -> torch.Tensor:
    """(row, column) of every token of an unreduced sequence [B, P + H * W, 2], prefix rows 0."""
    rows, cols = grid_size
    grid = torch.stack(
        torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1
    ).reshape(-1, 2)
    position = torch.cat([torch.zeros(num_prefix, 2, dtype=torch.long), grid])
    return position.to(torch.float32).expand(batch, -1, -1)
