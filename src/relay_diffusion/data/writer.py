"""Writing an EDM-format dataset: ``00000/img00000000.png`` ... and ``dataset.json``, as a zip (``dest`` ends in
``.zip``) or a folder. Everything goes to a hidden temporary name beside ``dest``; ``commit`` renames it into
place, so an interrupted or failed run never leaves a partial dataset under ``dest``. (``fileio.atomic_path``
does this for single files; a dataset may be a folder, and the builder commits all its outputs only once every
image is written.) A killed run cannot clean up: ``remove_stale_temporaries`` removes what such runs left.

An existing ``dest`` is replaced only when it is what this writer writes (``is_dataset_output``): nothing but
``dataset.json`` and ``NNNNN/imgNNNNNNNN.png``. Anything else there is the user's, and is never deleted.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
import zipfile
from typing import Any

from relay_diffusion.data.files import LABELS_FILE, ZIP_ERRORS
from relay_diffusion.utils.fileio import write_error_message

# Fixed member timestamps make the zip a function of its contents only (same bytes for any --workers).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def image_name(index: int) -> str:
    """EDM's name of the ``index``-th image: 1000 images per folder."""
    return f"{index // 1000:05d}/img{index:08d}.png"


_IMAGE_RE = re.compile(r"\d{5}/img\d{8}\.png")
_FOLDER_RE = re.compile(r"\d{5}")


class WriteError(OSError):
    """Writing the output failed (disk full, permissions, ...); the message names the file."""


def _is_output_name(name: str) -> bool:
    return name == LABELS_FILE or _IMAGE_RE.fullmatch(name) is not None


def is_dataset_output(path: str) -> bool:
    """Whether ``path`` holds only what ``DatasetWriter`` writes (a ``.zip`` file, or a folder, with ``dataset.json``
    and ``NNNNN/imgNNNNNNNN.png`` files and nothing else), so that replacing it deletes nothing of the user's."""
    if os.path.islink(path):
        return False
    if path.lower().endswith(".zip"):
        if not os.path.isfile(path):
            return False
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except ZIP_ERRORS:
            return False
        names = [n for n in names if not (n.endswith("/") and _FOLDER_RE.fullmatch(n[:-1]))]
        return LABELS_FILE in names and all(_is_output_name(n) for n in names)
    if not os.path.isdir(path):
        return False
    found_labels = False
    for root, dirs, files in os.walk(path):
        rel = os.path.relpath(root, path)
        if rel != "." and (_FOLDER_RE.fullmatch(rel) is None or dirs):
            return False
        for name in dirs + files:
            if os.path.islink(os.path.join(root, name)):
                return False
        for name in files:
            full = name if rel == "." else f"{rel}/{name}"
            if not _is_output_name(full):
                return False
            found_labels |= full == LABELS_FILE
    return found_labels


def _temporary_re(dest: str) -> re.Pattern:
    """Names of this writer's temporary outputs for ``dest`` (``.NAME.PID.HEX.tmp``, ``....tmp.old``) and of
    ``fileio.atomic_path``'s for its report (``.NAME.report.json.XXXXXXXX.tmp``)."""
    name = re.escape(os.path.basename(dest))
    return re.compile(rf"\.{name}\.(?:(\d+)\.[0-9a-f]{{8}}\.tmp(?:\.old)?|report\.json\.[a-z0-9_]{{8}}\.tmp)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # exists but is someone else's; an impossible pid is not alive
    return True


def remove_stale_temporaries(dest: str, before: float | None = None) -> list[str]:
    """Remove the temporary outputs of earlier runs for ``dest`` that were killed before they could clean up:
    files beside ``dest`` named as this writer (or the report's atomic write) names them, last modified before
    ``before`` (default: now), and, where the name holds the writing process id, whose process has ended.
    Returns the paths removed."""
    dest = os.fspath(dest).rstrip("/\\") or os.fspath(dest)
    parent = os.path.dirname(os.path.abspath(dest))
    before = time.time() if before is None else before
    pattern = _temporary_re(dest)
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= before:
                continue
            if match.group(1) is not None and _pid_alive(int(match.group(1))):
                continue
            _remove(entry.path)
        except OSError:
            continue  # not ours to fight over: leave it
        removed.append(entry.path)
    return removed


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


class DatasetWriter:
    """Use as a context manager; call ``commit`` once everything is added (leaving the block without it, or by an
    exception, deletes the temporary output)."""

    def __init__(self, dest: str, overwrite: bool = False) -> None:
        self.dest = os.fspath(dest).rstrip("/\\") or os.fspath(dest)
        self.overwrite = overwrite
        self.is_zip = self.dest.lower().endswith(".zip")
        parent = os.path.dirname(os.path.abspath(self.dest))
        self.tmp = os.path.join(parent, f".{os.path.basename(self.dest)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        self._zip: zipfile.ZipFile | None = None
        self._dirs: set[str] = set()
        self.closed = True
        try:
            os.makedirs(parent, exist_ok=True)
            if self.is_zip:
                self._zip = zipfile.ZipFile(self.tmp, "x", compression=zipfile.ZIP_STORED)
            else:
                os.mkdir(self.tmp)
        except OSError as exc:
            self.closed = False
            self.abort()
            raise WriteError(write_error_message(exc, self.dest)) from None
        self.closed = False

    def add(self, name: str, data: bytes) -> None:
        """Add one file (``name`` relative, ``/``-separated)."""
        try:
            if self._zip is not None:
                info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                info.external_attr = 0o644 << 16  # rw-r--r-- when unpacked
                self._zip.writestr(info, data)
                return
            folder = os.path.dirname(name)
            if folder and folder not in self._dirs:
                os.makedirs(os.path.join(self.tmp, folder), exist_ok=True)
                self._dirs.add(folder)
            with open(os.path.join(self.tmp, name), "wb") as f:
                f.write(data)
        except OSError as exc:
            raise WriteError(write_error_message(exc, self.dest)) from None

    def commit(self, labels: list[list[Any]] | None) -> None:
        """Write ``dataset.json`` (``{"labels": [[name, label], ...]}`` or ``{"labels": null}``) and move the
        output to ``dest``, replacing an existing one only with ``overwrite`` and only when it is an output of
        this writer (``is_dataset_output``)."""
        self.add(LABELS_FILE, json.dumps({"labels": labels}).encode())
        try:
            if self._zip is not None:
                zf, self._zip = self._zip, None
                zf.close()
            self._move_into_place()
        except OSError as exc:
            if isinstance(exc, WriteError):
                raise
            raise WriteError(write_error_message(exc, self.dest)) from None
        self.closed = True

    def _move_into_place(self) -> None:
        if not os.path.lexists(self.dest):
            os.rename(self.tmp, self.dest)
            return
        if not self.overwrite or not is_dataset_output(self.dest):
            raise WriteError(f"{self.dest!r} appeared during the run and is not an output to replace")
        if self.is_zip:
            os.replace(self.tmp, self.dest)  # atomic
            return
        old = self.tmp + ".old"
        os.rename(self.dest, old)
        os.rename(self.tmp, self.dest)
        _remove(old)

    def abort(self) -> None:
        """Remove the temporary output (also after a failed write: errors closing it are ignored)."""
        if self.closed:
            return
        self.closed = True
        if self._zip is not None:
            zf, self._zip = self._zip, None
            try:
                zf.close()
            except Exception:  # the zip is being discarded; a disk-full close must not hide the first error
                pass
        try:
            _remove(self.tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.abort()
