"""How the images of a batch share it once they keep different token counts: the engine's
execution policy (docs/architecture.md, "Per-image token counts").

A method says what it needs (`MethodConfig.per_image_counts`, `requested_batching`); the engine
decides the policy once per reduction and carries it in the token state to every block, the
attention and the method's packing. Fixed-count methods keep one count for the whole batch, so
for them the policy never comes into play.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Batching"]


class Batching(str, Enum):
    """The layout of a batch whose images keep different counts after a reducing block.

    AUTO: RAGGED, the fastest correct path measured at every batch size. RAGGED: per-token work
    (norms, qkv, proj, MLP) on the real tokens only, a flat [M, C] layout between blocks, padded
    to the batch's largest count for attention and the method's decisions. PACKED: every op on
    the batch padded to its largest count. MASKED: static shapes, padding slots in place (no host
    sync; compiles with fullgraph=True).
    """

    AUTO = "auto"
    RAGGED = "ragged"
    PACKED = "packed"
    MASKED = "masked"

    @property
    def ragged(self) -> bool:
        """Whether per-token work runs on the real tokens only (a flat layout between blocks)."""
        return self in (Batching.AUTO, Batching.RAGGED)

    @property
    def static(self) -> bool:
        """Whether shapes stay fixed and nothing is read back to the host (masked)."""
        return self is Batching.MASKED

    @classmethod
    def names(cls) -> list[str]:
        """The accepted option values."""
        return [member.value for member in cls]
