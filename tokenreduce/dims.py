"""The facts of a model that the methods, the GMACs model and the workflows read: depth, widths,
prefix and patch counts, grid, and the MAC coefficients of its layers. `tokenreduce.describe(model)`
gives them for any supported model (each family's adapter fills them in)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelDims"]


@dataclass(frozen=True)
class ModelDims:
    """Shape facts of a ViT that the FLOPs model and the methods need, family-agnostic.

    MAC coefficients are per image; `*_per_token` ones scale with the token count.
    """

    depth: int
    embed_dim: int
    num_heads: int
    head_dim: int
    attn_dim: int
    num_prefix: int
    num_patches: int
    has_class_token: bool
    attn_linear_macs_per_token: int
    mlp_macs_per_token: int
    patch_embed_macs: int
    head_macs: int
    pool_macs_per_token: int = 0
    pool_fixed_macs: int = 0
    pool_attn_queries: int = 0
    pool_include_prefix: bool = False
    model_name: str = ""
    """The model's name (timm: architecture.tag of its pretrained config), "" when unknown."""
    family: str = ""
    """The model family whose adapter serves it ("timm", "eva", "transformers", "open_clip")."""
    input_size: tuple[int, int] = (0, 0)
    """(H, W) of the images the model takes."""
    grid_size: tuple[int, int] = (0, 0)
    """(rows, columns) of its patch grid."""
    rotary: bool = False
    """Whether its attention rotates queries and keys by token position (RoPE)."""
    key_dim: int | None = None
    """Width of the keys (and of the values): narrower than attn_dim with grouped-query
    attention; None means attn_dim (filled in on construction)."""

    def __post_init__(self) -> None:
        if self.key_dim is None:
            object.__setattr__(self, "key_dim", self.attn_dim)

    @property
    def num_tokens(self) -> int:
        """N0: tokens entering the first block, prefix included."""
        return self.num_prefix + self.num_patches
