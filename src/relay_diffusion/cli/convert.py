"""``rdm convert SRC DEST``: a reference ``.pkl`` / ``.pt`` checkpoint -> safetensors weights + JSON config."""

from __future__ import annotations

import click


@click.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("--key", default="ema", show_default=True, help="Entry of the checkpoint dict to convert (ema or net).")
@click.option("--fp16", is_flag=True, help="Store weights as float16 (loaded back as float32).")
def convert(src: str, dest: str, key: str, fp16: bool) -> None:
    """Convert SRC (reference .pkl/.pt, read without executing it) to DEST.safetensors and DEST.json."""
    import pickle

    import torch

    from relay_diffusion.checkpoints.snapshot import save_network
    from relay_diffusion.checkpoints.reference import load_reference_network

    from relay_diffusion.checkpoints.loading import load_network_file

    if src.endswith(".safetensors"):
        raise click.BadParameter(f"{src} is already a safetensors network", param_hint="SRC")
    try:
        net = load_reference_network(src, "cpu", key=key) if key != "ema" else load_network_file(src, "cpu").net
    except (ValueError, OSError, pickle.UnpicklingError, EOFError) as exc:
        raise click.ClickException(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)) from exc
    try:
        path = save_network(net, dest, extra={"source": click.format_filename(src), "source_key": key},
                            dtype=torch.float16 if fp16 else None)
    except OSError as exc:  # a full disk, a read-only or missing folder: the atomic write left nothing behind
        raise click.ClickException(f"cannot write {dest}: {exc.strerror or exc}") from None
    params = sum(p.numel() for p in net.parameters())
    click.echo(f"{type(net).__name__} ({params:,} parameters) -> {path} and {path.with_suffix('.json')}")
