"""Training state for resuming: state_dicts only, saved with ``torch.save`` and read with ``weights_only=True``.

A state holds the network, its EMA, the post-hoc EMA profiles when tracked (``phema``), the optimizer, the step and
images seen (which is also the position in the data order and the random streams, see
:mod:`relay_diffusion.training.order`), the seed and the resolved options. No code and no pickled objects:
loading cannot execute anything.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from relay_diffusion.utils.fileio import atomic_path
from relay_diffusion.utils.jsonio import dumps_strict

FORMAT = "relay-diffusion/training-state-1"
STATE_PATTERN = re.compile(r"^training-state-(\d+)\.pt$")


def state_name(kimg: int) -> str:
    return f"training-state-{kimg:06d}.pt"


def save_state(path: Path, net: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
               step: int, nimg: int, seed: int, options: dict[str, Any],
               phema: Optional[dict[str, Any]] = None) -> None:
    """Write a resumable state atomically (a kill during the write leaves the previous file intact)."""
    state = {
        "format": FORMAT,
        "net": _cpu(net.state_dict()),
        "ema": _cpu(ema.state_dict()),
        "optimizer": _cpu(optimizer.state_dict()),
        "step": int(step),
        "nimg": int(nimg),
        "seed": int(seed),
        "options": dumps_strict(options),
    }
    if phema is not None:  # PowerEMATracker.state_dict(): {"sigma_rels": [...], "emas": [state_dict, ...]}
        state["phema"] = _cpu(phema)
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:  # torch's zip writer reports a full disk as "[enforce fail at inline_container..."
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise OSError(errno.EIO, f"cannot write the training state ({first})", str(path)) from None


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state written by :func:`save_state` (tensors on CPU), never executing code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - see check_state
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{path} is not a readable training state ({first})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a relay-diffusion training state")
    return state


def states(run_dir: str | os.PathLike) -> list[Path]:
    """The ``training-state-*.pt`` files of a run folder, newest (highest kimg) first."""
    found = []
    for entry in Path(run_dir).iterdir():
        m = STATE_PATTERN.match(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), entry))
    return [path for _, path in sorted(found, reverse=True)]


def latest_state(run_dir: str | os.PathLike) -> Optional[Path]:
    """The newest ``training-state-*.pt`` of a run folder (by the kimg in its name), or None."""
    found = states(run_dir)
    return found[0] if found else None


def check_state(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` when ``path`` is not a readable training state (zero-byte, truncated, foreign).
    Memory-maps the file, so the check reads its index, not its tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{path} is not a readable training state ({first})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a relay-diffusion training state")


def latest_intact_state(run_dir: str | os.PathLike) -> tuple[Optional[Path], list[str]]:
    """The newest readable state of a run folder and a note for each newer one that is damaged."""
    skipped = []
    for path in states(run_dir):
        try:
            check_state(path)
            return path, skipped
        except ValueError as exc:
            skipped.append(f"skipped {exc}")
    return None, skipped


def _cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj
