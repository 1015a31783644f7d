"""Writing an EDM-format dataset: ``00000/img00000000.png`` ... and ``dataset.json``, as a zip (``dest`` ends in
``.zip``) or a folder. Everything goes to a hidden temporary name beside ``dest``; ``commit`` renames it into
place, so an interrupted or failed run never leaves a partial dataset under ``dest``. (``fileio.atomic_path``
does this for single files; a dataset may be a folder, and the builder commits all its outputs only once every
image is written.)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import zipfile
from typing import Any

from relay_diffusion.data.files import LABELS_FILE

# Fixed member timestamps make the zip a function of its contents only (same bytes for any --workers).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def image_name(index: int) -> str:
    """EDM's name of the ``index``-th image: 1000 images per folder."""
    return f"{index // 1000:05d}/img{index:08d}.png"


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
        os.makedirs(parent, exist_ok=True)
        self.tmp = os.path.join(parent, f".{os.path.basename(self.dest)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        self._zip: zipfile.ZipFile | None = None
        self._dirs: set[str] = set()
        if self.is_zip:
            self._zip = zipfile.ZipFile(self.tmp, "x", compression=zipfile.ZIP_STORED)
        else:
            os.mkdir(self.tmp)
        self.closed = False

    def add(self, name: str, data: bytes) -> None:
        """Add one file (``name`` relative, ``/``-separated)."""
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

    def commit(self, labels: list[list[Any]] | None) -> None:
        """Write ``dataset.json`` (``{"labels": [[name, label], ...]}`` or ``{"labels": null}``) and move the
        output to ``dest``, replacing an existing one only with ``overwrite``."""
        self.add(LABELS_FILE, json.dumps({"labels": labels}).encode())
        if self._zip is not None:
            self._zip.close()
        if os.path.lexists(self.dest):
            if not self.overwrite:
                raise FileExistsError(f"{self.dest!r} exists")
            if self.is_zip and os.path.isfile(self.dest):
                os.replace(self.tmp, self.dest)  # atomic
            else:
                old = self.tmp + ".old"
                os.rename(self.dest, old)
                os.rename(self.tmp, self.dest)
                _remove(old)
        else:
            os.rename(self.tmp, self.dest)
        self.closed = True

    def abort(self) -> None:
        if self.closed:
            return
        if self._zip is not None:
            self._zip.close()
        _remove(self.tmp)
        self.closed = True

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.abort()
