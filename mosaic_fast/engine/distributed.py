"""torchrun / DistributedDataParallel plumbing: process group set-up and the few collectives we need.

A run launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment) joins a
process group: NCCL when training on CUDA (one GPU per local rank), gloo on CPU. Multi-node runs are
plain torchrun (``--nnodes``, ``--rdzv-endpoint``). Everything also works without torchrun (one process).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs, prints tables and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Several processes (under torchrun): DDP, barriers and cross-rank reductions are needed."""
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Pick the device and, under torchrun, initialise the process group (NCCL on CUDA, else gloo).

    ``device``: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N" (under torchrun the local rank
    chooses the GPU).
    """
    if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1:
        if use_cuda:
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return DistInfo(rank, world_size, local_rank, dev)
    dev = torch.device("cuda" if device == "auto" else device) if use_cuda else torch.device("cpu")
    return DistInfo(0, 1, 0, dev)


def teardown(synchronize: bool = True) -> None:
    """Leave the process group, if one was joined.

    First a garbage collection: DDP's reducer sits in reference cycles and holds the group (and its gloo
    work); left to interpreter shutdown, the group's worker threads then die taking the GIL during
    finalisation, which aborts the process ("terminate called without an active exception", SIGABRT;
    about 1 in 25 two-process CPU runs). ``synchronize`` (a run that ended normally on every rank): a
    barrier, so that no rank tears its connections down while another is still finishing. Pass False on
    an error path, where another rank may never arrive."""
    if dist.is_initialized():
        gc.collect()
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def all_gather_objects(obj: object, info: DistInfo) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a scalar tensor over the ranks (NaN/inf on any rank propagate to all)."""
    value = value.detach().float().clone()
    if info.enabled:
        dist.all_reduce(value)
        value /= info.world_size
    return value


def barrier(info: DistInfo) -> None:
    """Wait for every rank (nothing in a single process), e.g. while local rank 0 downloads the data."""
    if info.enabled:
        dist.barrier()
