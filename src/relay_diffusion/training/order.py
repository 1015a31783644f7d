"""Which image, and which random numbers, every sample of every training step gets.

The step that starts after ``nimg`` images covers the global *positions* ``nimg, ..., nimg + B - 1`` (``B``
the global batch). Position ``q`` shows image ``perm_e[q mod n]`` of epoch ``e = q // n`` (one seeded
permutation per epoch) and draws its noise level, augmentation, label dropout and noise from a generator
seeded by ``mix(seed, q)``. Processes and accumulation rounds only decide who computes which position, so one
process and two processes at the same global batch see the same images and noise, and a resumed run
continues exactly where it stopped. (``nn.Dropout`` inside the networks draws from the global generator,
seeded per step, process and round: reproducible, but it depends on how the batch is split.)
"""

from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def mix(*values: int) -> int:
    """Hash integers to a seed in ``[0, 2**63)`` (SplitMix64 finaliser, chained): well spread, stable."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def sample_seeds(seed: int, positions: Sequence[int]) -> list[int]:
    """Per-sample generator seeds for global positions (see the module docstring)."""
    return [mix(seed, 1, int(q)) for q in positions]


def dropout_seed(seed: int, step: int, rank: int, round_index: int) -> int:
    """Seed of the global generator during one forward/backward (the networks' ``nn.Dropout`` draws from it)."""
    return mix(seed, 2, step, rank, round_index)


class DataOrder:
    """Maps global positions to dataset indices: a fresh seeded permutation of the ``size`` images per epoch."""

    def __init__(self, size: int, seed: int) -> None:
        if size < 1:
            raise ValueError("empty dataset")
        self.size, self.seed = size, seed
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._cache.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(mix(self.seed, 3, epoch) % (1 << 63))
            perm = torch.randperm(self.size, generator=g).numpy()
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = perm
        return perm

    def index(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.size)
        return int(self.permutation(epoch)[offset])


class StepLayout:
    """How one step's global batch is split: round-major, then rank, ``batch_gpu`` positions each."""

    def __init__(self, batch: int, batch_gpu: int, world_size: int) -> None:
        if batch % (batch_gpu * world_size):
            raise ValueError(f"batch {batch} is not divisible by batch_gpu {batch_gpu} x {world_size} processes")
        self.batch, self.batch_gpu, self.world_size = batch, batch_gpu, world_size
        self.rounds = batch // (batch_gpu * world_size)

    def positions(self, nimg: int, round_index: int, rank: int) -> range:
        """Positions of ``rank`` in a round of the step that starts after ``nimg`` images."""
        start = nimg + (round_index * self.world_size + rank) * self.batch_gpu
        return range(start, start + self.batch_gpu)

    def rank_batches(self, rank: int, nimg: int) -> Iterator[list[int]]:
        """This rank's position lists, step by step and round by round, from ``nimg`` images on (endless)."""
        while True:
            for r in range(self.rounds):
                yield list(self.positions(nimg, r, rank))
            nimg += self.batch


class PositionDataset(torch.utils.data.Dataset):
    """``dataset`` indexed by global position: ``[q] -> (uint8 image [C, H, W], label, q)``."""

    def __init__(self, dataset, order: DataOrder) -> None:
        self.dataset, self.order = dataset, order

    def __len__(self) -> int:  # positions are unbounded; the batch sampler decides which are read
        return len(self.dataset)

    def __getitem__(self, position: int):
        image, label = self.dataset[self.order.index(position)]
        return torch.as_tensor(np.ascontiguousarray(image)), torch.as_tensor(label), int(position)


#: Loader workers per training process by default, where the machine has the cores for them.
DEFAULT_WORKERS = 2


def default_workers(local_processes: int = 1, cpus: Optional[int] = None) -> int:
    """``--workers`` left out: :data:`DEFAULT_WORKERS` per process, but never more than its share of this
    machine's CPUs minus one (the training process's own core); 0 loads in the training process itself."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(DEFAULT_WORKERS, cpus // max(1, local_processes) - 1))


def make_loader(dataset, order: DataOrder, layout: StepLayout, rank: int, nimg: int, workers: int,
                pin_memory: bool) -> Iterator:
    """Batches ``(images uint8 [b, C, H, W], labels [b, L], positions [b])`` for this rank, from ``nimg`` on.

    The one iterator lives as long as the run (the batch sampler is endless), so its workers persist; each
    keeps two batches ready. ``pin_memory``: batches arrive in page-locked memory, for asynchronous copies.
    """
    return iter(torch.utils.data.DataLoader(
        PositionDataset(dataset, order), batch_sampler=layout.rank_batches(rank, nimg),
        num_workers=workers, pin_memory=pin_memory, prefetch_factor=2 if workers > 0 else None,
    ))


def device_batch(images: torch.Tensor, labels: Optional[torch.Tensor],
                 device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A loader batch on ``device``: images ``[b, C, H, W]`` uint8 -> float32 in [-1, 1], labels float32.

    The uint8 batch is copied as it is (a quarter of the float32 bytes; asynchronous from pinned memory) and
    converted on the device; the result is bit-identical to converting first.
    """
    images = images.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1
    if labels is not None:
        labels = labels.to(device, non_blocking=True).to(torch.float32)
    return images, labels
