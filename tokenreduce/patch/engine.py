"""The engine: runs a model's blocks with a method's reduction inside, the same for every family.

`Engine` holds a method config on one model (bound to its family's `ModelAdapter`) and runs
the reducing forward: the per-block forward (attention -> reduction -> MLP), the token state
carried between blocks, the ragged layout of per-image counts, and the record of the last
forward (`last_info`). Per-forward state lives in local variables; the record of the last
forward is kept per thread.

How images that keep different counts share a batch (`Batching`) is decided here, once, from
what the method asks for, and carried in the token state to every block and method.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from tokenreduce.errors import InvalidOptionError, NotReadyError
from tokenreduce.info import ReductionInfo
from tokenreduce.methods.base import BlockRecord, MethodConfig, trainable_method_names
from tokenreduce.ops.owners import held_features, record_exits
from tokenreduce.ops.packing import RaggedLayout
from tokenreduce.patch.attention import AttentionCall
from tokenreduce.patch.base import ModelAdapter
from tokenreduce.patch.grids import PatchGrid, grid_positions, grid_tokens
from tokenreduce.state import TokenState

__all__ = ["Engine", "check_plain_forward"]

logger = logging.getLogger(__name__)

TRAINABLE_NAME = "tokenreduce_thresholds"
"""The submodule name under which `Engine.set_trainable` registers trainable parameters."""


class Engine:
    """A method config on one model, and its reducing forward.

    Built from the model, the config and the family's adapter class: validates the config
    against the model's shape facts and computes the per-block schedule once. `attach` (patch/
    attach.py) puts it on the model; the family's reducing members call `run_blocks`.
    """

    def __init__(
        self, model: nn.Module, config: MethodConfig, adapter_class: type[ModelAdapter]
    ) -> None:
        self.adapter = adapter_class(model)
        self.dims = self.adapter.dims
        config.validate(self.dims)
        for message in config.clamped_options(self.dims):  # once per apply
            logger.warning(message)
        self.config = config
        self.steps = tuple(config.schedule(self.dims))
        self.batching = config.requested_batching()
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> Engine:
        clone = copy.copy(self)
        clone._local = threading.local()
        return clone

    @property
    def static(self) -> bool:
        """Whether the forward keeps fixed shapes and reads nothing on the host (every
        fixed-count method; a per-image method with masked batching), so that it compiles as one
        graph and can be captured as a CUDA graph."""
        return not self.config.per_image_counts or self.batching.static

    # ---- training: the parameters a trainable method's forward reads -----------------------
    def set_trainable(self, model: nn.Module, parameters: nn.Module | None) -> None:
        """Make a trainable method's forward read its parameters from `parameters` (e.g.
        `methods.learned.ThresholdParameters`, `methods.diffrate_search.SearchRates`); None
        removes them. They are registered as a submodule of the module that runs the blocks
        (the model, or a wrapper's base model: the innermost of
        `ModelAdapter.reduced_modules`), so that the model's optimisers, DDP and state dict see
        them."""
        if parameters is not None and not self.config.trainable:
            raise InvalidOptionError(
                f"method {self.config.name!r} has no trainable parameters; accepted: a method "
                f"tokenreduce train learns ({', '.join(trainable_method_names())})"
            )
        host = self.adapter.reduced_modules(model)[-1]
        host._modules.pop(TRAINABLE_NAME, None)
        if parameters is not None:
            host.add_module(TRAINABLE_NAME, parameters)

    def trainable_parameters(self, model: nn.Module) -> nn.Module | None:
        """The parameters `set_trainable` registered, or None; `model` is the model or the
        module that runs the blocks."""
        return self.adapter.reduced_modules(model)[-1]._modules.get(TRAINABLE_NAME)

    # ---- the forward ------------------------------------------------------------------------
    def block_forward(
        self,
        block: nn.Module,
        x: torch.Tensor,
        state: TokenState,
        step: Any,
        layout: RaggedLayout | None = None,
        rope: Any = None,
    ) -> tuple[torch.Tensor, TokenState, BlockRecord | None, bool, RaggedLayout | None]:
        """One block with the reduction between attention and MLP (before the attention or after
        the MLP where the method's `reduces_at` says so).

        x is [B, N, C], or with a ragged `layout` the flat [M, C] real tokens of the padded batch
        that `state` describes. Returns tokens, state, the method's record (None where the block
        does not reduce), whether attention ran fused, and the layout of the returned tokens
        (None: [B, N, C]). A block that neither reduces nor needs a key bias, a mask or a
        sparsified attention runs the block's own forward.
        """
        config = self.config
        bias = state.key_bias(config.uses_prop_attn, x.dtype)
        sparsity = config.attention_sparsity
        if step is None and bias is None and state.mask is None and sparsity is None:
            fused = self.adapter.attention_fused(block)
            return self.adapter.plain_block(block, x, rope), state, None, fused, layout
        needs = config.needs if step is not None else frozenset()
        call = AttentionCall(
            bias=bias,
            needs=needs,
            key_mask=state.mask,
            key_mask_softmax=config.key_mask_softmax,
            layout=layout,
            rope=rope,
            valid=state.valid,
            sparsity=sparsity,
        )
        reduces_at = config.reduces_at if step is not None else None
        record = None
        if reduces_at == "start":
            # the block's attention on the unreduced tokens (by-products only), the reduction,
            # then the block's attention with the attention matrix the reduction hands over
            _, probe = self.adapter.attention_half(block, x, replace(call, probe=True))
            x, state, record, layout = self._reduce(x, state, probe, step, layout)
            if state.attention is not None:
                call = AttentionCall(layout=layout, probs=state.attention)
                state = replace(state, attention=None)
            elif rope is not None:
                raise RuntimeError(
                    f"method {config.name!r} reduces before a rotary model's attention: it must "
                    "hand the block its attention matrix (TokenState.attention)"
                )
            else:  # the block's own attention on the reduced tokens
                bias = state.key_bias(config.uses_prop_attn, x.dtype)
                call = AttentionCall(
                    bias=bias,
                    key_mask=state.mask,
                    key_mask_softmax=config.key_mask_softmax,
                    layout=layout,
                    valid=state.valid,
                )
        x, byproducts = self.adapter.attention_half(block, x, call)
        if reduces_at == "mid":
            x, state, record, layout = self._reduce(x, state, byproducts, step, layout)
        x = self.adapter.mlp_half(block, x)
        if reduces_at == "end":
            x, state, record, layout = self._reduce(x, state, byproducts, step, layout)
        return x, state, record, byproducts.fused, layout

    def _reduce(
        self,
        x: torch.Tensor,
        state: TokenState,
        byproducts: Any,
        step: Any,
        layout: RaggedLayout | None,
    ) -> tuple[torch.Tensor, TokenState, BlockRecord, RaggedLayout | None]:
        """The method's reduction of x (flat rows with a ragged `layout`) with this block's
        attention by-products; returns tokens, state, record and the output's layout."""
        if layout is not None:
            x = layout.pad(x)
        before = state
        x_in = x
        x, state, record = self.config.reduce(x_in, before, byproducts, step)
        if before.owner is not None:
            exited = record_exits(x_in, before.owner, state.owner, before.exited)
            state = replace(state, exited=exited)
        layout = None
        if self.batching.ragged and state.valid is not None:
            layout = RaggedLayout(state.valid, state.counts)
            x = layout.unpad(x)
        return x, state, record, layout

    def run_blocks(self, model: nn.Module, x: torch.Tensor, rotary: Any = None) -> torch.Tensor:
        """All blocks with their reductions; records this forward's info for this thread.
        See `run_blocks_with_grids` for the arguments."""
        return self.run_blocks_with_grids(model, x, rotary)[0]

    def run_blocks_with_grids(
        self,
        model: nn.Module,
        x: torch.Tensor,
        rotary: Any = None,
        grid_blocks: Sequence[int] = (),
        last_block: int | None = None,
    ) -> tuple[torch.Tensor, list[PatchGrid]]:
        """The blocks with their reductions, and the outputs of `grid_blocks` put back on the
        original token grid; records this forward's info for this thread.

        rotary: for a family with rotary position embeddings, its embedding of this input's
        unreduced grid (with a `grid_size` (rows, columns)); each token then carries its position
        and the adapter's `rotary(index, state, rotary, moved)` gives the embedding per block.
        None otherwise.
        A learned method in training mode (`model.training`), and a trainable one whose
        parameters are set (`set_trainable`: DiffRate's search), runs its soft-mask forward:
        every token stays, a key mask removes them (docs/methods.md §2.7, §3.9), and the kept
        fraction per block is recorded with its gradient for the budget loss.
        grid_blocks: indices of the blocks whose outputs come back as `PatchGrid`s (each original
        token gets the feature of the token holding it, or the one it had when its token left;
        `ops.owners`). last_block: stop after this block (None: run every block).
        Returns the last block's output tokens and the grids in block order.
        """
        config = self.config
        batch = x.shape[0]
        trainable = self.trainable_parameters(model)
        soft = model.training and (config.learned or trainable is not None)
        if grid_blocks and soft:
            raise InvalidOptionError(
                f"{config.name}: patch grids are not available in the soft-mask training forward "
                "(model.train()); accepted: model.eval()"
            )
        source = None
        if config.trace_source:
            source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(batch, -1, -1)
        position = None
        if rotary is not None:
            position = grid_positions(rotary.grid_size, self.dims.num_prefix, batch).to(
                device=x.device, dtype=torch.promote_types(x.dtype, torch.float32)
            )
        owner = None
        if grid_blocks:
            owner = torch.arange(x.shape[1], device=x.device).expand(batch, -1)
        state = TokenState(
            num_prefix=self.dims.num_prefix,
            source=source,
            mask=x.new_ones(batch, x.shape[1]) if soft else None,
            position=position,
            position_rule=config.rope_position,
            owner=owner,
            batching=self.batching,
        )
        state = config.initial_state(x, state, self.dims)
        steps = self.steps
        if trainable is not None:
            steps = config.trainable_steps(self.steps, trainable)
        if last_block is not None:
            steps = steps[: last_block + 1]
        tokens_in = x.shape[1]
        counts, sizes, sources, fused, kept = [], [], [], [], []
        records: list[BlockRecord] = []
        grids: dict[int, PatchGrid] = {}
        layout = None
        # slicing a ModuleList builds a new one
        blocks = list(self.adapter.blocks(model))[: len(steps)]
        for index, (block, step) in enumerate(zip(blocks, steps, strict=True)):
            rope = None
            if rotary is not None:
                rope = self.adapter.rotary(
                    index, state, rotary, moved=carried_position(state, config.name) is not position
                )
            x, state, record, block_fused, layout = self.block_forward(
                block, x, state, step, layout, rope
            )
            counts.append(state.token_counts(x))
            sizes.append(state.size)
            fused.append(block_fused)
            if state.mask is not None:
                kept.append(state.mask.mean(dim=1))
            if state.source is not None:
                sources.append(state.source > 0)
            if record is not None:
                records.append(record)
            if index in grid_blocks:
                tokens = x if layout is None else layout.pad(x)
                grids[index] = PatchGrid(*held_features(tokens, state.owner, state.exited))
        if layout is not None:
            x = layout.pad(x)
        self._local.final_state = state
        device = next((c.device for c in counts if isinstance(c, torch.Tensor)), None)
        if device is None:  # every block kept a count shared by the batch: one small tensor
            tokens_per_block = torch.tensor(counts, dtype=torch.long).expand(batch, len(counts))
        else:  # per-image counts stay on the device (no sync); plain ints join them there
            per_block = [torch.as_tensor(c, device=device).expand(batch) for c in counts]
            tokens_per_block = torch.stack(per_block, dim=1).long()
        self._local.info = ReductionInfo(
            config=config,
            tokens_per_block=tokens_per_block,
            tokens_in=tokens_in,
            steps=self.steps[: len(steps)],
            sizes=sizes,
            source_blk=sources if config.trace_source else None,
            fused_attention=tuple(fused),
            records=config.record_type.stack(records),
            kept_fraction=torch.stack(kept, dim=1) if kept else None,
        )
        return x, [grids[index] for index in sorted(grids)]

    def last_grid(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        norm: nn.Module | None,
        pruned: str,
        grid_size: tuple[int, int],
        rotary: Any = None,
    ) -> torch.Tensor:
        """The blocks on `tokens` (entering the first block), and the last block's output on the
        original token grid [B, N0, C] through `norm` (see `grid_tokens`): what a family's
        `grid_features` returns for a reduced model."""
        _, (grid,) = self.run_blocks_with_grids(model, tokens, rotary, [self.dims.depth - 1])
        return grid_tokens(grid, norm, pruned, grid_size, self.dims.num_prefix)

    def final_state(self) -> TokenState | None:
        """The token state after the last block of this thread's last forward."""
        return getattr(self._local, "final_state", None)

    def last_info(self) -> ReductionInfo:
        info = getattr(self._local, "info", None)
        if info is None:
            raise NotReadyError(
                "no forward pass of this reduced model has run in this thread yet; run the model "
                "first, then call last_info(model)"
            )
        return info


def carried_position(state: TokenState, method: str) -> torch.Tensor:
    """The tokens' grid positions on a rotary model; a method that lost them is a bug."""
    if state.position is None:
        raise RuntimeError(
            f"method {method!r} returned a TokenState without token positions; a method must "
            "carry TokenState.position through its reduction on models with rotary embeddings "
            "(docs/methods.md §1.7)"
        )
    return state.position


def check_plain_forward(model: nn.Module, attn_mask: Any, is_causal: bool) -> None:
    """InvalidOptionError for forward arguments a reduced model cannot honour."""
    if attn_mask is not None or is_causal:
        raise InvalidOptionError(
            f"attn_mask={'given' if attn_mask is not None else None}, is_causal={is_causal}: a "
            "model with token reduction does not accept attention masks (tokens are merged and "
            "pruned, so a mask over the input tokens no longer lines up); accepted: "
            "attn_mask=None, is_causal=False, or tokenreduce.remove(model) first"
        )
    if getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled():
        raise InvalidOptionError(
            "grad_checkpointing=True is not supported by a model with token reduction; "
            "accepted: model.set_grad_checkpointing(False)"
        )
