"""Listing and reading the files of a dataset that is either a folder (searched recursively) or a zip.

Names are relative to the dataset root, use ``/`` as separator and are sorted as strings, so a folder and
the zip of that folder list the same names in the same order.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

from relay_diffusion.utils.limits import MAX_IMAGE_BYTES, MAX_JSON_BYTES, TooLargeError, read_file, read_member

# Extensions read as images (lower case). Files with other extensions are not images of the dataset.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
     ".pnm", ".tga"}
)
LABELS_FILE = "dataset.json"
# Class labels are one-hot encoded into [MAX_CLASSES] vectors by the trainer, so they are bounded: a stray 1e9 in
# dataset.json must be an error, not a 4 GB allocation per image.
MAX_CLASSES = 100_000
MAX_LABEL_DIM = 100_000  # the same bound for vector labels
# What reading a damaged zip member can raise (bad CRC, bad deflate stream, truncated archive).
ZIP_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)


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

        def unreadable(exc: OSError) -> None:  # os.walk skips a folder it cannot list, silently by default
            raise ValueError(f"cannot list {exc.filename or path!r} in the dataset {path!r}: "
                             f"{exc.strerror or exc}") from None

        for root, dirs, files in os.walk(path, onerror=unreadable):
            dirs.sort()
            rel = os.path.relpath(root, path)
            for f in files:
                full = os.path.join(root, f)
                if os.path.isfile(full):
                    names.append(f if rel == "." else os.path.join(rel, f).replace(os.sep, "/"))
        return sorted(names)
    return [info.filename for info in zip_members(path)]


def zip_members(path: str) -> list[zipfile.ZipInfo]:
    """The regular members of the zip at ``path``, sorted by name (its central directory, read once)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return sorted((info for info in zf.infolist() if not info.is_dir()), key=lambda info: info.filename)
    except ZIP_ERRORS as exc:
        raise ValueError(f"cannot read the zip file {path!r}: {exc}") from None


#: What ``rdm generate`` writes into its output folder besides the samples (its manifest marks such a folder).
GENERATION_MANIFEST = "generation.json"
GENERATION_EXTRAS = frozenset({"grid.png"})


def list_image_files(path: str | os.PathLike) -> list[str]:
    """The images of a folder or zip (visible files with an image extension), as sorted relative names. In a
    folder ``rdm generate`` wrote (it holds ``generation.json``), its sample grid is not an image of the set."""
    return image_names(list_files(path))


def image_names(names: list[str]) -> list[str]:
    """The images among the relative names of a folder's or zip's files (see :func:`list_image_files`)."""
    extras = GENERATION_EXTRAS if GENERATION_MANIFEST in names else frozenset()
    return [name for name in names if is_image_name(name) and not is_hidden_name(name) and name not in extras]


def iter_image_files(path: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """Yield ``(relative name, file bytes)`` for every image of a folder or zip, in sorted order."""
    names = list_image_files(path)
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in names:
            yield name, read_file(os.path.join(path, name), MAX_IMAGE_BYTES)
        return
    with zipfile.ZipFile(path) as zf:
        for name in names:
            yield name, read_member(zf, name, MAX_IMAGE_BYTES)


def _read_labels_bytes(path: str) -> bytes | None:
    if os.path.isdir(path):
        full = os.path.join(path, LABELS_FILE)
        if not os.path.isfile(full):
            return None
        return read_file(full, MAX_JSON_BYTES)
    try:
        with zipfile.ZipFile(path) as zf:
            if LABELS_FILE not in zf.namelist():
                return None
            return read_member(zf, LABELS_FILE, MAX_JSON_BYTES)
    except TooLargeError as exc:
        raise ValueError(f"{path!r}: {exc}") from None
    except ZIP_ERRORS as exc:
        raise ValueError(f"cannot read {LABELS_FILE} in {path!r}: {exc}") from None


def check_label(label: Any) -> str | None:
    """Why ``label`` is not a valid dataset label, or None when it is one: an integer class index in
    [0, MAX_CLASSES), or a non-empty list of at most MAX_LABEL_DIM finite numbers."""
    if isinstance(label, bool) or label is None:
        return f"{label!r} is not a class index or a list of numbers"
    if isinstance(label, int):
        if not 0 <= label < MAX_CLASSES:
            return f"class {label} is outside 0..{MAX_CLASSES - 1}"
        return None
    if isinstance(label, list):
        if not label or len(label) > MAX_LABEL_DIM:
            return f"a label vector must have 1 to {MAX_LABEL_DIM} numbers, not {len(label)}"
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in label):
            return "a label vector must hold finite numbers only"
        return None
    return f"{label!r} is not a class index (an integer >= 0) or a list of numbers"


def read_labels_file(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``labels`` of a folder's or zip's ``dataset.json`` as ``{name: label}``; None when there are none.

    EDM format: ``{"labels": [["00000/img00000000.png", 6], ...]}`` or ``{"labels": null}``. Every label must pass
    :func:`check_label`, and they must be all classes or all vectors of one length; a ValueError names the file and
    the first bad entry otherwise.
    """
    path = check_dataset_path(path)
    raw = _read_labels_bytes(path)
    if raw is None:
        return None
    where = f"{LABELS_FILE} in {path!r}"
    try:
        labels = json.loads(raw).get("labels")  # NaN and Infinity parse, to be refused by check_label
    except (ValueError, AttributeError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{where} is not a JSON object with a 'labels' list: {exc}") from None
    if labels is None:
        return None
    if not isinstance(labels, list) or not all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) for e in labels
    ):
        raise ValueError(f"{where}: 'labels' must be a list of [file name, label] pairs")
    table: dict[str, Any] = {}
    for name, label in labels:
        reason = check_label(label)
        if reason is not None:
            raise ValueError(f"{where}: bad label for {name!r}: {reason}")
        table[name.replace("\\", "/")] = label
    kinds = {len(v) if isinstance(v, list) else None for v in table.values()}
    if len(kinds) > 1:
        raise ValueError(f"{where}: labels mix class indices and vectors, or vectors of different lengths")
    return table
