"""Run folders: never reused by accident, used by one run at a time, free of stale temporary files, and
removed again when a fresh run fails before it saved anything."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

from relay_diffusion.utils.locks import FolderLock, RunFolderBusy

__all__ = ["LOCK_FILE", "OWNER_FILE", "RunFolderBusy", "RunFolderLock", "clean_stale_temps", "remove_failed_run",
           "run_files"]

#: Files whose presence marks a folder as holding a training run.
RUN_FILES = re.compile(r"^(training_options\.json|training-state-\d+\.pt|network-snapshot-\d+\.safetensors)$")
#: Temporary files of :func:`relay_diffusion.utils.fileio.atomic_path` (``.<name>.<random>.tmp``).
TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")
#: A run folder's lock (:class:`RunFolderLock`): ``LOCK_FILE``, or where ``lockf`` is not supported ``OWNER_FILE``,
#: created exclusively, holding ``pid@host``.
LOCK_NAME = "rdm-train"
LOCK_FILE = f".{LOCK_NAME}.lock"
OWNER_FILE = f".{LOCK_NAME}.owner"


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
