"""What the steps of a tick add up to, kept where the steps run and read back once per tick.

A training step never reads a value back to the host (on an accelerator that read would wait for every queued
kernel): its loss, whether it was skipped and whether its gradients were clamped are added to device tensors,
and the positions the data loader delivered are kept as they came; :meth:`TickTally.read` turns all of it into
numbers at the end of the tick, and checks the data order then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


class DataOrderError(RuntimeError):
    """The data loader delivered other positions than the step layout asked for (a bug, not bad input)."""


@dataclass(frozen=True)
class TickSummary:
    """The numbers of one tick."""

    steps: int          # steps taken in the tick, skipped ones included
    applied: int        # steps whose update was applied
    skipped: int        # steps skipped for a non-finite loss (no optimizer or EMA update)
    clamped: int        # applied steps whose gradients had non-finite entries (clamped as EDM does)
    loss: float         # mean over the applied steps of their mean per-pixel loss (NaN when none was applied)
    loss_last: float    # the last applied step's loss (NaN when none was applied)


class TickTally:
    """Per-tick sums on ``device``: :meth:`add` once per step, :meth:`expect` once per batch, :meth:`read` once
    per tick (which starts the next tick)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._reset()

    def _reset(self) -> None:
        # [sum of the applied steps' losses, applied steps, skipped steps, clamped steps]
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.last = torch.full((), math.nan, dtype=torch.float64, device=self.device)
        self.steps = 0
        self.batches: list[tuple[int, int, Sequence[int], torch.Tensor]] = []

    def expect(self, step: int, round_index: int, expected: Sequence[int], positions: torch.Tensor) -> None:
        """Keep the positions a batch came with (a host tensor from the loader) to check them at the tick."""
        self.batches.append((step, round_index, expected, positions))

    def add(self, loss: torch.Tensor, skipped: torch.Tensor, clamped: torch.Tensor) -> None:
        """One step: its loss (0-dim float64) and two 0-dim bool flags, all on the device; no host read."""
        applied = ~skipped
        self.sums += torch.stack([torch.where(skipped, 0.0, loss), applied.double(), skipped.double(),
                                  (clamped.to(self.device) & applied).double()])
        self.last = torch.where(skipped, self.last, loss)
        self.steps += 1

    def read(self) -> TickSummary:
        """The tick's numbers (one read of the device) after checking the data order; starts the next tick."""
        self._check_order()
        loss_sum, applied, skipped, clamped, last = torch.cat([self.sums, self.last[None]]).tolist()
        summary = TickSummary(steps=self.steps, applied=int(applied), skipped=int(skipped), clamped=int(clamped),
                              loss=loss_sum / applied if applied else math.nan, loss_last=last)
        self._reset()
        return summary

    def _check_order(self) -> None:
        if not self.batches:
            return
        got = torch.cat([positions.reshape(-1) for *_, positions in self.batches]).tolist()
        start = 0
        for step, round_index, expected, positions in self.batches:
            received = got[start:start + positions.numel()]
            start += positions.numel()
            if received != list(expected):
                raise DataOrderError(f"data loader out of order at step {step} (round {round_index}): got "
                                     f"{received[:4]}..., expected {list(expected)[:4]}...")
