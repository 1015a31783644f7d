"""Run folders: never reused by accident, used by one run at a time, free of stale temporary files, and
removed again when a fresh run fails before it saved anything."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Optional

#: Files whose presence marks a folder as holding a training run.
RUN_FILES = re.compile(r"^(training_options\.json|training-state-\d+\.pt|network-snapshot-\d+\.safetensors)$")
#: Temporary files of :func:`relay_diffusion.utils.fileio.atomic_path` (``.<name>.<random>.tmp``).
TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")
LOCK_FILE = ".rdm-train.lock"
#: The lock where ``lockf`` is not supported: created exclusively, holding ``pid@host``.
OWNER_FILE = ".rdm-train.owner"
#: ``lockf`` errors that mean "this filesystem has no record locks", not "someone holds the lock".
NO_RECORD_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


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
    to the open file and live on in forked data-loader workers; ``lockf`` locks belong to the process.)

    On a filesystem without record locks (some NFS mounts: ENOLCK, EOPNOTSUPP, ENOSYS) the lock is instead the
    exclusive creation of ``folder/.rdm-train.owner`` holding ``pid@host``, removed on exit; one left by a dead
    process of this host is taken over, one of another host is refused with a message naming it."""

    def __init__(self, folder: Path) -> None:
        self.path, self.fd, self.owner_file = folder / LOCK_FILE, None, None

    def __enter__(self) -> "RunFolderLock":
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            self.fd = None
            if exc.errno in NO_RECORD_LOCKS:
                self._create_owner_file()
                return self
            raise RunFolderBusy(f"{self.path.parent} is in use by another training run") from None
        return self

    def _create_owner_file(self) -> None:
        path, me = self.path.parent / OWNER_FILE, f"{os.getpid()}@{socket.gethostname()}"
        for _ in range(2):  # a second try after removing a stale owner file
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                owner = _read_owner(path)
                if owner is None or not _is_stale(owner):
                    who = f"process {owner[0]} on {owner[1]}" if owner else "another training run"
                    raise RunFolderBusy(
                        f"{self.path.parent} is in use by {who} (this filesystem has no lockf locks, so the run "
                        f"holds {path.name} instead; delete that file if that run is over)") from None
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            except OSError as exc:
                raise RunFolderBusy(f"cannot lock {self.path.parent}: the filesystem supports neither lockf nor "
                                    f"creating {path.name} ({exc.strerror or exc})") from None
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.owner_file = path
            return
        raise RunFolderBusy(f"{self.path.parent} is in use by another training run (its {path.name} keeps coming back)")

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.owner_file is not None:
            if _read_owner(self.owner_file) == (os.getpid(), socket.gethostname()):
                with contextlib.suppress(FileNotFoundError):
                    self.owner_file.unlink()
            self.owner_file = None


def _read_owner(path: Path) -> Optional[tuple[int, str]]:
    """``(pid, host)`` from an owner file, None if it is unreadable or being written."""
    try:
        pid, host = path.read_text().strip().split("@", 1)
        return int(pid), host
    except (OSError, ValueError):
        return None


def _is_stale(owner: tuple[int, str]) -> bool:
    """Whether the owner is a process of this host that no longer runs (another host's cannot be checked)."""
    pid, host = owner
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_failed_run(folder: Optional[Path]) -> bool:
    """Remove a run folder this run created when it holds no state and no snapshot (so nothing of value)."""
    if folder is None or not folder.is_dir():
        return False
    if any(RUN_FILES.match(p.name) and p.name != "training_options.json" for p in folder.iterdir()):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True
