"""Multi-process training through PyTorch's own engine (torchrun + DistributedDataParallel).

`dvp train --gpus N` re-runs itself under `torchrun --standalone --nproc-per-node N`; each
worker then finds WORLD_SIZE, RANK and LOCAL_RANK in its environment (`from_env`), joins the
process group (NCCL on CUDA, gloo on the CPU) and trains on its share of every global batch.
If one rank fails, torchrun stops the others and reports the failing rank's error (workers
wrap their entry point in `record` so the traceback reaches torchrun's summary).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place in the run: `rank` of `size` processes, `local_rank` on its host."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, samples and logs."""
        return self.rank == 0


def from_env() -> World:
    """The World described by torchrun's environment variables (a single process without)."""
    return World(rank=int(os.environ.get("RANK", "0")), size=int(os.environ.get("WORLD_SIZE", "1")),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def join(world: World, device: torch.device) -> torch.device:
    """Join the process group when `world.size > 1`; return this rank's device.

    On CUDA each rank takes `cuda:LOCAL_RANK` and the NCCL backend; on the CPU, gloo.
    """
    if world.size == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=world.rank, world_size=world.size)
    log.info("rank %d of %d on %s", world.rank, world.size, device)
    return device


def leave(world: World) -> None:
    """Leave the process group joined by `join` (nothing for a single process)."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(nproc: int, program: list[str]) -> list[str]:
    """The command running `program` in `nproc` processes under torchrun (one host).

    program: `["-m", module, *args]` or `[script, *args]`, as after `python`.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", *program]
