"""Image files of generation (docs/math.md §8): ``{seed:06d}.png``, optionally in thousands sub-folders."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
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


class ImageWriter:
    """Writes batches of images (:func:`save_images`) on one background thread, so that sampling goes on while
    the previous batch is PNG-encoded.

    One thread: files are written in the order of :meth:`submit`, each atomically, as without it. At most
    ``max_pending`` batches wait or are being written; :meth:`submit` waits for the oldest beyond that, so the
    images held in memory stay bounded. An error of a write (a full disk, a read-only folder) is raised by the
    next :meth:`submit` or by :meth:`flush`. Use as a context manager: leaving the block normally flushes
    (and raises a write's error); leaving it with an exception lets the submitted batches finish and raises
    that exception."""

    def __init__(self, outdir: str | os.PathLike, subdirs: bool = False, max_pending: int = 2) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.outdir, self.subdirs, self.max_pending = Path(outdir), subdirs, max_pending
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="image-writer")
        self._pending: deque[Future] = deque()

    def submit(self, images: np.ndarray, seeds: Sequence[int]) -> list[Path]:
        """Queue ``[N, H, W, C]`` uint8 images of ``seeds``; returns the paths they will have. ``images`` must
        not be modified afterwards (:func:`to_uint8` and fancy indexing give fresh arrays)."""
        self._collect(block=False)
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()
        seeds = list(seeds)
        self._pending.append(self._pool.submit(save_images, images, seeds, self.outdir, self.subdirs))
        return [image_path(self.outdir, s, self.subdirs) for s in seeds]

    def flush(self) -> None:
        """Wait for every submitted image; raises the first write error."""
        self._collect(block=True)

    def _collect(self, block: bool) -> None:
        while self._pending and (block or self._pending[0].done()):
            self._pending.popleft().result()

    def close(self) -> None:
        """Let the submitted writes finish (their errors are dropped: see :meth:`flush`) and stop the thread."""
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "ImageWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()


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
