"""Thin wrappers around ``torch.distributed`` for ``torchrun`` (env:// rendezvous, ports never forced).

One process per device. Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything runs in a
single process and these functions are no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """Number of processes announced by ``torchrun`` (1 without it); readable before initialisation."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(requested: str | None, local_rank: int) -> torch.device:
    """``requested`` as given, except that a bare ``cuda`` means ``cuda:LOCAL_RANK``; ``None`` or ``auto``:
    cuda if present, else cpu. An unknown device string raises ValueError naming it."""
    if requested in (None, "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {requested!r}: {exc}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {requested!r} is not supported (use cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested!r}: CUDA is not available on this machine (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def init(requested_device: str | None) -> DistContext:
    """Join the process group that ``torchrun`` describes (gloo on CPU, NCCL on CUDA)."""
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown(wait: bool = False) -> None:
    """Leave the process group (no-op without one); ``wait``: first wait for every process."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes (in place, returned for chaining)."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every process (e.g. the run folder, a random seed)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
