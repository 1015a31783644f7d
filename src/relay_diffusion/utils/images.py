"""Converting images between the model's float range and files (docs/math.md §8), and image grids."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from relay_diffusion.utils.fileio import atomic_path


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` floats in [-1, 1] -> ``[N, H, W, C]`` uint8: ``clip(x * 127.5 + 128, 0, 255)`` truncated."""
    x = x.to(torch.float64)  # the same rounding whatever the dtype the images come in
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(a: np.ndarray) -> torch.Tensor:
    """``[N, H, W, C]`` (or ``[H, W, C]`` / ``[H, W]``) uint8 -> float64 ``[N, C, H, W]`` in [-1, 1]: ``v / 127.5 - 1``."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim == 3:
        a = a[None]
    return torch.from_numpy(a.astype(np.float64)).permute(0, 3, 1, 2) / 127.5 - 1


def _pil(a: np.ndarray):
    from PIL import Image

    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a, "L" if a.shape[2] == 1 else "RGB")


def save_png(a: np.ndarray, path: str | os.PathLike) -> None:
    """Write one ``[H, W, C]`` uint8 image atomically (1 channel -> grayscale, 3 -> RGB)."""
    with atomic_path(path) as tmp:
        _pil(a).save(tmp, format="PNG")


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 0, pad_value: int = 255) -> np.ndarray:
    """Tile ``[N, H, W, C]`` uint8 images into one ``[rows*H, cols*W, C]`` image (square-ish by default)."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = img
    return grid


def save_grid(images: np.ndarray, path: str | os.PathLike, cols: int | None = None, scale: int = 1) -> Path:
    """Save ``[N, H, W, C]`` uint8 images as one grid PNG, optionally enlarged by ``scale`` (nearest)."""
    grid = make_grid(images, cols)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    save_png(grid, path)
    return Path(path)
