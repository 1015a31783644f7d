"""Listing and reading the files of a dataset that is either a folder (searched recursively) or a zip.

Names are relative to the dataset root, use ``/`` as separator and are sorted as strings, so a folder and
the zip of that folder list the same names in the same order.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from typing import Any

# Extensions read as images (lower case). Files with other extensions are not images of the dataset.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
     ".pnm", ".tga"}
)
LABELS_FILE = "dataset.json"


def is_image_name(name: str) -> bool:
    """Whether ``name`` has an image extension."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_hidden_name(name: str) -> bool:
    """Hidden files and folders (``.x``) and macOS zip metadata (``__MACOSX/``, ``._x``) are not dataset content."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def is_zip_path(path: str | os.PathLike) -> bool:
    return os.path.isfile(path) and str(path).lower().endswith(".zip")


def check_dataset_path(path: str | os.PathLike) -> str:
    """``path`` as a string, or a ValueError naming it when it is neither a folder nor a readable zip."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"dataset path {path!r} does not exist")
    if os.path.isdir(path):
        return path
    if not is_zip_path(path):
        raise ValueError(f"dataset path {path!r} is neither a folder nor a .zip file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"dataset path {path!r} is not a valid zip file")
    return path


def list_files(path: str | os.PathLike) -> list[str]:
    """All regular files under a folder or in a zip: sorted relative names, including hidden ones."""
    path = check_dataset_path(path)
    if os.path.isdir(path):
        names = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            rel = os.path.relpath(root, path)
            for f in files:
                full = os.path.join(root, f)
                if os.path.isfile(full):
                    names.append(f if rel == "." else os.path.join(rel, f).replace(os.sep, "/"))
        return sorted(names)
    with zipfile.ZipFile(path) as zf:
        return sorted(info.filename for info in zf.infolist() if not info.is_dir())


def list_image_files(path: str | os.PathLike) -> list[str]:
    """The images of a folder or zip (visible files with an image extension), as sorted relative names."""
    return [name for name in list_files(path) if is_image_name(name) and not is_hidden_name(name)]


def iter_image_files(path: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """Yield ``(relative name, file bytes)`` for every image of a folder or zip, in sorted order."""
    names = list_image_files(path)
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in names:
            with open(os.path.join(path, name), "rb") as f:
                yield name, f.read()
        return
    with zipfile.ZipFile(path) as zf:
        for name in names:
            yield name, zf.read(name)


def read_labels_file(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``labels`` of a folder's or zip's ``dataset.json`` as ``{name: label}``; None when there are none.

    EDM format: ``{"labels": [["00000/img00000000.png", 6], ...]}`` or ``{"labels": null}``.
    """
    path = check_dataset_path(path)
    if os.path.isdir(path):
        full = os.path.join(path, LABELS_FILE)
        if not os.path.isfile(full):
            return None
        with open(full, "rb") as f:
            raw = f.read()
    else:
        with zipfile.ZipFile(path) as zf:
            if LABELS_FILE not in zf.namelist():
                return None
            raw = zf.read(LABELS_FILE)
    try:
        labels = json.loads(raw).get("labels")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{LABELS_FILE} in {path!r} is not a JSON object with a 'labels' list: {exc}") from None
    if labels is None:
        return None
    try:
        return {str(name).replace("\\", "/"): label for name, label in labels}
    except (TypeError, ValueError):
        raise ValueError(f"{LABELS_FILE} in {path!r}: 'labels' must be a list of [file name, label] pairs") from None
