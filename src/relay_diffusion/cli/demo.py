"""``rdm demo``: an 8x8 grid of relayed samples, the stage-1 grid they came from, and one relay trajectory.

Uses the bundled tiny emoji models (``relay_diffusion.checkpoints.bundled``) unless networks are given.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np


class StepBar:
    """A progress bar over sampler steps, usable as the samplers' callback (its total comes with the first step)."""

    def __init__(self, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit="step", dynamic_ncols=True, leave=False)

    def __call__(self, info: dict) -> None:
        if self.bar.total is None:
            self.bar.total = info["num_steps"]
        self.bar.update(1)

    def __enter__(self) -> "StepBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


@click.command("demo")
@click.option("--outdir", type=click.Path(file_okay=False), default="out/demo", show_default=True)
@click.option("--seeds", default="0-63", show_default=True, help="Seeds of the grid (e.g. 0-63).")
@click.option("--trajectory_seed", type=int, help="Seed whose relay trajectory is drawn  [default: the first]")
@click.option("--network_first", type=click.Path(dir_okay=False), help="Stage-1 network  [default: bundled]")
@click.option("--network_second", type=click.Path(dir_okay=False), help="Stage-2 network  [default: bundled]")
@click.option("--num_steps_first", type=click.IntRange(min=1), help="[default: the preset's: 9 for the bundled "
              "networks (emoji), else 18]")
@click.option("--num_steps_second", type=click.IntRange(min=1), help="[default: the preset's: 18]")
@click.option("--device", default=None, help="cpu, cuda, ...  [default: cuda if available, else cpu]")
def demo(outdir: str, seeds: str, trajectory_seed: int | None, network_first: str | None,
         network_second: str | None, num_steps_first: int | None, num_steps_second: int | None, device: str | None) -> None:
    """Write a grid of relayed samples from the bundled tiny models."""
    import torch.nn.functional as F

    from relay_diffusion.cli.generate import checked, cli_name
    from relay_diffusion.cli.options import parse_seeds
    from relay_diffusion.generation.settings import GenerationOptions, load, resolve
    from relay_diffusion.utils import distributed
    from relay_diffusion.utils.images import save_grid, to_uint8

    seed_list = parse_seeds(seeds, max_count=4096)
    if trajectory_seed is None:
        trajectory_seed = seed_list[0]
    if trajectory_seed not in seed_list:
        raise click.BadParameter(f"{trajectory_seed} is not one of --seeds", param_hint="--trajectory_seed")
    shown = seed_list.index(trajectory_seed)
    given = {"first": num_steps_first, "second": num_steps_second}
    steps = {which: {"num_steps": n} if n is not None else {} for which, n in given.items()}
    options = GenerationOptions(network_first=network_first, network_second=network_second,
                                first=steps["first"], second=steps["second"], seeds=seed_list)
    resolved = checked(resolve, options, cli_name)
    try:
        dev = distributed.pick_device(device, 0)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from exc
    built = checked(load, options, dev, cli_name, resolved)
    pipeline = built.pipeline
    for note in built.notes:
        click.echo(f"Note: {note}")

    # One pass through the pipeline (the same images as ``rdm generate`` with these networks, seeds and step
    # counts), with a callback that drives the progress bars and keeps one seed's relay trajectory.
    trajectory: list = []
    bars = [StepBar("stage 1"), StepBar("stage 2")]

    def step(info: dict) -> None:
        bars[info["stage"]](info)
        if info["stage"] == 1:
            trajectory.append(info["x"][shown:shown + 1])

    try:
        low, high = pipeline.run(seed_list, callback=step)
    finally:
        for bar in bars:
            bar.__exit__()
    up_scale = pipeline.stages[1].up_scale
    start = F.interpolate(low, scale_factor=up_scale, mode="nearest")
    out = Path(outdir)
    cols = int(np.ceil(np.sqrt(len(seed_list))))
    steps = [start[shown:shown + 1]] + trajectory
    try:
        relay = save_grid(to_uint8(high), out / "relay-grid.png", cols=cols)
        stage1 = save_grid(to_uint8(start), out / "stage1-grid.png", cols=cols)
        traj = save_grid(np.concatenate([to_uint8(x) for x in steps]), out / "relay-trajectory.png",
                         cols=len(steps), scale=2)
    except OSError as exc:  # each grid is written atomically: none is left half-written
        raise click.ClickException(f"cannot write into {out}: {exc.strerror or exc}") from None
    r1, r2 = pipeline.stages[0].resolution, pipeline.stages[1].resolution
    click.echo(f"{len(seed_list)} samples relayed {r1}x{r1} -> {r2}x{r2}:")
    click.echo(f"  relayed samples:  {relay}")
    click.echo(f"  stage-1 samples:  {stage1}")
    click.echo(f"  relay trajectory: {traj} (seed {trajectory_seed}: stage-1 start, then each relay step)")
