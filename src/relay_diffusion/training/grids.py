"""Sample grids written at every snapshot, so a run can be judged by eye.

Stage 1: the EDM sampler from fixed seeds ``0..n-1`` (class ``seed % label_dim`` when conditional).
Stage 2: the relay sampler started from real images that were box-downsampled by the relay factor and
upsampled again by nearest neighbour, i.e. exactly what a stage-1 sample looks like to stage 2.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from relay_diffusion.utils import images as images_lib
from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.core.samplers import edm_sampler, relay_sampler


def save_grid(images: torch.Tensor, path: Path, cols: Optional[int] = None) -> None:
    """Tile ``[N, C, H, W]`` images in [-1, 1] into one PNG, enlarged (nearest) to about 512 pixels wide."""
    cols = cols or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    scale = max(1, 512 // (cols * images.shape[-1]))
    images_lib.save_grid(images_lib.to_uint8(images.detach()), path, cols=cols, scale=scale)


def relay_start(images: torch.Tensor, up_scale: int) -> torch.Tensor:
    """Box-downsample by ``up_scale`` and upsample back by nearest neighbour: a stage-1-like start image."""
    low = F.avg_pool2d(images, up_scale)
    return low.repeat_interleave(up_scale, dim=2).repeat_interleave(up_scale, dim=3)


def _labels(seeds: list[int], label_dim: int, device: torch.device) -> Optional[torch.Tensor]:
    if not label_dim:
        return None
    return F.one_hot(torch.tensor([s % label_dim for s in seeds], device=device), label_dim).to(torch.float32)


@torch.no_grad()
def stage1_samples(net, num: int, channels: int, resolution: int, label_dim: int, device: torch.device,
                   batch: int) -> torch.Tensor:
    """EDM-sampler images of seeds ``0..num-1``, ``[num, C, H, W]`` float32 in about [-1, 1]."""
    out = []
    for start in range(0, num, batch):
        seeds = list(range(start, min(num, start + batch)))
        rng = SeedGenerators(seeds, device)
        latents = rng.randn([channels, resolution, resolution])
        out.append(edm_sampler(net, latents, rng, _labels(seeds, label_dim, device)).float())
    return torch.cat(out)


@torch.no_grad()
def stage2_samples(net, starts: torch.Tensor, labels: Optional[torch.Tensor], up_scale: int,
                   blur_sigma_max: float, batch: int) -> torch.Tensor:
    """Relay-sampler images from ``starts [N, C, H, W]`` (see :func:`relay_start`) with seeds ``0..N-1``."""
    out = []
    for start in range(0, len(starts), batch):
        end = min(len(starts), start + batch)
        rng = SeedGenerators(range(start, end), starts.device)
        lab = labels[start:end] if labels is not None else None
        out.append(relay_sampler(net, starts[start:end], rng, lab, up_scale=up_scale,
                                 blur_sigma_max=blur_sigma_max).float())
    return torch.cat(out)
