"""``rdm export``: a relay chain as one pipeline folder (``pipeline.json`` + each stage's network) that
``RelayPipeline.from_pretrained`` loads; the sampler settings given here become the folder's defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from relay_diffusion.cli.generate import _options, checked, cli_name, cli_options
from relay_diffusion.generation.configs import PRESETS


@click.command("export", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--out", "out", metavar="DIR", type=str, required=True, help="The pipeline folder to write")
@click.option("--network_first", metavar="PATH", type=str, help="Stage-1 network  [default: bundled]")
@click.option("--network_second", metavar="PATH", type=str, help="Relay (stage-2) or super-resolution network  "
              "[default: bundled]")
@click.option("--network_next", metavar="PATH", type=str, multiple=True, help="Further relay stages (repeatable)")
@_options
@click.option("--preset", type=click.Choice(sorted(PRESETS)),
              help="Sampler settings (and post-processing, guides) to start from  [default: emoji for the bundled "
                   "networks, else default]")
@click.option("--enhance/--no-enhance", default=None, help="Keep the preset's post-processing  [default: on]")
@click.option("--overwrite", is_flag=True, help="Replace the files of an existing pipeline folder")
def export(**opts: Any) -> None:
    """Write a pipeline folder for RelayPipeline.from_pretrained(DIR)."""
    from relay_diffusion.generation.pretrained import FILE
    from relay_diffusion.generation.settings import load

    out = Path(opts["out"])
    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out} exists and is not a folder", param_hint="--out")
    if (out / FILE).exists() and not opts["overwrite"]:
        raise click.BadParameter(f"{out / FILE} already exists (use --overwrite to replace it)", param_hint="--out")
    # the stage files are checked too once the chain is known (save_pretrained, overwrite=False)
    built = checked(load, cli_options(opts), "cpu", cli_name)
    for note in built.notes:
        click.echo(f"Note: {note}")
    try:
        path = built.pipeline.save_pretrained(out, overwrite=opts["overwrite"])
    except FileExistsError as exc:
        raise click.BadParameter(f"{exc.args[0].replace('(overwrite', '(use --overwrite')}", param_hint="--out")
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot write {out}: {exc}") from exc
    click.echo(f"Wrote {path} ({len(built.pipeline.stages)} stages); load it with "
               f"RelayPipeline.from_pretrained({str(out)!r})")
