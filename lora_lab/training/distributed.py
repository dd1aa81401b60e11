"""Data-parallel training with PyTorch's own engine: ``torchrun --nproc_per_node=N -m lora_lab run``.

``torchrun`` starts N processes (ranks) and tells each its rank through the environment;
:func:`session` joins them into one process group (NCCL between GPUs, gloo between CPU processes),
and while it is open :func:`current` describes the run. The training loop then wraps the model in
``DistributedDataParallel``, which averages the gradients across ranks during the backward pass;
nothing here sends a tensor by hand.

What makes N processes train the model one process would:

* every rank draws the same global batch (the batches come from a seeded private generator) and
  keeps its own contiguous share of the rows (:meth:`Distributed.shard`);
* a rank's loss is weighted by its share of the rows, so that DDP's average of the ranks' gradients
  is the gradient of the global batch's mean loss, even when the rows do not divide evenly (a rank
  with no row at all runs one row at weight 0: DDP needs every rank in every backward pass);
* the logged loss is the global batch's mean (one scalar all-reduce per step), the same on every
  rank, so a non-finite loss stops every rank at the same step;
* dropout draws from the global generator, which each rank reseeds differently
  (:meth:`Distributed.seed_dropout`): with one seed, every rank's rows would get the same masks.

Only the order of floating-point sums differs from one process: the first steps' losses agree to
float rounding (tests/test_distributed.py states the tolerance), and over a long run those rounding
differences grow as they do between two kinds of CPU (README, "Several processes, and GPUs"). A run
on N processes repeats itself bit for bit. Rank 0 alone writes files; the other ranks wait at a
barrier and read what it wrote.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..runtime import select_device
from ..seeding import seed_everything

__all__ = ["Distributed", "current", "session", "RANK_SEED_STRIDE"]

#: Rank r reseeds dropout's generator with ``seed + RANK_SEED_STRIDE * r``: far from ``seed + 1``,
#: which the main job already uses for fine-tuning.
RANK_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: rank ``rank`` of ``world_size`` (``local_rank`` on its
    machine). ``active`` when a process group is open; a plain run is rank 0 of 1, inactive."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing to wait for in a plain run)."""
        if self.active:
            dist.barrier()

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank, so that all ranks take the same branch (whether a cached
        artifact exists, say, which another run could create between two ranks' looks)."""
        if not self.active:
            return flag
        # A tensor, not broadcast_object_list: that one pickles. NCCL moves CUDA tensors only.
        value = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(value, src=0)
        return bool(value.item())

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (a download, say), the other ranks after it, reusing its result."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: on CUDA, GPU ``local_rank``; otherwise ``device`` itself."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's contiguous share of the global batch's rows, and its weight: the share's
        size × world_size / rows (1.0 when the rows divide evenly, 0.0 for an empty share, which
        gets the first row so that its rank still runs a forward and backward pass)."""
        if not self.active:
            return x, y, 1.0
        rows = x.shape[0]
        start, stop = rows * self.rank // self.world_size, rows * (self.rank + 1) // self.world_size
        if start == stop:
            return x[:1], y[:1], 0.0
        return x[start:stop], y[start:stop], (stop - start) * self.world_size / rows

    def global_mean(self, local_mean: torch.Tensor, weight: float) -> float:
        """The global batch's mean loss from each rank's ``local_mean`` and :meth:`shard` weight."""
        if not self.active:
            return local_mean.item()
        total = (local_mean.detach().float() * (weight / self.world_size)).reshape(1)
        dist.all_reduce(total)  # one scalar per step; DDP itself averages the gradients
        return total.item()

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` under ``DistributedDataParallel`` (which first copies rank 0's parameters to
        every rank), or ``model`` itself in a plain run."""
        if not self.active:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def seed_dropout(self, seed: int) -> None:
        """Give each rank its own stream of the global generator (dropout's), derived from ``seed``."""
        if self.active:
            seed_everything(seed + RANK_SEED_STRIDE * self.rank, deterministic=False)

    def cache_key(self) -> dict:
        """The part of a cache key the number of processes decides: the order of the gradient sums,
        so the last bits. Empty for one process, so plain runs keep their keys."""
        return {"world_size": self.world_size} if self.world_size > 1 else {}


def current() -> Distributed:
    """The run this process belongs to: the open process group's rank and size, or a plain run."""
    if not (dist.is_available() and dist.is_initialized()):
        return Distributed()
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` (or ``torch.distributed.run``) started this process."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@contextlib.contextmanager
def session(device: str | None = None, *, timeout_minutes: float = 60.0) -> Iterator[Distributed]:
    """Join the process group when ``torchrun`` started this process (NCCL when the run's device is
    a CUDA GPU, gloo on CPUs), and leave it at the end; a plain run just gets :func:`current`.

    ``timeout_minutes`` bounds every wait, including the other ranks' wait while rank 0 evaluates
    and writes the results.
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run without torchrun")
    chosen = select_device(device)
    if chosen.type not in ("cuda", "cpu"):
        raise ValueError(f"multi-process runs train on CUDA GPUs or CPUs, not on {chosen.type}; pass --device cpu")
    local_rank, world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    if chosen.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; start at most "
                "that many processes per node (--nproc_per_node), or pass --device cpu"
            )
        torch.cuda.set_device(local_rank)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    try:
        context = current()
        if context.world_size != world:  # cannot happen with torchrun; a hand-set environment might
            raise RuntimeError(f"WORLD_SIZE says {world} processes, the process group has {context.world_size}")
        yield context
    finally:
        dist.destroy_process_group()
