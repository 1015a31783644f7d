"""``rdm dataset`` (also ``python dataset_tool.py``): parses options and calls ``dataset_tool.build_datasets``."""

from __future__ import annotations

from collections.abc import Sequence

import click

from relay_diffusion.data.destinations import REPORT_SUFFIX
from relay_diffusion.data.tool import (
    BuildOptions,
    DatasetToolError,
    build_datasets,
    dest_paths,
    parse_background,
    parse_resolution,
)
from relay_diffusion.data.transforms import RESAMPLE, TRANSFORMS, Size


def _resolutions(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> list[Size]:
    try:
        return [parse_resolution(v) for v in values]
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _background(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int, int]:
    try:
        return parse_background(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--source", required=True, metavar="PATH", type=click.Path(exists=True),
              help="Image folder (searched recursively), zip of images, cifar-10-python.tar.gz (its 50,000 training "
                   "images), MNIST folder (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz; 28x28) or LSUN "
                   "lmdb (needs the lmdb package).")
@click.option("--dest", required=True, metavar="PATH",
              help="Output: a .zip, or a folder. With several --resolution values, one output each: {res} in PATH "
                   "becomes WxH (data-{res}.zip -> data-64x64.zip), otherwise -WxH is inserted before .zip "
                   "(data.zip -> data-64x64.zip) or appended to the folder name.")
@click.option("--max-images", type=click.IntRange(min=1),
              help="Stop after writing this many images (skipped files do not count).")
@click.option("--transform", type=click.Choice(TRANSFORMS), default="none", show_default=True,
              help="none: resize to --resolution, ignoring the aspect ratio. center-crop: crop the centre to the "
                   "aspect ratio of --resolution, then resize. center-crop-wide: the same for a wide WxH, then "
                   "centred on a black WxW square.")
@click.option("--resolution", "resolutions", multiple=True, metavar="WxH", callback=_resolutions,
              help="Output size (N means NxN); repeat it for several outputs with the same images in the same "
                   "order and the same labels (e.g. the 64x64 and 256x256 datasets of the two relay stages). "
                   "Default: the images' own size, which must then be the same for all.")
@click.option("--filter", "resample", type=click.Choice(list(RESAMPLE)), default="lanczos", show_default=True,
              help="Resampling filter. box by an integer factor p is the exact mean of each p x p block; with "
                   "several resolutions the smaller ones are then block means of the largest, i.e. the end point "
                   "of the RDM blur process.")
@click.option("--background", default="white", show_default=True, metavar="COLOUR", callback=_background,
              help="Colour behind transparent pixels: a name (white, black, ...) or #RRGGBB.")
@click.option("--channels", type=click.Choice(["auto", "1", "3"]), default="auto", show_default=True,
              help="1: grayscale, 3: RGB. auto: as the first readable image (grayscale images of an RGB dataset "
                   "are written as RGB).")
@click.option("--labels-from-folders", is_flag=True,
              help="Label each image by its first sub-folder (classes numbered in sorted order) instead of by the "
                   "source's dataset.json.")
@click.option("--workers", type=click.IntRange(min=1), help="Decoding processes.  [default: all cores]")
@click.option("--strict", is_flag=True, help="Fail at the first unreadable file instead of skipping it.")
@click.option("--overwrite", is_flag=True,
              help="Replace existing outputs, only if they are datasets written by rdm dataset (dataset.json and "
                   "NNNNN/imgNNNNNNNN.png, nothing else); never the source or anything around it.")
def dataset(source: str, dest: str, max_images: int | None, transform: str, resolutions: list[Size],
            resample: str, background: tuple[int, int, int], channels: str, labels_from_folders: bool,
            workers: int | None, strict: bool, overwrite: bool) -> None:
    """Build EDM-format datasets: a zip or folder of 00000/img00000000.png ... with labels in dataset.json.

    Unreadable files (truncated, corrupt, empty, not images) are skipped and listed in <output>.report.json
    beside each output. Outputs are written under a temporary name and renamed when complete; temporary files
    left by a killed earlier run for the same output are removed (and listed) at the start.
    """
    options = BuildOptions(
        transform=transform,
        resample=resample,
        background=background,
        channels=None if channels == "auto" else int(channels),
        max_images=max_images,
        labels_from_folders=labels_from_folders,
        workers=workers,
        strict=strict,
        overwrite=overwrite,
    )
    try:
        dests = dest_paths(dest, resolutions or [None])
        report = build_datasets(source, dests, options, log=lambda line: click.echo(line, err=True))
    except DatasetToolError as exc:
        if exc.option is not None:
            raise click.BadParameter(str(exc), param_hint=f"'{exc.option}'") from None
        if exc.usage:
            raise click.UsageError(str(exc)) from None
        raise click.ClickException(str(exc)) from None
    for path, size in report.outputs.items():
        res = f"{size[0]}x{size[1]}" if size else "original size"
        click.echo(f"Wrote {report.num_images} images ({res}) to {path}")
    if report.skipped:
        first = next(iter(report.outputs))
        names = ", ".join(repr(s["name"]) for s in report.skipped[:3]) + (", ..." if len(report.skipped) > 3 else "")
        click.echo(f"Skipped {len(report.skipped)} unreadable files ({names}), listed with the reasons in "
                   f"{first}{REPORT_SUFFIX}", err=True)
