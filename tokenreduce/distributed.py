"""Running under `torchrun`: process group set-up, data sharding and gathering on every rank.

Without torchrun's environment (WORLD_SIZE unset or 1) everything here is a no-op, so the same
code runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["T", "Context", "gather", "setup", "shard", "teardown"]


T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """rank / world of this process; device it computes on; whether a process group is up."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    active: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> Context:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if world <= 1:
        return Context(device=torch.device("cuda" if cuda else "cpu"))
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Context(rank=rank, world=world, device=target, active=True)


def shard(count: int, context: Context) -> list[int]:
    """This rank's share of `count` items: every world-th one, starting at its rank."""
    return list(range(context.rank, count, context.world))


def gather(value: T, context: Context) -> list[T]:
    """Every rank's `value`, in rank order, on every rank."""
    if not context.active:
        return [value]
    out: list[Any] = [None] * context.world  # all_gather_object fills it in place
    dist.all_gather_object(out, value)
    return out


def teardown(context: Context) -> None:
    if context.active and dist.is_initialized():
        dist.destroy_process_group()
