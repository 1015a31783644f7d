"""One entry point for networks on disk: the project's safetensors snapshots and reference checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import torch

REFERENCE_SUFFIXES = (".pkl", ".pt", ".pth")


def load_network(path: str | os.PathLike, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A network in eval mode on ``device`` from ``.safetensors`` (+ JSON config) or a reference ``.pkl`` /
    ``.pt`` (imported without executing it, :mod:`relay_diffusion.checkpoints.reference`)."""
    text = str(path)
    if "://" in text:
        raise ValueError(f"{text}: URLs are not fetched; download the file and pass its path")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"network file not found: {path}")
    if path.suffix == ".safetensors":
        from relay_diffusion.checkpoints.snapshot import load_safetensors_network

        return load_safetensors_network(path, device)
    if path.suffix in REFERENCE_SUFFIXES:
        from relay_diffusion.checkpoints.reference import load_reference_network

        return load_reference_network(path, device)
    raise ValueError(f"{path}: unknown network format {path.suffix!r}; expected .safetensors, .pkl or .pt")
