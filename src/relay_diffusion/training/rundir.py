"""Run folders: never reused by accident, used by one run at a time, free of stale temporary files, and
removed again when a fresh run fails before it saved anything."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

#: Files whose presence marks a folder as holding a training run.
RUN_FILES = re.compile(r"^(training_options\.json|training-state-\d+\.pt|network-snapshot-\d+\.safetensors)$")
#: Temporary files of :func:`relay_diffusion.utils.fileio.atomic_path` (``.<name>.<random>.tmp``).
TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")
LOCK_FILE = ".rdm-train.lock"


class RunFolderBusy(RuntimeError):
    """Another training process holds the run folder."""


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


class RunFolderLock:
    """An exclusive POSIX record lock on ``folder/.rdm-train.lock`` for the life of a run, released by the
    kernel when the process dies, so a killed run never blocks the next one. (Not ``flock``: its locks belong
    to the open file and live on in forked data-loader workers; ``lockf`` locks belong to the process.)"""

    def __init__(self, folder: Path) -> None:
        self.path, self.fd = folder / LOCK_FILE, None

    def __enter__(self) -> "RunFolderLock":
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise RunFolderBusy(f"{self.path.parent} is in use by another training run") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def remove_failed_run(folder: Optional[Path]) -> bool:
    """Remove a run folder this run created when it holds no state and no snapshot (so nothing of value)."""
    if folder is None or not folder.is_dir():
        return False
    if any(RUN_FILES.match(p.name) and p.name != "training_options.json" for p in folder.iterdir()):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True
