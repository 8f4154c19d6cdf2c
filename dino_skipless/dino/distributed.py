"""torch.distributed from torchrun's environment: NCCL on GPU, gloo on CPU; rank helpers.

``torchrun --nproc_per_node=N [--nnodes ... --rdzv_endpoint ...] -m dino_skipless.pretrain``
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; with them the
process group is initialised even for one process (``--nproc_per_node=1`` runs DDP and NCCL on one
GPU: ``scripts/gpu_check.py`` checks them so); without them the run is a single process and
nothing is initialised (as official DINO's
``init_distributed_mode`` fallback, minus its SLURM branch: use torchrun/srun with torchrun).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Under torchrun, even with one process: the student in DDP, collectives for real."""
        return self.backend is not None


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name in ("auto", "", None):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} asked for but CUDA is not available")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Initialise the default process group if launched by torchrun (idempotent).

    ``timeout_s``: how long a collective waits for the slowest rank before failing (rank 0's
    epoch-end work, checkpoint and exports, runs while the others wait at the next collective).
    On CUDA the group is bound to this rank's GPU at init (``device_id``), so NCCL builds its
    communicator eagerly instead of at the first collective."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:  # not under torchrun
        return DistEnv(0, 1, 0, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(
            backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s), **kwargs
        )
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy; the input is untouched). Identity in a single process."""
    if not is_dist():
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
