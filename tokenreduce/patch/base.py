"""The model-family interface: the hooks one family implements (einops' backends are the model).

`ModelAdapter` is all a family provides: whether a model is its own (`supports`, a cheap type
check, then `check_supported`), its shape facts (`describe`), its blocks, and how one block's
attention and MLP halves run with what the engine asks (`AttentionCall`). The engine
(`patch/engine.py`) runs the blocks and the method through these hooks; `patch/attach.py`
puts the reduction on a model. An adapter instance is the family bound to one model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from tokenreduce.dims import ModelDims
from tokenreduce.errors import UnsupportedModelError
from tokenreduce.patch.attention import AttentionCall
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = ["ModelAdapter", "check_block_types", "linear_macs"]


class ModelAdapter(ABC):
    """The hooks of one model family, bound to one model.

    `adapter_for` picks the family by asking each registered adapter's `supports`; the engine
    calls the instance hooks (`blocks`, `plain_block`, `attention_half`, `mlp_half`, ...) for
    every block. Class hooks answer for a model without a reduction (`describe`, `logits`, ...).
    """

    SUPPORTED: ClassVar[str]
    """What the family supports, in words (listed when a model is refused)."""
    FAMILY: ClassVar[str]
    """The family's short name ("timm", "eva", "transformers", "open_clip")."""

    def __init__(self, model: nn.Module) -> None:
        self.dims = self.describe(model)

    @staticmethod
    @abstractmethod
    def supports(model: nn.Module) -> bool:
        """Whether the model belongs to this family (a cheap check; details in check_supported)."""

    @classmethod
    @abstractmethod
    def check_supported(cls, model: nn.Module) -> None:
        """UnsupportedModelError naming the first part of the model this adapter cannot run."""

    @classmethod
    def check_family(cls, model: nn.Module) -> None:
        """UnsupportedModelError unless the model belongs to this family."""
        if not cls.supports(model):
            raise UnsupportedModelError(
                f"unsupported model class {type(model).__name__}; supported: {cls.SUPPORTED}"
            )

    @classmethod
    @abstractmethod
    def describe(cls, model: nn.Module) -> ModelDims:
        """Shape facts and MAC coefficients of a supported model."""

    @classmethod
    @abstractmethod
    def pooled_features(cls, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The model's pooled pre-logits features [B, D] of images [B, 3, H, W]."""

    @classmethod
    @abstractmethod
    def grid_features(cls, model: nn.Module, images: torch.Tensor, pruned: str) -> torch.Tensor:
        """Final features of every original token [B, N0, C], prefix first, of images
        [B, 3, H, W]: the model's own output tokens when unreduced (normed where the model norms
        them; transformers CLIP and open_clip towers that norm only their pooled feature do
        not), else put back on the token grid (`PatchGrid`; pruned: one of `grids.PRUNED_RULES`)."""

    @classmethod
    def num_classes(cls, model: nn.Module) -> int:
        """How many classes `logits` scores (0: the model has no classifier)."""
        return getattr(model, "num_classes", 0)

    @classmethod
    def fixed_input_size(cls, model: nn.Module) -> tuple[int, int] | None:
        """The one image size (H, W) the model takes, or None where it takes others too (input
        checks name it before any work)."""
        return None

    @classmethod
    def logits(cls, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, K] of images (for accuracy); a family whose models return something
        else overrides this, or refuses models without a classifier."""
        return model(images)

    @abstractmethod
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The model's transformer blocks, in order."""

    @abstractmethod
    def plain_block(self, block: nn.Module, x: torch.Tensor, rope: Any) -> torch.Tensor:
        """The block's own forward (used where nothing is reduced, biased or masked)."""

    @abstractmethod
    def attention_half(
        self, block: nn.Module, x: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, AttentionOutputs]:
        """x plus the block's attention residual, with the call's bias and by-products (x itself
        for a probe, `call.probe`)."""

    @abstractmethod
    def mlp_half(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x plus the block's MLP residual."""

    @classmethod
    @abstractmethod
    def reducing_members(cls, model_class: type[nn.Module]) -> dict[str, Callable]:
        """The methods the reducing subclass of `model_class` overrides (its forward through
        `run_blocks`, size-aware pooling, ...); they find the engine with `engine_of(model)`."""

    def attention_fused(self, block: nn.Module) -> bool:
        """Whether the block's attention runs through the fused kernel by default."""
        return bool(block.attn.fused_attn)

    def rotary(self, index: int, state: TokenState, rotary: Any, moved: bool) -> Any:
        """The rotary embedding of the current tokens at block `index`, for families whose
        forward passes `rotary` to `run_blocks`; `moved`: whether the tokens' positions differ
        from the unreduced grid's (a reduction has moved them)."""
        raise NotImplementedError(f"{type(self).__name__} has no rotary position embeddings")

    def reduced_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules whose class the reduction swaps, outermost first (the model; a family
        whose wrapper runs a base model returns both)."""
        return [model]


def linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of every nn.Linear inside `module`."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def check_block_types(
    model_name: str, blocks: Sequence[nn.Module], accepted: dict[type, tuple[type, ...]], what: str
) -> None:
    """UnsupportedModelError unless every block is one of `accepted` (block class -> attention
    classes), naming the first block that is not."""
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if type(attn) not in accepted.get(type(block), ()):
            raise UnsupportedModelError(
                f"unsupported block {i} of {model_name}: {type(block).__name__} with "
                f"{type(attn).__name__}; supported: {what}"
            )
