"""Run folders: never reused by accident, used by one run at a time, free of stale temporary files, and
removed again when a fresh run fails before it saved anything."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

from relay_diffusion.utils.locks import FolderLock, RunFolderBusy

__all__ = ["KIMG", "LOCK_FILE", "OWNER_FILE", "RunFolderBusy", "RunFolderLock", "clean_stale_temps", "kimg_label",
           "label_order", "remove_failed_run", "run_files"]

#: The point of the run in the names of snapshots, grids and states: the images seen, in thousands with three
#: decimals, zero-padded (``000200.512``, :func:`kimg_label`). One name per image count, so a snapshot never
#: replaces another, whatever the tick; and the names sort chronologically as plain strings (``ls | sort``).
#: Runs written before had whole kimg (``000200``), which ticks under 1 kimg reused; they are still read.
KIMG = r"\d+(?:\.\d{3})?"
#: Files whose presence marks a folder as holding a training run.
RUN_FILES = re.compile(rf"^(training_options\.json|training-state-{KIMG}\.pt|network-snapshot-{KIMG}\.safetensors)$")
#: Temporary files of :func:`relay_diffusion.utils.fileio.atomic_path` (``.<name>.<random>.tmp``).
TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")
#: A run folder's lock (:class:`RunFolderLock`): ``LOCK_FILE``, or where ``lockf`` is not supported ``OWNER_FILE``,
#: created exclusively, holding ``pid@host``.
LOCK_NAME = "rdm-train"
LOCK_FILE = f".{LOCK_NAME}.lock"
OWNER_FILE = f".{LOCK_NAME}.owner"


def kimg_label(nimg: int) -> str:
    """``nimg`` images as the kimg of a file name (:data:`KIMG`): ``200512`` -> ``'000200.512'``."""
    return f"{nimg // 1000:06d}.{nimg % 1000:03d}"


def label_order(label: str) -> tuple[int, int]:
    """The chronological sort key of a :data:`KIMG` label: ``(images, 1)``; a whole-kimg label of an older run
    ``(kimg x 1000, 0)``. Such a file comes before every three-decimal one of its kimg: a run that resumed from
    it wrote those later."""
    whole, _, frac = label.partition(".")
    return int(whole) * 1000 + (int(frac) if frac else 0), 1 if frac else 0


class RunFolderLock(FolderLock):
    """The lock of a training run's folder (:data:`LOCK_FILE`; see :class:`FolderLock`)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, LOCK_NAME, "training run")


def run_files(folder: Path) -> list[str]:
    """The names of the run files in ``folder`` (empty when it holds no run or does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if RUN_FILES.match(p.name))


def clean_stale_temps(folder: Path) -> list[str]:
    """Remove the temporary files an interrupted write of this project left in ``folder``; returns their names.
    Call only while holding the folder's lock, so no live writer owns them."""
    removed = []
    for p in folder.iterdir():
        if p.is_file() and TEMP_FILE.match(p.name):
            try:
                p.unlink()
                removed.append(p.name)
            except FileNotFoundError:
                pass
    return sorted(removed)


def remove_failed_run(folder: Optional[Path]) -> bool:
    """Remove a run folder this run created when it holds no state and no snapshot (so nothing of value)."""
    if folder is None or not folder.is_dir():
        return False
    if any(RUN_FILES.match(p.name) and p.name != "training_options.json" for p in folder.iterdir()):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True
