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

from relay_diffusion.training.rundir import KIMG, kimg_label, label_order
from relay_diffusion.utils.fileio import atomic_path
from relay_diffusion.utils.jsonio import dumps_strict

FORMAT = "relay-diffusion/training-state-1"
STATE_PATTERN = re.compile(rf"^training-state-({KIMG})\.pt$")


def state_name(nimg: int) -> str:
    """``training-state-<kimg>.pt`` of the state after ``nimg`` images (:func:`kimg_label`)."""
    return f"training-state-{kimg_label(nimg)}.pt"


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
            found.append((label_order(m.group(1)), entry))
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


#: The names of snapshots, grids and states of runs written before :data:`KIMG`: whole kimg (``000200``).
WHOLE_KIMG = re.compile(r"^(network-snapshot|samples|training-state)-(\d+)\.(safetensors|json|png|pt)$")


def rename_whole_kimg_files(run_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """Give the snapshots, grids and states of a run written with whole-kimg names the three-decimal names of
    :data:`KIMG`, from the images seen that each records (a grid and a snapshot ``.json`` follow their
    snapshot), so that the files a resumed run adds sort after them; a file that does not say keeps its name.
    Returns ``(old name, new name)`` of each renamed file. Call while holding the folder's lock."""
    from relay_diffusion.checkpoints.snapshot import read_config

    run_dir = Path(run_dir)
    found = {}  # (kind, label, suffix) -> path
    for entry in run_dir.iterdir():
        m = WHOLE_KIMG.match(entry.name)
        if m and entry.is_file():
            found[m.groups()] = entry
    nimg: dict[tuple[str, str], int] = {}  # (snapshot | state, old label) -> images seen
    for (kind, label, suffix), path in found.items():
        try:
            if (kind, suffix) == ("network-snapshot", "safetensors"):
                nimg["snapshot", label] = int(round(float(read_config(path)["kimg"]) * 1000))
            elif kind == "training-state":
                nimg["state", label] = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["nimg"])
        except Exception:  # noqa: BLE001 - damaged or foreign: left as it is (and skipped when resuming)
            continue
    renamed = []
    for (kind, label, suffix), path in sorted(found.items()):
        images = nimg.get(("state" if kind == "training-state" else "snapshot", label))
        target = path.with_name(f"{kind}-{kimg_label(images)}.{suffix}") if images is not None else None
        if target is None or target.exists() or int(label) != images // 1000:
            continue
        path.rename(target)
        renamed.append((path.name, target.name))
    return renamed


def _cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj
