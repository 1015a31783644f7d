"""``rdm smoke``: run both samplers on the exact Gaussian denoiser (no weights needed) and write a grid.

A check that an installation works end to end: stage 1 at the low resolution, then the relay sampler
at ``up_scale`` times that resolution, through the same :class:`RelayPipeline` as every other command.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import torch.nn.functional as F


@click.command("smoke")
@click.option("--outdir", type=click.Path(file_okay=False), default="out/smoke", show_default=True)
@click.option("--seeds", default="0-15", show_default=True, help="Seeds, e.g. 0-15,100.")
@click.option("--resolution", type=click.IntRange(min=1, max=256), default=16, show_default=True, help="Stage-1 size.")
@click.option("--up-scale", type=click.IntRange(min=1, max=16), default=4, show_default=True, help="Relay factor.")
def smoke(outdir: str, seeds: str, resolution: int, up_scale: int) -> None:
    """Run the core relay sampler on a toy denoiser and write an image."""
    from relay_diffusion.core.process import BlurProcess
    from relay_diffusion.cli.options import parse_seeds
    from relay_diffusion.core.toy import GaussianToyDenoiser
    from relay_diffusion.generation import EDMStage, RelayPipeline, RelayStage
    from relay_diffusion.utils.images import save_grid, to_uint8

    seed_list = parse_seeds(seeds, max_count=1024)
    pipeline = RelayPipeline([EDMStage(GaussianToyDenoiser(3, resolution)),
                              RelayStage(GaussianToyDenoiser(3, resolution * up_scale),
                                         process=BlurProcess(up_scale=up_scale))])
    low, high = pipeline.run(seed_list)
    up = F.interpolate(low, scale_factor=up_scale, mode="nearest")
    out = Path(outdir)
    pairs = np.concatenate([to_uint8(up.clamp(-1, 1)), to_uint8(high)], axis=2)  # stage 1 | stage 2, side by side
    path = save_grid(pairs, out / "smoke-grid.png", scale=max(1, 128 // (resolution * up_scale)))
    click.echo(f"wrote {path} ({len(seed_list)} samples: stage 1 at {resolution}x{resolution} | "
               f"relayed to {resolution * up_scale}x{resolution * up_scale})")
