"""Activations of an image set, cached by content: ``rdm evaluate fid A B`` computes them once per set and
detector, and a second run (or a run against the same reference) reads them back.

The key is a SHA-256 of the detector's fingerprint, the subset size and every image's name and bytes, so a
changed, added or removed image (or another detector) gives a new entry; nothing is keyed by path or time.
Entries are ordinary activation files (:func:`~relay_diffusion.metrics.activations.save_activations`), written
atomically, in ``$XDG_CACHE_HOME/relay-diffusion/activations`` (by default ``~/.cache/...``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch

from relay_diffusion.data.dataset import ImageFolderDataset
from relay_diffusion.data.files import iter_image_files
from relay_diffusion.metrics.activations import check_finite, compute_activations, save_activations
from relay_diffusion.metrics.detector import Detector
from relay_diffusion.utils.fileio import user_cache_dir


def default_cache_dir() -> Path:
    return user_cache_dir("activations")


def content_key(data: str | os.PathLike, detector: Detector, max_images: int | None = None) -> str:
    """SHA-256 (hex) of what the activations of ``data`` depend on: detector, subset size, names and bytes."""
    digest = hashlib.sha256(f"{detector.fingerprint}\n{max_images}\n".encode())
    count = 0
    for name, content in iter_image_files(data):
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
        count += 1
    if count == 0:
        raise ValueError(f"{data}: no images")
    return digest.hexdigest()


def cached_activations(data: str | os.PathLike, detector: Detector, batch: int = 64, *,
                       device: torch.device | str = "cpu", workers: int = 0, max_images: int | None = None,
                       cache_dir: str | os.PathLike | None = None,
                       log: Callable[[str], None] = lambda s: None) -> Path:
    """The activation file of the images in ``data`` (a folder or zip) by ``detector``: from the cache when it
    holds them, else computed and stored there. Returns its path."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"{content_key(data, detector, max_images)}.npz"
    if path.is_file():
        log(f"{data}: activations from the cache ({path})")
        return path
    dataset = ImageFolderDataset(data, max_size=max_images)
    log(f"{data}: {len(dataset)} images through {detector.source}")
    acts = compute_activations(dataset, detector, batch, device=device, num_workers=workers)
    check_finite(acts, f"activations of {data} by {detector.source}")
    folder.mkdir(parents=True, exist_ok=True)
    save_activations(path, acts, detector)
    return path
