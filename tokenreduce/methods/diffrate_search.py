"""DiffRate's differentiable rate search (Chen et al., ICCV 2023): the learnable per-block rates,
the search forward of one block, and the schedule file the search writes.

Official code: OpenGVLab/DiffRate at commit 91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e,
DiffRate/ddp.py (class `DiffRate`: the rates and their straight-through masks),
DiffRate/patch/deit.py (`DiffRateBlock.forward`, training branch; `calculate_flop_training`),
DiffRate/merge.py (`get_merge_func(..., training=True)`), main.py and engine.py (the search
loop, which `tokenreduce.train` runs). docs/methods.md §3.9, "Search".

In every block but the first, a softmax over candidate kept patch counts (all patches, then one
granularity fewer at a time) gives an expected count, rounded up with a straight-through
gradient; the prefix is added. The search forward keeps every token: tokens are sorted by class
attention, and straight-through masks (0 at the positions the rounded counts remove, the
probability that a position is kept as gradient) remove them from the keys of later attention.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenreduce.dims import ModelDims
from tokenreduce.errors import InvalidOptionError, MissingFileError
from tokenreduce.methods.learned import metadata_object
from tokenreduce.methods.steps import Tokens, carried, kept_rows
from tokenreduce.ops.merging import mean_position, most_similar_stayer
from tokenreduce.state import AttentionOutputs, TokenState

__all__ = [
    "DEFAULT_GRANULARITY",
    "SCHEDULE_FACTS",
    "SCHEDULE_FORMAT",
    "SearchRates",
    "SearchStep",
    "check_schedule_facts",
    "read_schedule_file",
    "schedule_facts",
    "search_merged",
    "search_reduce",
    "straight_through_mask",
    "write_schedule_file",
]

SCHEDULE_FORMAT = "tokenreduce-diffrate-schedule/1"
DEFAULT_GRANULARITY = 4
"""Patch tokens between two candidate kept counts: the official `main.py --granularity` default
(49 candidates for 196 patches)."""
SCHEDULE_FACTS = ("depth", "num_patches", "num_prefix")
"""What a schedule file records of the model it was searched for, and `apply` checks."""


@dataclass(frozen=True)
class SearchStep:
    """One block of the search forward, computed from the rates once per forward.

    prune_kept, merge_kept: 0-d tensors, the expected kept counts rounded up, prefix included
        (gradient straight through the rounding).
    prune_mask, merge_mask: [N0] straight-through masks over the sorted positions, or None where
        the block does not prune (prune_kept >= tokens_in) / merge (merge_kept >= kept).
    tokens_in, kept, stay: tokens entering the block, after its pruning and after its merge.
    """

    prune_kept: torch.Tensor
    merge_kept: torch.Tensor
    prune_mask: torch.Tensor | None
    merge_mask: torch.Tensor | None
    tokens_in: int
    kept: int
    stay: int


def straight_through_mask(keep: torch.Tensor, kept: int, upto: int) -> torch.Tensor:
    """Forward 0 at positions kept..upto-1, 1 elsewhere; gradient that of `keep` [N0], the
    probability that each position is kept (official `get_token_mask(token_number)`: positions
    removed earlier are left to the mask they already carry)."""
    hard = torch.ones_like(keep)
    hard[kept:upto] = 0
    return hard - keep.detach() + keep


class SearchRates(nn.Module):
    """DiffRate's learnable rates (official `DiffRate` modules `prune_ddp` and `merge_ddp` of
    each block): per searched block, logits over the candidate kept patch counts.

    The first block is not searched (the official gives it one candidate, every patch). Logits
    start at 0 (every candidate equally likely), as the official `selected_probability`.

    Args:
        depth: blocks of the model.
        num_patches: non-prefix tokens entering the first block.
        num_prefix: prefix tokens, never removed (the official protects the class token).
        granularity: patch tokens between two candidates: num_patches, num_patches -
            granularity, ... down to the last one above 0 (official `kept_token_candidate`).
        dtype: of the logits (the search runs in at least float32).
    """

    def __init__(
        self,
        depth: int,
        num_patches: int,
        num_prefix: int,
        granularity: int = DEFAULT_GRANULARITY,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if isinstance(granularity, bool) or not isinstance(granularity, int):
            ok = False
        else:
            ok = 1 <= granularity < num_patches
        if not ok:
            raise InvalidOptionError(
                f"diffrate: option granularity={granularity!r} is not accepted; accepted: an int "
                f"in 1..{num_patches - 1} (patch tokens between two candidate counts of this "
                f"model's {num_patches} patches)"
            )
        self.num_prefix = num_prefix
        self.num_tokens = num_prefix + num_patches
        candidates = torch.arange(num_patches, 0, -granularity, dtype=dtype)
        # position j is kept by the candidates above j - P, a prefix of the descending
        # candidates, so its probability is a prefix sum, added in the official order
        positions = torch.arange(self.num_tokens)
        slot = (candidates[None, :] + num_prefix > positions[:, None]).sum(dim=1) - 1
        self.register_buffer("candidates", candidates, persistent=False)
        self.register_buffer("slot", slot, persistent=False)
        self.prune = nn.Parameter(torch.zeros(depth - 1, len(candidates), dtype=dtype))
        self.merge = nn.Parameter(torch.zeros(depth - 1, len(candidates), dtype=dtype))

    def kept(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One block's expected kept count, rounded up with a straight-through gradient, prefix
        included (0-d; official `update_kept_token_number`), and the probability that each of
        the N0 sorted positions is kept ([N0]; official `get_token_probability`), from its
        logits [K]."""
        probability = logits.softmax(dim=-1)
        expected = torch.matmul(self.candidates, probability)
        kept = expected + (expected.ceil() - expected).detach() + self.num_prefix
        return kept, probability.cumsum(dim=0)[self.slot]

    def steps(self) -> list[SearchStep | None]:
        """The search forward's step of every block (None: the first block), from the current
        rates. A block prunes only below the tokens entering it and merges only below those left
        after its pruning, as the official `DiffRateBlock.forward`."""
        steps: list[SearchStep | None] = [None]
        tokens = self.num_tokens
        for block in range(self.prune.shape[0]):
            prune_kept, prune_keep = self.kept(self.prune[block])
            merge_kept, merge_keep = self.kept(self.merge[block])
            prune_count, merge_count = int(prune_kept), int(merge_kept)
            prune_mask = merge_mask = None
            if prune_count < tokens:
                prune_mask = straight_through_mask(prune_keep, prune_count, tokens)
            kept = min(tokens, prune_count)
            if merge_count < kept:
                merge_mask = straight_through_mask(merge_keep, merge_count, kept)
            stay = min(kept, merge_count)
            steps.append(
                SearchStep(prune_kept, merge_kept, prune_mask, merge_mask, tokens, kept, stay)
            )
            tokens = stay
        return steps

    def token_counts(self, steps: Sequence[SearchStep | None]) -> torch.Tensor:
        """Tokens after each block [L] of a search forward: the fewest of those entering, the
        prune and the merge count, with the gradient of both counts and none through the tokens
        entering (official `ste_min` in `calculate_flop_training`), so that every block's rates
        learn from the cost of the blocks after them, pruning or not."""
        count = self.candidates.new_tensor(float(self.num_tokens))
        counts = []
        for step in steps:
            if step is not None:
                low = torch.minimum(torch.minimum(count, step.prune_kept), step.merge_kept)
                both = step.prune_kept + step.merge_kept
                count = both - both.detach() + low.detach()
            counts.append(count)
        return torch.stack(counts)

    def schedule(self, steps: Sequence[SearchStep | None]) -> tuple[list[int], list[int]]:
        """The per-block (prune_kept_num, merge_kept_num) of a search forward, prefix included:
        its rounded counts, N0 in the first block (official `get_kept_num`)."""
        prune = [self.num_tokens if s is None else int(s.prune_kept) for s in steps]
        merge = [self.num_tokens if s is None else int(s.merge_kept) for s in steps]
        return prune, merge


def search_merged(
    tokens: Tokens, num_prefix: int, kept: int, stay: int, destination_positions: bool
) -> Tokens:
    """The search forward's merge (official `get_merge_func(..., training=True)` and the size
    update around it): tokens stay..kept-1 join their most similar of the first `stay`
    (`most_similar_stayer`) but also stay in place, for the merge mask to remove; tokens from
    `kept` on are untouched.

    x: plain mean of the stayer and the tokens joining it. size: each stayer's and each joining
    token's similarity-weighted size clamped to >= 1 (the official training branch clamps, its
    inference does not), summed into the stayer; the joining tokens keep their clamped term.
    source: OR. position: the members' mean weighted by their sizes before this merge, or with
    `destination_positions` the stayer's. Sizes must be explicit; no padding, no owner map.
    """
    x, size = tokens.x, tokens.size
    similarity, stayer = most_similar_stayer(x[:, :kept], num_prefix, stay)
    index = stayer.unsqueeze(-1)

    def into_stayers(y: torch.Tensor, joining: torch.Tensor, mode: str) -> torch.Tensor:
        return y[:, :stay].scatter_reduce(
            1, index.expand(-1, -1, y.shape[-1]), joining, reduce=mode, include_self=True
        )

    joining = (size[:, stay:kept] * similarity.unsqueeze(-1).to(size.dtype)).clamp_min(1)
    stayers = into_stayers(size.clamp_min(1), joining, "sum")
    new_size = torch.cat([stayers, joining, size[:, kept:]], dim=1)
    new_x = torch.cat([into_stayers(x, x[:, stay:kept], "mean"), x[:, stay:]], dim=1)
    source, position = tokens.source, tokens.position
    if source is not None:
        source = torch.cat(
            [into_stayers(source, source[:, stay:kept], "amax"), source[:, stay:]], 1
        )
    if position is not None and not destination_positions:
        moment = position * size.to(position.dtype)
        weight = into_stayers(size, size[:, stay:kept], "sum").to(moment.dtype)
        merged = mean_position(into_stayers(moment, moment[:, stay:kept], "sum"), weight)
        position = torch.cat([merged, position[:, stay:]], dim=1)
    return Tokens(new_x, new_size, source, None, position, None)


def search_reduce(
    x: torch.Tensor, state: TokenState, attn: AttentionOutputs, step: SearchStep
) -> tuple[torch.Tensor, TokenState]:
    """One block of the search forward on the post-attention tokens x [B, N0, C] (every token
    stays; `state.mask` [B, N0] removes them as keys): sort by head-mean class attention
    (descending, prefix first), multiply the mask by the block's prune mask, merge (tokens stay
    in place) and multiply by its merge mask. The positions the masks remove are beyond the
    block's rounded counts, so they hold the least attended tokens and those merged away.
    A block that neither prunes nor merges changes nothing (the official still sorts, which
    only reorders tokens that no mask of this block reads)."""
    if step.prune_mask is None and step.merge_mask is None:
        return x, state
    prefix = state.num_prefix
    score = attn.cls_attn.mean(dim=1)[:, prefix:]
    order = score.sort(dim=1, descending=True).indices + prefix
    head = torch.arange(prefix, device=x.device).expand(x.shape[0], -1)
    rows = torch.cat([head, order], dim=1)
    tokens = kept_rows(carried(x, state, state.sizes_like(x)), rows)
    mask = state.mask.gather(1, rows)
    if step.prune_mask is not None:
        mask = mask * step.prune_mask
    if step.merge_mask is not None:
        tokens = search_merged(tokens, prefix, step.kept, step.stay, state.destination_positions)
        mask = mask * step.merge_mask
    state = state.with_tokens(
        size=tokens.size,
        source=tokens.source,
        valid=None,
        mask=mask,
        position=tokens.position,
        owner=None,
    )
    return tokens.x, state


# ---- the schedule file -------------------------------------------------------------------------
def schedule_facts(dims: ModelDims) -> dict[str, str | int]:
    """What a schedule file records of the model it was searched for (`SCHEDULE_FACTS`, and its
    name, for people)."""
    return {
        "name": dims.model_name,
        "depth": dims.depth,
        "num_patches": dims.num_patches,
        "num_prefix": dims.num_prefix,
    }


def _facts_text(facts: dict[str, Any]) -> str:
    return (
        f"depth {facts.get('depth')}, {facts.get('num_patches')} patches, "
        f"{facts.get('num_prefix')} prefix token(s)"
    )


def check_schedule_facts(path: str, facts: dict[str, Any], dims: ModelDims) -> None:
    """InvalidOptionError in one line when the schedule file `path` was searched for a model of
    another depth, patch count or prefix count than `dims`."""
    ours = schedule_facts(dims)
    differ = [key for key in SCHEDULE_FACTS if facts.get(key) != ours[key]]
    if differ:
        raise InvalidOptionError(
            f"diffrate: schedule file {path!r} was searched for a model with "
            f"{_facts_text(facts)}, not this one ({_facts_text(ours)}; {', '.join(differ)} "
            "differ); accepted: a schedule searched for this model (tokenreduce train --method "
            "diffrate)"
        )


def write_schedule_file(
    path: str | Path,
    prune: Sequence[int],
    merge: Sequence[int],
    dims: ModelDims,
    metadata: dict[str, Any],
) -> Path:
    """Save a searched schedule: per-block `prune_kept_num` and `merge_kept_num` (int64, prefix
    included), the format, the model facts and `metadata` (JSON values)."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "prune_kept_num": torch.tensor(list(prune), dtype=torch.int64),
        "merge_kept_num": torch.tensor(list(merge), dtype=torch.int64),
    }
    header = {
        "format": SCHEDULE_FORMAT,
        "method": "diffrate",
        "model_facts": json.dumps(schedule_facts(dims)),
        **{key: json.dumps(value) for key, value in metadata.items()},
    }
    path.write_bytes(save(tensors, metadata=header))
    return path


def read_schedule_file(path: str | Path) -> tuple[tuple[int, ...], tuple[int, ...], dict]:
    """(prune_kept_num, merge_kept_num, model facts) of a file `write_schedule_file` wrote."""
    from safetensors import SafetensorError, safe_open

    written = "a schedule file (.safetensors) written by tokenreduce train --method diffrate"
    accepted = f"accepted: {written}"
    if str(path) == "":  # Path("") is the current folder
        raise InvalidOptionError(f"diffrate: schedule file '' is an empty path; {accepted}")
    path = Path(path)
    if path.is_dir():
        raise InvalidOptionError(f"diffrate: schedule file {str(path)!r} is a folder; {accepted}")
    if not path.is_file():
        raise MissingFileError(f"diffrate: schedule file {str(path)!r} does not exist; {accepted}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as error:
        raise InvalidOptionError(
            f"diffrate: schedule file {str(path)!r} is not a safetensors file ({error}); {accepted}"
        ) from error
    if metadata.get("format") != SCHEDULE_FORMAT:
        raise InvalidOptionError(
            f"diffrate: schedule file {str(path)!r} has format {metadata.get('format')!r}; "
            f"accepted: {SCHEDULE_FORMAT!r} ({written})"
        )
    facts = metadata_object(path, metadata, "model_facts", "diffrate: schedule file", written)
    counts = []
    for key in ("prune_kept_num", "merge_kept_num"):
        tensor = tensors.get(key)
        ok = (
            tensor is not None
            and tensor.dtype == torch.int64
            and tensor.shape == (facts.get("depth"),)
            and bool((tensor >= 2).all())
        )
        if not ok:
            shape = None if tensor is None else tuple(tensor.shape)
            raise InvalidOptionError(
                f"diffrate: schedule file {str(path)!r}: {key} is {shape} "
                f"{'' if tensor is None else tensor.dtype}; accepted: int64 counts >= 2, one per "
                f"block of the model it records (depth {facts.get('depth')})"
            )
        counts.append(tuple(tensor.tolist()))
    return counts[0], counts[1], facts
