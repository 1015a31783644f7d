"""An exclusive lock on a folder for the life of a process: a training run's folder, a generation's output folder.

A POSIX record lock (``lockf``) on ``folder/.<name>.lock``, released by the kernel when the process dies, so a
killed process never blocks the next one; where the filesystem has no record locks, the exclusive creation of
``folder/.<name>.owner`` holding ``pid@host``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path
from typing import Optional

#: ``lockf`` errors that mean "this filesystem has no record locks", not "someone holds the lock".
NO_RECORD_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


class RunFolderBusy(RuntimeError):
    """Another process holds the folder."""


class FolderLock:
    """An exclusive POSIX record lock on ``folder/.<name>.lock`` for the life of a process, released by the
    kernel when the process dies, so a killed process never blocks the next one. (Not ``flock``: its locks belong
    to the open file and live on in forked data-loader workers; ``lockf`` locks belong to the process.)

    On a filesystem without record locks (some NFS mounts: ENOLCK, EOPNOTSUPP, ENOSYS) the lock is instead the
    exclusive creation of ``folder/.<name>.owner`` holding ``pid@host``, removed on exit; one left by a dead
    process of this host is taken over, one of another host is refused with a message naming it."""

    def __init__(self, folder: Path, name: str, what: str) -> None:
        folder = Path(folder)
        self.path, self.fd, self.owner_file = folder / f".{name}.lock", None, None
        self.owner_name, self.what = f".{name}.owner", what  # what: "training run", for messages

    def __enter__(self) -> "FolderLock":
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
            raise RunFolderBusy(f"{self.path.parent} is in use by another {self.what}") from None
        return self

    def _create_owner_file(self) -> None:
        path, me = self.path.parent / self.owner_name, f"{os.getpid()}@{socket.gethostname()}"
        for _ in range(2):  # a second try after removing a stale owner file
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                owner = _read_owner(path)
                if owner is None or not _is_stale(owner):
                    who = f"process {owner[0]} on {owner[1]}" if owner else f"another {self.what}"
                    raise RunFolderBusy(
                        f"{self.path.parent} is in use by {who} (this filesystem has no lockf locks, so the "
                        f"{self.what} holds {path.name} instead; delete that file if it is over)") from None
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
        raise RunFolderBusy(f"{self.path.parent} is in use by another {self.what} (its {path.name} keeps coming back)")

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
