"""``rdm ema``: post-hoc EMA (EDM2) from the profile snapshots of a run trained with ``--ema-profiles``.

Every bad input is reported as one ``Error: --option: ...`` line with exit status 1, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click


def _floats(option: str, text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.ClickException(f"{option}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise click.ClickException(f"{option}: expected at least one number")
    return values


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--run", "run_dir", metavar="DIR", type=str, help="Run folder trained with --ema-profiles")
@click.option("--length", metavar="FLOAT", type=str, help="EMA length sigma_rel to reconstruct, e.g. 0.10")
@click.option("--sweep", metavar="LIST", type=str,
              help="Instead: score these EMA lengths (e.g. 0.03,0.05,0.08,0.12) and plot the loss")
@click.option("--out", metavar="PATH", type=str,
              help="Network (.safetensors) or, with --sweep, plot (.png)  [default: in the run folder]")
@click.option("--nimg", metavar="INT", type=str, help="Training time of a snapshot  [default: the latest]")
@click.option("--from-profiles", metavar="LIST", type=str, help="Use only these tracked lengths  [default: all]")
@click.option("--images", metavar="INT", type=click.IntRange(min=1), default=256, show_default=True,
              help="--sweep: dataset images to score (each seen --repeats times with fixed noise)")
@click.option("--repeats", metavar="INT", type=click.IntRange(min=1), default=2, show_default=True,
              help="--sweep: noise draws per image")
@click.option("--device", metavar="STR", type=str, help="--sweep: cpu, cuda, ...  [default: cuda if available]")
def ema(run_dir: Optional[str], length: Optional[str], sweep: Optional[str], out: Optional[str],
        nimg: Optional[str], from_profiles: Optional[str], images: int, repeats: int, device: Optional[str]) -> None:
    """Reconstruct the network of any EMA length from one run (EDM2's post-hoc EMA), or sweep lengths.

    \b
    Examples:
      rdm train ... --ema-profiles=0.05,0.10 --snap=10
      rdm ema --run runs/00000-faces --length 0.13 --out net-ema0.13.safetensors
      rdm ema --run runs/00000-faces --sweep 0.03,0.05,0.08,0.12,0.16,0.2 --out sweep.png
    """
    from relay_diffusion.training.config import ConfigError
    from relay_diffusion.training.posthoc import plot_sweep, reconstruct_network, sweep_losses

    if run_dir is None:
        raise click.ClickException("--run: a run folder is required")
    if (length is None) == (sweep is None):
        raise click.ClickException("--length: give either --length or --sweep")
    at = None
    if nimg is not None:
        try:
            at = int(nimg)
        except ValueError:
            raise click.ClickException(f"--nimg: expected an integer, got {nimg!r}") from None
    profiles = _floats("--from-profiles", from_profiles)
    try:
        if length is not None:
            values = _floats("--length", length) or []
            if len(values) != 1:
                raise click.ClickException("--length: give one EMA length (--sweep takes several)")
            sigma = values[0]
            target = Path(out) if out else None
            if target is None:
                target = Path(run_dir) / f"network-posthoc-ema-{sigma:.4f}.safetensors"
            elif target.suffix != ".safetensors":
                raise click.ClickException(f"--out: expected a .safetensors file name, got {out}")
            path = reconstruct_network(run_dir, sigma, target, nimg=at, profiles=profiles)
            click.echo(f"Wrote {path} (EMA length {sigma})")
            return
        lengths = _floats("--sweep", sweep)
        target = Path(out) if out else Path(run_dir) / "posthoc-ema-sweep.png"
        if target.suffix != ".png":
            raise click.ClickException(f"--out: expected a .png file name with --sweep, got {out}")
        import torch

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(dev)
        except RuntimeError:
            raise click.ClickException(f"--device: unknown device {device!r}") from None
        result = sweep_losses(run_dir, lengths, nimg=at, profiles=profiles, num_images=images, repeats=repeats,
                              device=dev)
        plot_sweep(result, target)
        from relay_diffusion.utils.fileio import atomic_write_text

        atomic_write_text(target.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
        for p in result["points"]:
            click.echo(f"sigma_rel {p['sigma_rel']:<8.4f} loss {p['loss']:.6f}")
        best = min(result["points"], key=lambda p: p["loss"])
        click.echo(f"Best EMA length {best['sigma_rel']} (loss {best['loss']:.6f}); wrote {target} and "
                   f"{target.with_suffix('.json')}")
    except ConfigError as exc:
        raise click.ClickException(f"{exc.option}: {exc.message}") from None
    except OSError as exc:
        raise click.ClickException(f"--out: cannot write {out or 'the output'}: {exc}") from None
