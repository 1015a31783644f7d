"""Image files of generation (docs/math.md §8): ``{seed:06d}.png``, optionally in thousands sub-folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from relay_diffusion.utils.images import from_uint8, save_grid, save_png
from relay_diffusion.utils.limits import open_image


def image_path(outdir: str | os.PathLike, seed: int, subdirs: bool = False) -> Path:
    """``outdir/{seed:06d}.png``, or ``outdir/{seed - seed % 1000:06d}/{seed:06d}.png`` with ``subdirs``."""
    outdir = Path(outdir)
    return (outdir / f"{seed - seed % 1000:06d}" if subdirs else outdir) / f"{seed:06d}.png"


def is_valid_image(path: Path, shape: tuple[int, int, int]) -> bool:
    """True when ``path`` is a complete PNG of ``(H, W, C)`` (a zero-byte or truncated file is not)."""
    try:
        with open_image(path) as img:
            img.load()
            channels = {"L": 1, "RGB": 3}.get(img.mode)
            return img.format == "PNG" and (img.height, img.width, channels) == shape
    except (OSError, ValueError, SyntaxError):
        return False


def find_image(indir: str | os.PathLike, seed: int) -> Path | None:
    """The stage input for ``seed`` in the reference's layout (thousands sub-folders) or flat, else None."""
    for subdirs in (True, False):
        path = image_path(indir, seed, subdirs)
        if path.is_file():
            return path
    return None


def check_images(indir: str | os.PathLike, seeds: Sequence[int]) -> None:
    """Raise one ``FileNotFoundError`` listing every seed whose input image is missing from ``indir``."""
    missing = [str(image_path(indir, s, True)) for s in seeds if find_image(indir, s) is None]
    if missing:
        raise FileNotFoundError(f"{len(missing)} input image(s) missing from {indir} (looked for "
                                f"<thousands>/<seed>.png and <seed>.png):\n  " + "\n  ".join(missing))


def load_images(indir: str | os.PathLike, seeds: Sequence[int],
                shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Read the PNGs of ``seeds`` from ``indir`` as float64 ``[N, C, H, W]``: ``v / 127.5 - 1`` (docs/math.md §8).
    Every missing file is listed in one ``FileNotFoundError``; an image that is not 8-bit grey or RGB, or not of
    ``shape`` ``(C, H, W)`` when given, is a ``ValueError`` naming it."""
    check_images(indir, seeds)
    paths = {s: find_image(indir, s) for s in seeds}
    images = []
    for seed, path in paths.items():
        try:
            with open_image(path) as img:  # a decompression bomb is refused before decoding
                if img.mode not in ("L", "RGB"):  # RGBA, palette, 16-bit: no stage wrote it
                    raise ValueError(f"{path}: a {img.mode} image; the inputs are 8-bit grey or RGB PNGs")
                images.append(from_uint8(np.asarray(img)))
        except (OSError, SyntaxError) as exc:
            raise ValueError(f"{path}: not a readable image ({exc})") from exc
        except ValueError as exc:
            raise ValueError(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}") from None
        if shape is not None and tuple(images[-1].shape[1:]) != tuple(shape):
            c, h, w = images[-1].shape[1:]
            raise ValueError(f"{path}: {w}x{h} with {c} channel(s); this pipeline's first stage takes "
                             f"{shape[2]}x{shape[1]} with {shape[0]}")
    shapes = {tuple(x.shape[1:]) for x in images}
    if len(shapes) > 1:
        raise ValueError(f"input images in {indir} have different shapes: {sorted(shapes)}")
    return torch.cat(images)


def save_images(images: np.ndarray, seeds: Sequence[int], outdir: str | os.PathLike, subdirs: bool = False) -> list[Path]:
    """Write ``[N, H, W, C]`` uint8 images as ``{seed:06d}.png`` (atomically; see :func:`image_path`)."""
    paths = []
    for seed, image in zip(seeds, images):
        paths.append(image_path(outdir, seed, subdirs))
        save_png(image, paths[-1])
    return paths


def save_seed_grid(outdir: str | os.PathLike, seeds: Sequence[int], subdirs: bool = False,
                   path: str | os.PathLike | None = None, max_images: int = 256) -> Path:
    """One grid PNG (default ``outdir/grid.png``) of the saved images of the first ``max_images`` seeds."""
    from PIL import Image

    images = []
    for seed in list(seeds)[:max_images]:
        with Image.open(image_path(outdir, seed, subdirs)) as img:
            a = np.asarray(img)
        images.append(a[:, :, None] if a.ndim == 2 else a)
    return save_grid(np.stack(images), path or Path(outdir) / "grid.png")
