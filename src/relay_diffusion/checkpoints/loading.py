"""One entry point for networks on disk: the project's safetensors snapshots and reference checkpoints."""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from relay_diffusion.core.process import BlurProcess
from relay_diffusion.utils.dtypes import float32_default

REFERENCE_SUFFIXES = (".pkl", ".pt", ".pth")


@dataclass
class NetworkFile:
    """A loaded network with what its file says about it.

    ``kind``: ``'edm'`` (stage 1), ``'relay'`` (a relay stage), ``'sr'`` (super-resolution) or None when the
    file does not say (reference checkpoints); ``process``: the forward process a relay network was trained
    with, or None; ``condition``: a super-resolution network's :class:`SRCondition`, or None.
    """

    net: torch.nn.Module
    path: str
    kind: Optional[str] = None
    process: Optional[BlurProcess] = None
    condition: Optional[Any] = None
    config: dict[str, Any] = field(default_factory=dict)


def _check_path(path: str | os.PathLike) -> Path:
    text = str(path)
    if "://" in text:
        raise ValueError(f"{text}: URLs are not fetched; download the file and pass its path")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"network file not found: {path}")
    if path.suffix not in (".safetensors", *REFERENCE_SUFFIXES):
        raise ValueError(f"{path}: unknown network format {path.suffix!r}; expected .safetensors, .pkl or .pt")
    return path


def _unreadable(path: Path, exc: BaseException) -> ValueError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ValueError(f"{path}: cannot load this network file ({text})")


#: What a damaged or foreign file raises inside the loaders (safetensors, json, the network constructors).
_LOAD_ERRORS = (ValueError, KeyError, TypeError, RuntimeError, EOFError, UnicodeDecodeError, AttributeError,
                pickle.UnpicklingError, zipfile.BadZipFile)


@float32_default
def load_network_file(path: str | os.PathLike, device: torch.device | str = "cpu") -> NetworkFile:
    """:func:`load_network` plus the stage kind and forward process recorded in the file. A damaged or
    foreign file raises one ``ValueError`` naming it (truncated, zero-byte or random bytes, a config that
    is not an object or lacks ``init_kwargs``, weights whose shapes do not match)."""
    path = _check_path(path)
    try:
        return _load_network_file(path, device)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError (not exported)
        if isinstance(exc, _LOAD_ERRORS) or type(exc).__name__ == "SafetensorError":
            if str(exc).startswith(str(path)):
                raise ValueError(str(exc)) from exc
            raise _unreadable(path, exc) from exc
        raise


def _load_network_file(path: Path, device: torch.device | str) -> NetworkFile:
    if path.suffix != ".safetensors":
        return NetworkFile(load_network(path, device), str(path))
    from relay_diffusion.checkpoints.snapshot import (load_safetensors_network, read_config, stage_condition,
                                                      stage_kind, stage_process)

    config = read_config(path)
    if not isinstance(config, dict) or not isinstance(config.get("init_kwargs"), dict) or "precond" not in config:
        raise ValueError(f"{path}: its config is not an object with 'precond' and 'init_kwargs'")
    try:
        kind, process, condition = stage_kind(config), stage_process(config), stage_condition(config)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if kind == "sr" and condition is None:
        raise ValueError(f"{path}: a super-resolution network whose file records no 'condition' (relay factor)")
    return NetworkFile(load_safetensors_network(path, device), str(path), kind, process, condition, config)


@float32_default
def load_network(path: str | os.PathLike, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A network in eval mode on ``device`` from ``.safetensors`` (+ JSON config) or a reference ``.pkl`` /
    ``.pt`` (imported without executing it, :mod:`relay_diffusion.checkpoints.reference`)."""
    path = _check_path(path)
    if path.suffix == ".safetensors":
        from relay_diffusion.checkpoints.snapshot import load_safetensors_network

        return load_safetensors_network(path, device)
    from relay_diffusion.checkpoints.reference import load_reference_network

    return load_reference_network(path, device)
