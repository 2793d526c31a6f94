"""Per-forward token state and attention by-products shared by the adapters and the methods.

Nothing here knows a model family: an adapter fills these from its attention modules and a method
reads and returns them. A state lives only inside one forward call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from tokenreduce.batching import Batching
from tokenreduce.ops.attention import PooledAttention, padding_bias, size_bias

__all__ = ["AttentionOutputs", "TokenState"]


@dataclass(frozen=True, kw_only=True)
class TokenState:
    """What each current token stands for.

    num_prefix: P, the leading tokens (class, distillation, registers) that are never reduced.
    size: [B, N, 1] number of original tokens each token represents; None while every size is 1
        (before the first reduction), which keeps unreduced blocks bit-identical to the model.
    source: [B, N, N0] 0/1 map from current to original tokens, only when tracing sources.
    valid: [B, N] bool, False at padding slots once images keep different numbers of tokens
        (docs/methods.md §1.6; padding also has size 0); None while every slot is a real token.
    mask: [B, N] soft key mask of a learned method's training forward (docs/methods.md §2.7; forward
        values 0/1, straight-through gradients); None outside training.
    position: [B, N, 2] (row, column) of each token on the patch grid, only for models with rotary
        position embeddings (None otherwise). A kept or pruned token keeps its own; a merged or
        fused token gets the size-weighted mean of its members' positions, or with
        `position_rule` "destination" the position of the token it was merged into (docs/methods.md
        §1.7). Prefix rows and padding are 0 and never rotated.
    position_rule: "mean" or "destination", the method config's `rope_position`.
    owner: [B, N0] row of this sequence that holds each original token, -1 once it left (pruned,
        or folded into a fused token); only while a forward builds patch grids, None otherwise
        (`ops.owners`).
    exited: [B, N0, C] the feature each original token had when its token left the sequence
        (zeros for tokens still held); with `owner`, once a block has reduced.
    batching: how images that keep different counts share the batch, the engine's policy for
        this forward (`tokenreduce.batching.Batching`); methods with per-image counts pack by it.
    counts: each image's real tokens (the True slots of `valid`) where the packing that made
        `valid` read them on the host, so that the ragged layout needs no second read; None
        otherwise. Set with `valid` by `with_tokens`, so it never outlives it.
    carry: what a method itself carries from block to block in this forward, set by its
        `MethodConfig.initial_state` and its reductions (GTP: the token graph over the non-prefix
        tokens, [B, N - P, N - P]); None for the methods that carry nothing.
    attention: [B, H, N, N] attention probabilities over the current tokens that the block's
        attention uses instead of its own softmax (or a `PooledAttention` that stands for them);
        set by a reduction before the attention (`MethodConfig.reduces_at` "start": MCTF's fused
        one-step-ahead attention), cleared by the engine once used; None otherwise.
    """

    num_prefix: int
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    position: torch.Tensor | None = None
    position_rule: str = "mean"
    owner: torch.Tensor | None = None
    exited: torch.Tensor | None = None
    batching: Batching = Batching.AUTO
    counts: tuple[int, ...] | None = None
    carry: torch.Tensor | None = None
    attention: torch.Tensor | PooledAttention | None = None
    _key_biases: dict[tuple[bool, torch.dtype], torch.Tensor | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def key_bias(self, prop_attn: bool, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive attention bias over keys [B, 1, 1, N]: log s with proportional attention
        (padding has s = 0), otherwise -inf at padding slots only; None when neither applies.
        Built once per state, so the blocks between two reductions share it."""
        key = (prop_attn, dtype)
        if key not in self._key_biases:
            self._key_biases[key] = (
                size_bias(self.size, dtype) if prop_attn else padding_bias(self.valid, dtype)
            )
        return self._key_biases[key]

    def sizes_like(self, x: torch.Tensor) -> torch.Tensor:
        """The size vector [B, N, 1], materialised as ones when still implicit."""
        if self.size is not None:
            return self.size
        return x.new_ones(x.shape[0], x.shape[1], 1)

    def with_tokens(
        self,
        *,
        size: torch.Tensor | None,
        source: torch.Tensor | None,
        valid: torch.Tensor | None,
        mask: torch.Tensor | None,
        position: torch.Tensor | None,
        owner: torch.Tensor | None,
        counts: Sequence[int] | None = None,
    ) -> TokenState:
        """The state of a reduction's output tokens. Every per-token field is a required keyword,
        so that a method cannot forget one; each is None where the forward does not carry it (see
        the fields above). counts: `valid`'s per-image counts, when read on the host."""
        return replace(
            self,
            size=size,
            source=source,
            valid=valid,
            mask=mask,
            position=position,
            owner=owner,
            counts=None if counts is None else tuple(counts),
        )

    def with_carry(self, carry: torch.Tensor | None) -> TokenState:
        """This state with the method's own `carry` replaced (the tokens stay as they are)."""
        return replace(self, carry=carry)

    @property
    def destination_positions(self) -> bool:
        """Whether a merged token takes its destination's position (else the members' mean)."""
        return self.position_rule == "destination"

    def token_counts(self, x: torch.Tensor) -> torch.Tensor | int:
        """Real tokens per image: [B] when padded or masked, else the int N."""
        if self.mask is not None:
            return (self.mask.detach() > 0).sum(dim=1)
        if self.valid is not None:
            return self.valid.sum(dim=1)
        return x.shape[1]


@dataclass(frozen=True)
class AttentionOutputs:
    """By-products of one block's attention that a reduction step may use.

    cls_attn: [B, H, N] softmax attention of the first prefix token's query over all keys
        (float32 or wider), the class-attention row A_h[0, :].
    key_mean: [B, N, d] keys averaged over heads (the ToMe metric).
    values: [B, H, N, d] value vectors.
    attn: [B, H, N, N] full attention matrix (explicit path only).
    received: [B, N] mean attention each token receives over heads and real query rows (explicit
        path; LTMP's importance).
    fused: whether the attention itself ran through the fused kernel.
    """

    cls_attn: torch.Tensor | None = None
    key_mean: torch.Tensor | None = None
    values: torch.Tensor | None = None
    attn: torch.Tensor | None = None
    received: torch.Tensor | None = None
    fused: bool = True
