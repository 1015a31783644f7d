"""Cascaded super-resolution (SR3 / CDM): a stage that generates the high-resolution image from pure noise,
conditioned on the nearest-upsampled low-resolution one (docs/math.md §13).

The conditioning is the alternative to relaying: the same low-resolution input, but as extra input channels of
an EDM denoiser instead of as the start of a blurring process. :class:`SRCondition` is what such a stage's
network is trained with (relay factor, noise-conditioning augmentation) and is stored in its snapshot, as
:class:`relay_diffusion.core.process.BlurProcess` is for a relay stage.

Noise-conditioning augmentation (Ho et al. 2022, "Cascaded Diffusion Models", arXiv 2106.15282, §4.2): during
training the low-resolution input is corrupted with Gaussian noise of a level drawn uniformly from
``[0, noise_aug]`` and the network is told the level (one extra constant input channel); at sampling a fixed
level is chosen. It makes the stage robust to the errors of the stage-1 samples it is fed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from relay_diffusion.core.blur import P_MEAN, P_STD
from relay_diffusion.core.losses import _prepare, edm_noise_level
from relay_diffusion.core.process import SettingError
from relay_diffusion.core.rng import SeedGenerators


@dataclass(frozen=True)
class SRCondition:
    """How a super-resolution stage sees its low-resolution input."""

    up_scale: int = field(default=4, metadata={"help": "Relay factor p: this stage's resolution / the input's"})
    noise_aug: float = field(default=0.0, metadata={
        "help": "Largest noise-conditioning augmentation level of the low-resolution input in training (0 = off)"})

    def validate(self, names: Mapping[str, str] | None = None) -> "SRCondition":
        def n(k: str) -> str:
            return (names or {}).get(k, k)
        if not (isinstance(self.up_scale, int) and self.up_scale >= 1):
            raise SettingError(n("up_scale"), f"must be an integer >= 1, got {self.up_scale}")
        if not (math.isfinite(self.noise_aug) and 0 <= self.noise_aug <= 10):
            raise SettingError(n("noise_aug"), f"must be in [0, 10], got {self.noise_aug}")
        return self

    @property
    def level_channel(self) -> bool:
        """Whether the network has the extra input channel that holds the augmentation level."""
        return self.noise_aug > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "super-resolution condition") -> "SRCondition":
        from relay_diffusion.utils.strict import decode

        return decode(cls, d, where, "super-resolution settings")


def downsample(images: torch.Tensor, up_scale: int) -> torch.Tensor:
    """Box-downsample ``[N, C, H, W]`` by ``up_scale``: the low-resolution image a stage 1 would generate (the
    relay stage's blur converges to the same patch means)."""
    return F.avg_pool2d(images, up_scale) if up_scale > 1 else images


def upsample(low: torch.Tensor, up_scale: int) -> torch.Tensor:
    """Nearest-neighbour upsampling ``[N, C, h, w] -> [N, C, h p, w p]``."""
    return low.repeat_interleave(up_scale, dim=2).repeat_interleave(up_scale, dim=3) if up_scale > 1 else low


def condition_input(low: torch.Tensor, level: torch.Tensor, eps: torch.Tensor | None, up_scale: int) -> torch.Tensor:
    """The conditioning image: ``upsample(low + level eps)`` (``eps`` None: no augmentation noise)."""
    if eps is not None:
        low = low + level.reshape(-1, 1, 1, 1).to(low.dtype) * eps.to(low.dtype)
    return upsample(low, up_scale)


@dataclass
class SRLoss:
    """EDM's loss for a super-resolution stage: ``lambda(sigma) |D(y + sigma eps, sigma; c) - y|^2`` with the
    conditioning ``c = upsample(downsample(y) + s eps_c)``, ``s ~ U[0, noise_aug]`` (0 when off).

    Draws per sample, in order: the noise level, the augmentation, the label-dropout coin, ``eps``, then (with
    noise augmentation) ``u`` for ``s`` and the low-resolution ``eps_c``.
    """

    condition: SRCondition = SRCondition()
    P_mean: float = P_MEAN
    P_std: float = P_STD
    sigma_data: float = 0.5
    label_dropout: float = 0.0

    def __call__(self, net, images, rng: SeedGenerators, labels=None, augment_pipe=None):
        p = self.condition.up_scale
        if images.shape[-1] % p or images.shape[-2] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by up_scale={p}")
        sigma, weight = edm_noise_level(rng, images, self.P_mean, self.P_std, self.sigma_data)
        y, labels, aug = _prepare(images, rng, labels, augment_pipe, self.label_dropout)
        noise = rng.randn_like(y).to(y.device) * sigma
        low = downsample(y, p)
        level = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
        eps_c = None
        if self.condition.noise_aug > 0:
            level = rng.rand([], dtype=y.dtype).to(y.device).reshape(-1) * self.condition.noise_aug
            eps_c = rng.randn_like(low).to(y.device)
        cond = condition_input(low, level, eps_c, p)
        out = net(y + noise, sigma.reshape(-1), class_labels=labels, augment_labels=aug, cond=cond, cond_level=level)
        return weight * (out - y).square()
