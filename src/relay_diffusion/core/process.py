"""The stage-2 forward process as one typed config (docs/math.md §3-5, 6c).

A relay stage's network is only meaningful together with the forward process it was trained on: the relay
factor, the blur strength and its time schedule, the block noise. :class:`BlurProcess` owns these; the blur
loss, the relay sampler and its schedule all read them from here, and every stage-2 snapshot stores it.
Field names are the project's one name per quantity; the reference's command-line names are aliases at the
CLI edge only (:data:`REFERENCE_SAMPLING_NAMES`; the training flags are the field names).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from relay_diffusion.core.blur import MIN_SCALE, block_noise, blur_schedule, blur_strength


def _help(text: str) -> Any:
    return field(metadata={"help": text})


@dataclass(frozen=True)
class BlurProcess:
    """Blur diffusion (docs/math.md §3-5): inside every ``up_scale x up_scale`` patch, the DCT coefficient
    ``(i, j)`` of an image is scaled by ``A(t)`` and noise ``t (eps + block_scale block_noise(eps'))`` is added."""

    up_scale: int = field(default=4, metadata={"help": "Relay factor p: this stage's resolution / the previous one's",
                                               "min": 1})
    blur_sigma_max: float = field(default=3.0, metadata={"help": "Blur strength at the end of the blur schedule"})
    prob_length: float = field(default=0.93, metadata={
        "help": "Part L of the noise distribution covered by the blur schedule (its time truncation)"})
    block_scale: float = field(default=0.15, metadata={"help": "Strength of the block noise"})
    min_scale: float = field(default=MIN_SCALE, metadata={"help": "Smallest blur factor of a DCT coefficient"})

    def validate(self, names: Mapping[str, str] | None = None, training: bool = False) -> "BlurProcess":
        """Raise :class:`SettingError` (a ``ValueError``) naming the bad field (as ``names[field]`` when given, e.g.
        a CLI flag). ``training``: also the bounds of training a stage on this process (``prob_length`` <= 1: the
        blur loss draws its noise levels from that part of the distribution; sampling may extrapolate past it)."""
        def n(k: str) -> str:
            return (names or {}).get(k, k)
        _check(isinstance(self.up_scale, int) and self.up_scale >= 1, n("up_scale"),
               f"must be an integer >= 1, got {self.up_scale}")
        _check(math.isfinite(self.blur_sigma_max) and self.blur_sigma_max >= 0, n("blur_sigma_max"),
               f"must be a finite number >= 0, got {self.blur_sigma_max}")
        if training:
            _check(0 < self.prob_length <= 1, n("prob_length"), f"must be in (0, 1] for training, got {self.prob_length}")
        _check(math.isfinite(self.prob_length) and self.prob_length > 0, n("prob_length"),
               f"must be a finite number > 0, got {self.prob_length}")
        _check(math.isfinite(self.block_scale) and self.block_scale >= 0, n("block_scale"),
               f"must be a finite number >= 0, got {self.block_scale}")
        _check(0 < self.min_scale <= 1, n("min_scale"), f"must be in (0, 1], got {self.min_scale}")
        return self

    # --- the schedule (docs/math.md §6c) ---------------------------------------------------------
    def strength(self, t: torch.Tensor | float) -> torch.Tensor:
        """Blur strength ``b(t)`` at noise level ``t``, float64."""
        return blur_strength(t, self.blur_sigma_max, self.prob_length)

    def factors(self, t: torch.Tensor | float) -> torch.Tensor:
        """``A(t)`` in patch layout ``[*t.shape, p, 1, p]``, float64."""
        return blur_schedule(t, self.up_scale, self.blur_sigma_max, self.prob_length, self.min_scale)

    def noise(self, rng: Any, like: torch.Tensor) -> torch.Tensor:
        """The process's unit noise ``eps + block_scale block_noise(eps')`` shaped like ``like`` ``[N, C, H, W]``,
        drawn from the per-seed generators ``rng`` in docs/math.md §8 order (``eps'`` only when block_scale > 0):
        the one draw every relay sampler and solver makes."""
        eps = rng.randn_like(like)
        if self.block_scale > 0:
            eps = eps + self.block_scale * block_noise(rng.randn_like(like), self.up_scale)
        return eps

    # --- files -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "forward process") -> "BlurProcess":
        """Inverse of :meth:`to_dict`; unknown keys are an error. Also reads the reference's names."""
        from relay_diffusion.utils.strict import decode

        return decode(cls, d, where, "forward-process settings", aliases=REFERENCE_NAMES)

    def differences(self, other: "BlurProcess") -> dict[str, tuple[Any, Any]]:
        """``{field: (self's value, other's value)}`` for every field where the two differ."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


#: ``rdm generate`` flag (without ``--`` and the ``_second`` suffix) -> field: the reference's sampling names of
#: the forward process (its training flags are the field names themselves).
REFERENCE_SAMPLING_NAMES = {"up_scale": "up_scale", "blur_sigma_max": "blur_sigma_max",
                            "truncation_t": "prob_length", "s_block": "block_scale"}
#: The names a stored forward process may use besides the field names.
REFERENCE_NAMES = {"truncation_t": "prob_length", "s_block": "block_scale"}


class SettingError(ValueError):
    """A bad setting: ``name`` (the field, or what the caller calls it) and ``message`` (what is wrong with it)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name} {message}")
        self.name, self.message = name, message


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise SettingError(name, message)
