"""Sample grids written at every snapshot, so a run can be judged by eye.

Both go through the same :class:`RelayPipeline` as ``rdm generate``:
stage 1 samples seeds ``0..n-1`` (class ``seed % label_dim`` when conditional); stage 2 relays real images
box-downsampled by the relay factor, i.e. exactly what a stage-1 sample looks like to stage 2, under the
run's forward process (a super-resolution stage: conditioned on the same inputs).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.sr import SRCondition, downsample
from relay_diffusion.generation.pipeline import RelayPipeline
from relay_diffusion.generation.stages import EDMStage, RelayStage, SRStage
from relay_diffusion.utils import images as images_lib


def save_training_grid(images: torch.Tensor, path: Path, cols: Optional[int] = None) -> None:
    """Tile ``[N, C, H, W]`` images in [-1, 1] into one PNG, enlarged (nearest) to about 512 pixels wide."""
    cols = cols or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    scale = max(1, 512 // (cols * images.shape[-1]))
    images_lib.save_grid(images_lib.to_uint8(images.detach()), path, cols=cols, scale=scale)


def relay_inputs(images: torch.Tensor, up_scale: int) -> torch.Tensor:
    """Box-downsample by ``up_scale``: the stage-1-like low-resolution input of a relay stage."""
    return downsample(images, up_scale)


def _batches(num: int, batch: int):
    for start in range(0, num, batch):
        yield list(range(start, min(num, start + batch)))


@torch.no_grad()
def stage1_samples(net, num: int, batch: int) -> torch.Tensor:
    """Stage-1 images of seeds ``0..num-1``, ``[num, C, H, W]`` float32 in about [-1, 1]."""
    pipeline = RelayPipeline([EDMStage(net)])
    return torch.cat([pipeline(seeds).samples.float() for seeds in _batches(num, batch)])


@torch.no_grad()
def stage2_samples(net, inputs: torch.Tensor, labels: Optional[torch.Tensor], process: BlurProcess,
                   batch: int) -> torch.Tensor:
    """Relayed images of ``inputs [N, C, H/p, W/p]`` (see :func:`relay_inputs`) with seeds ``0..N-1``."""
    return _refined(RelayPipeline([RelayStage(net, process=process)]), inputs, labels, batch)


@torch.no_grad()
def sr_samples(net, inputs: torch.Tensor, labels: Optional[torch.Tensor], condition: SRCondition,
               batch: int) -> torch.Tensor:
    """Super-resolved images of ``inputs [N, C, H/p, W/p]`` with seeds ``0..N-1`` (default sampler settings)."""
    return _refined(RelayPipeline([SRStage(net, condition=condition)]), inputs, labels, batch)


def _refined(pipeline: RelayPipeline, inputs: torch.Tensor, labels: Optional[torch.Tensor], batch: int) -> torch.Tensor:
    out = []
    for seeds in _batches(len(inputs), batch):
        lab = labels[seeds[0]:seeds[-1] + 1] if labels is not None else None
        out.append(pipeline(seeds, class_labels=lab, inputs=inputs[seeds[0]:seeds[-1] + 1]).samples.float())
    return torch.cat(out)
