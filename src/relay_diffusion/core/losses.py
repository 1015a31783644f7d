"""Training losses (docs/math.md §5): EDM's VP, VE and EDM losses for stage 1, the blur loss for stage 2.

Each loss is a small callable ``loss(net, images, rng, labels=None, augment_pipe=None) -> [N, C, H, W]``
returning per-pixel weighted squared errors. Every random draw comes from ``rng`` (per-sample generators,
:class:`relay_diffusion.core.rng.SeedGenerators`), in this order per sample: the noise level, the augmentation,
the label-dropout coin, the noise ``eps``, and (blur loss with block noise) ``eps'``.
The training loop sums the result and divides by its per-process batch (docs/math.md §5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from relay_diffusion.core.blur import P_MEAN, P_STD, block_noise, blur, normal_cdf, normal_icdf
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.rng import SeedGenerators

AugmentPipe = Optional[Callable[[torch.Tensor, SeedGenerators], tuple[torch.Tensor, torch.Tensor]]]

#: Upper bound of the blur loss weight, which otherwise explodes at the smallest noise levels.
MAX_WEIGHT = 1e5


def _prepare(
    images: torch.Tensor, rng: SeedGenerators, labels: torch.Tensor | None, augment_pipe: AugmentPipe,
    label_dropout: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Augment (returns the augmentation labels) and apply label dropout for classifier-free guidance."""
    aug_labels = None
    if augment_pipe is not None:
        images, aug_labels = augment_pipe(images, rng)
    if labels is not None and label_dropout > 0:
        keep = rng.rand([1], dtype=torch.float32).to(labels.device) >= label_dropout
        labels = labels * keep.to(labels.dtype)
    return images, labels, aug_labels


def _denoise(net, x, sigma, labels, aug_labels):
    return net(x, sigma.reshape(-1), class_labels=labels, augment_labels=aug_labels)


def _noise_level_loss(net, images, rng, labels, augment_pipe, label_dropout, sigma, weight) -> torch.Tensor:
    """``weight (D(y + sigma eps, sigma) - y)^2`` for the (augmented) images ``y``: the EDM-family losses."""
    y, labels, aug = _prepare(images, rng, labels, augment_pipe, label_dropout)
    n = rng.randn_like(y).to(y.device) * sigma
    return weight * (_denoise(net, y + n, sigma, labels, aug) - y).square()


def edm_noise_level(rng: SeedGenerators, images: torch.Tensor, P_mean: float, P_std: float,
                    sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM's training noise level and weight, ``[N, 1, 1, 1]``: ``ln sigma ~ N(P_mean, P_std^2)`` (one draw per
    sample), weight ``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2``."""
    n_level = rng.randn([1, 1, 1], dtype=images.dtype).to(images.device)
    sigma = (n_level * P_std + P_mean).exp()
    return sigma, (sigma.square() + sigma_data**2) / (sigma * sigma_data).square()


@dataclass
class VPLoss:
    """EDM's VP loss: ``t = 1 + u (epsilon_t - 1)``, ``sigma = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``."""

    beta_d: float = 19.9
    beta_min: float = 0.1
    epsilon_t: float = 1e-5
    label_dropout: float = 0.0

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return ((0.5 * self.beta_d * t.square() + self.beta_min * t).exp() - 1).sqrt()

    def __call__(self, net, images, rng: SeedGenerators, labels=None, augment_pipe: AugmentPipe = None):
        u = rng.rand([1, 1, 1], dtype=images.dtype).to(images.device)
        sigma = self.sigma(1 + u * (self.epsilon_t - 1))
        weight = 1 / sigma.square()
        return _noise_level_loss(net, images, rng, labels, augment_pipe, self.label_dropout, sigma, weight)


@dataclass
class VELoss:
    """EDM's VE loss: ``sigma = sigma_min (sigma_max / sigma_min)^u``, weight ``1 / sigma^2``."""

    sigma_min: float = 0.02
    sigma_max: float = 100.0
    label_dropout: float = 0.0

    def __call__(self, net, images, rng: SeedGenerators, labels=None, augment_pipe: AugmentPipe = None):
        u = rng.rand([1, 1, 1], dtype=images.dtype).to(images.device)
        sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** u
        weight = 1 / sigma.square()
        return _noise_level_loss(net, images, rng, labels, augment_pipe, self.label_dropout, sigma, weight)


@dataclass
class EDMLoss:
    """EDM's loss (Karras et al. 2022, eq. 8): ``ln sigma ~ N(P_mean, P_std^2)``,
    weight ``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2``."""

    P_mean: float = P_MEAN
    P_std: float = P_STD
    sigma_data: float = 0.5
    label_dropout: float = 0.0

    def __call__(self, net, images, rng: SeedGenerators, labels=None, augment_pipe: AugmentPipe = None):
        sigma, weight = edm_noise_level(rng, images, self.P_mean, self.P_std, self.sigma_data)
        return _noise_level_loss(net, images, rng, labels, augment_pipe, self.label_dropout, sigma, weight)


@dataclass
class BlurLossConfig:
    """Settings of the stage-2 blur loss (docs/math.md §5); defaults are the ImageNet ones."""

    process: BlurProcess = BlurProcess()  # relay factor, blur schedule and block noise
    P_mean: float = P_MEAN
    P_std: float = P_STD
    sigma_data: float = 0.5
    # smallest trained noise level (before the reference's extra factor L); not the relay sampler's
    # ``truncation_sigma`` (where sampling starts, generation/configs.py): both names are the reference's
    truncate_sigma: float = 0.0075


def blur_loss_levels(u: torch.Tensor, cfg: BlurLossConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise level, blur strength and weight for uniform draws ``u`` (docs/math.md §5), all float64.

    ``u`` is clamped below at ``Phi((ln truncate_sigma - P_mean) / P_std) * L``; the reference multiplies by
    ``L`` there *and* again in ``sigma``, so the smallest level is slightly below ``truncate_sigma``. Kept.
    """
    u = u.to(torch.float64)
    L = cfg.process.prob_length
    u_min = float(normal_cdf((math.log(cfg.truncate_sigma) - cfg.P_mean) / cfg.P_std)) * L
    u = u.clamp(min=u_min)
    b = cfg.process.blur_sigma_max * torch.sin(u * math.pi / 2).square()
    sigma = torch.exp(normal_icdf(u * L) * cfg.P_std + cfg.P_mean)
    weight = ((sigma.square() + cfg.sigma_data**2) / (sigma * cfg.sigma_data).square()).clamp(max=MAX_WEIGHT)
    return sigma, b, weight


def blur_loss_input(
    y: torch.Tensor, sigma: torch.Tensor, b: torch.Tensor, eps: torch.Tensor, eps_block: torch.Tensor | None,
    cfg: BlurLossConfig,
) -> torch.Tensor:
    """The network input of the blur loss: ``blur(y, b) + sigma eps + block_scale sigma block_noise(eps')``."""
    dtype = torch.promote_types(y.dtype, sigma.dtype)
    y, sigma, b, eps = y.to(dtype), sigma.to(dtype), b.to(dtype), eps.to(dtype)
    process = cfg.process
    x = blur(y, b, process.up_scale, process.min_scale) + sigma * eps
    if process.block_scale > 0 and eps_block is not None:
        x = x + process.block_scale * sigma * block_noise(eps_block.to(dtype), process.up_scale)
    return x


@dataclass
class BlurLoss:
    """Stage-2 loss (docs/math.md §5): denoise a blurred, noisy image back to the sharp one."""

    config: BlurLossConfig
    label_dropout: float = 0.0

    def __call__(self, net, images, rng: SeedGenerators, labels=None, augment_pipe: AugmentPipe = None):
        cfg, p = self.config, self.config.process.up_scale
        if images.shape[-1] % p or images.shape[-2] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by up_scale={p}")
        u = rng.rand([1, 1, 1], dtype=torch.float32).to(images.device)
        sigma, b, weight = blur_loss_levels(u, cfg)
        y, labels, aug = _prepare(images, rng, labels, augment_pipe, self.label_dropout)
        eps = rng.randn_like(y).to(y.device)
        eps_block = rng.randn_like(y).to(y.device) if cfg.process.block_scale > 0 else None
        x = blur_loss_input(y, sigma, b, eps, eps_block, cfg).to(y.dtype)
        sigma, weight = sigma.to(y.dtype), weight.to(y.dtype)
        return weight * (_denoise(net, x, sigma, labels, aug) - y).square()
