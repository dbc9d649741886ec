"""The processes of a run started by `torchrun` or `accelerate launch` (RANK, WORLD_SIZE and
LOCAL_RANK in the environment), for preprocessing, which shares its clips among them. Training
leaves all of this to accelerate.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, value) -> list:
        """Every process's value, in rank order, on every process."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def is_main_process() -> bool:
    """Whether this is the job's first process (RANK 0), without joining any process group."""
    return int(os.environ.get("RANK", 0)) == 0


def processes() -> Processes:
    """This process's place in the job; joins the job's process group (gloo: only small Python
    objects travel through it) when there are several processes."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return Processes(int(os.environ.get("RANK", 0)), world_size)


def balance(costs: list[float], world_size: int) -> list[int]:
    """The process each item goes to: the most expensive first, each to the least loaded process
    (ties to the lowest rank). The same costs give the same answer on every process."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [(0.0, rank) for rank in range(world_size)]
    owner = [0] * len(costs)
    for i in order:
        load, rank = heapq.heappop(loads)
        owner[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return owner


def any_process(accelerator, flag: bool) -> bool:
    """Whether flag is set on any process of the job (a stop signal may reach only some of them)."""
    wanted = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        wanted = accelerator.reduce(wanted, reduction="sum")
    return bool(wanted.item())
