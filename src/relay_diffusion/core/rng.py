"""Per-sample random number generation (docs/math.md §8).

Every sample owns a ``torch.Generator`` seeded with ``seed % 2**32``. Drawing a ``[N, ...]`` tensor
stacks one draw of the per-sample shape from each generator, so a sample depends on its seed only,
never on the batch it lands in or on the number of processes.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch


class SeedGenerators:
    """A batch of per-sample generators; the caller's only source of randomness.

    Draws return tensors of shape ``[len(seeds), *shape]``; ``shape`` is the per-sample shape.
    Generators live on ``device`` (CPU generators reproduce the fixtures).
    """

    def __init__(self, seeds: Iterable[int], device: torch.device | str = "cpu") -> None:
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(s % (1 << 32)) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def _stack(self, draw, shape: Sequence[int], dtype: torch.dtype | None) -> torch.Tensor:
        return torch.stack([draw(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators])

    def randn(self, shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Standard normal draws, ``[N, *shape]``."""
        return self._stack(torch.randn, shape, dtype)

    def rand(self, shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Uniform [0, 1) draws, ``[N, *shape]``."""
        return self._stack(torch.rand, shape, dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal draws shaped like ``x`` (``x.shape[0]`` must equal the number of seeds)."""
        if x.shape[0] != len(self):
            raise ValueError(f"batch of {x.shape[0]} samples but {len(self)} generators")
        return self.randn(x.shape[1:], dtype=x.dtype)

    def randint(self, low: int, high: int, shape: Sequence[int]) -> torch.Tensor:
        """Integer draws in ``[low, high)``, ``[N, *shape]``."""
        return torch.stack(
            [torch.randint(low, high, tuple(shape), generator=g, device=self.device) for g in self.generators]
        )

    def get_state(self) -> list[torch.Tensor]:
        """Generator states, for resuming."""
        return [g.get_state() for g in self.generators]

    def set_state(self, states: Sequence[torch.Tensor]) -> None:
        for g, s in zip(self.generators, states):
            g.set_state(s)
