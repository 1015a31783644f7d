"""The training data loader: EDM-format datasets, i.e. a zip or folder of images (``rdm dataset`` writes them)
with labels in an optional ``dataset.json`` ``{"labels": [["00000/img00000000.png", 6], ...]}``.
"""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO

import numpy as np
import torch

from relay_diffusion.data.cache import SharedImageCache, default_cache_dir, source_fingerprint
from relay_diffusion.data.transforms import to_array
from relay_diffusion.data.zipindex import ZipIndex
from relay_diffusion.utils.limits import MAX_IMAGE_BYTES, TooLargeError, open_image, read_file
from relay_diffusion.data.files import (
    ZIP_ERRORS,
    check_dataset_path,
    image_names,
    iter_image_files,
    list_image_files,
    read_labels_file,
    zip_members,
)

__all__ = ["ImageFolderDataset", "iter_image_files", "list_image_files"]


class ImageFolderDataset(torch.utils.data.Dataset):
    """The images of a folder (recursive) or zip, sorted by relative name, as ``(image, label)``: image uint8
    ``[C, H, W]`` (C = 1 or 3), label float32 one-hot ``[label_dim]`` (``[0]`` without labels).

    As in EDM: ``max_size`` keeps a random subset (fixed by ``random_seed``) in its original order; ``xflip``
    doubles the length, indices ``>= n`` being the mirrored images. A zip is opened lazily in each process, so
    the dataset works in DataLoader worker processes. Only the first image's shape is read up front; an image of
    another shape raises a ValueError when it is loaded.

    Images are decoded when they are read and not kept: a process holds no decoded copy of the dataset.
    ``cache=True`` decodes the kept images once into a file in ``cache_dir`` that every process of the machine
    maps read-only (:mod:`relay_diffusion.data.cache`): one copy per machine, shared by all ranks and workers.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        resolution: int | None = None,  # expected width and height; None: any (square not required)
        use_labels: bool = False,  # read labels from dataset.json (none there: label_dim 0)
        max_size: int | None = None,  # keep at most this many images
        xflip: bool = False,  # append horizontally mirrored copies
        cache: bool = False,  # read decoded images from one memory-mapped file per machine
        random_seed: int = 0,  # picks the max_size subset
        cache_dir: str | os.PathLike | None = None,  # where that file lives; None: default_cache_dir()
        cache_workers: int = 0,  # processes decoding while the file is built (0: this one)
    ) -> None:
        self._path = check_dataset_path(path)
        self._is_zip = os.path.isfile(self._path)
        self._zip: BinaryIO | None = None  # this process's handle on the zip file
        self._zip_pid: int | None = None
        self._shared: SharedImageCache | None = None
        if self._is_zip:  # the central directory read once, for the names and for the index
            members = zip_members(self._path)
            infos = {info.filename: info for info in members}  # a repeated name reads its last copy, as zipfile
            names = image_names([info.filename for info in members])
        else:
            names = list_image_files(self._path)
        if not names:
            raise ValueError(f"no image files in {self._path!r}")
        # names and (for a zip) member positions as numpy arrays, not a Python object per image: forked loader
        # workers share them instead of each copying ~1.4 KB per image (data/zipindex.py)
        self._fnames = np.array([n.encode("utf-8", "surrogateescape") for n in names])
        self._index = ZipIndex(self._path, names, [infos[n] for n in names]) if self._is_zip else None
        self._image_shape = list(self._load_image(0).shape)
        if resolution is not None and self._image_shape[1:] != [resolution, resolution]:
            raise ValueError(
                f"{self._path!r}: images are {self._image_shape[2]}x{self._image_shape[1]}, not the requested "
                f"resolution {resolution}x{resolution}"
            )
        self._labels = self._load_labels(names) if use_labels else None
        n = len(self._fnames)
        idx = np.arange(n)
        if max_size is not None and n > max_size:
            idx = np.sort(np.random.default_rng(random_seed).permutation(n)[:max_size])
        self._raw_idx = np.tile(idx, 2) if xflip else idx
        self._xflip = np.arange(len(self._raw_idx)) >= len(idx)
        self._kept = idx  # sorted raw indices of the kept images: row r of the cache is image _kept[r]
        if cache:
            self._shared = self._open_cache(os.fspath(cache_dir) if cache_dir is not None else default_cache_dir(),
                                            cache_workers)

    # --- the shared decoded copy ---------------------------------------------------------------------------
    def _open_cache(self, folder: str, workers: int) -> SharedImageCache:
        fingerprint = dict(source_fingerprint(self._path, self.image_fnames),
                           kept=hashlib.sha256(self._kept.astype(np.int64).tobytes()).hexdigest())
        return SharedImageCache.open(folder, self.name, fingerprint, [len(self._kept), *self._image_shape],
                                     decode=lambda row: self._decode(int(self._kept[row])),
                                     rows=lambda: self._decoded_rows(workers))

    def _decoded_rows(self, workers: int):
        """Every kept image in row order, checked against the first image's shape."""
        rows = _DecodeRows(self)
        if workers > 0:
            loader = torch.utils.data.DataLoader(rows, batch_size=None, num_workers=workers, prefetch_factor=8)
            return (np.asarray(image) for image in loader)
        return (rows[r] for r in range(len(rows)))

    @property
    def cache_status(self) -> str | None:
        """None without a cache; else what opening it did (``built``, ``reused``, ``rebuilt (why)``) and where."""
        return None if self._shared is None else f"{self._shared.status}: {self._shared.path}"

    @property
    def decoded_bytes(self) -> int:
        """Size of the kept images decoded (what ``cache=True`` stores once per machine)."""
        return len(self._kept) * int(np.prod(self._image_shape))

    # --- reading -------------------------------------------------------------------------------------------
    def _fname(self, raw_idx: int) -> str:
        return self._fnames[raw_idx].decode("utf-8", "surrogateescape")

    def _zipfile(self) -> BinaryIO:
        if self._zip is None or self._zip_pid != os.getpid():  # a forked worker must not share the parent's handle
            self._zip = open(self._path, "rb")
            self._zip_pid = os.getpid()
        return self._zip

    def _read_bytes(self, raw_idx: int) -> bytes:
        fname = self._fname(raw_idx)
        if self._index is not None:
            return self._index.read(self._zipfile(), raw_idx, fname)
        return read_file(os.path.join(self._path, fname), MAX_IMAGE_BYTES)

    def _load_image(self, raw_idx: int) -> np.ndarray:
        if self._shared is not None:
            return self._shared.array()[int(np.searchsorted(self._kept, raw_idx))]
        return self._decode(raw_idx)

    def _decode(self, raw_idx: int) -> np.ndarray:
        fname = self._fname(raw_idx)
        try:
            data = self._read_bytes(raw_idx)
        except (*ZIP_ERRORS, TooLargeError) as exc:
            raise ValueError(f"cannot read {fname!r} in {self._path!r}: {exc}") from None
        try:
            img = open_image(data, fname)  # refused from its header when it claims too many pixels
            img.load()
            image = np.ascontiguousarray(to_array(img).transpose(2, 0, 1))
        except Exception as exc:  # PIL raises many types on damaged files (OSError, SyntaxError, struct.error, ...)
            raise ValueError(f"cannot decode {fname!r} in {self._path!r}: {type(exc).__name__}: {exc}") from None
        return image

    def _load_labels(self, names: list[str]) -> np.ndarray | None:
        table = read_labels_file(self._path)
        if table is None:
            return None
        missing = [f for f in names if f not in table]
        if missing:
            raise ValueError(f"dataset.json in {self._path!r} has no label for {missing[0]!r}")
        # read_labels_file has checked every label (class index in [0, MAX_CLASSES) or finite vector, one kind)
        labels = np.array([table[f] for f in names])
        if labels.ndim == 1:
            return labels.astype(np.int64)
        labels = labels.astype(np.float32)
        if not np.isfinite(labels).all():
            raise ValueError(f"dataset.json in {self._path!r}: label vectors overflow float32")
        return labels

    def close(self) -> None:
        if self._zip is not None and self._zip_pid == os.getpid():
            self._zip.close()
        self._zip = None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _zip=None, _zip_pid=None)

    # --- Dataset -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._raw_idx)

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        raw_idx = int(self._raw_idx[idx])
        image = self._check_shape(raw_idx, self._load_image(raw_idx))
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def _check_shape(self, raw_idx: int, image: np.ndarray) -> np.ndarray:
        if list(image.shape) != self._image_shape:
            raise ValueError(
                f"{self._path!r}: {self._fname(raw_idx)!r} has shape {list(image.shape)} but the first image has "
                f"{self._image_shape} ([C, H, W]); rebuild the dataset with rdm dataset --resolution=WxH"
            )
        return image

    def get_label(self, idx: int) -> np.ndarray:
        """Label of item ``idx``: float32 one-hot ``[label_dim]`` for class labels, the vector for vector labels."""
        if self._labels is None:
            return np.zeros([0], dtype=np.float32)
        label = self._labels[self._raw_idx[idx]]
        if self._labels.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            return onehot
        return label.copy()

    # --- properties ----------------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._path

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self._path.rstrip("/\\")))[0]

    @property
    def image_fnames(self) -> list[str]:
        """Relative names of all images, sorted (before ``max_size`` and ``xflip``)."""
        return [n.decode("utf-8", "surrogateescape") for n in self._fnames]

    @property
    def image_shape(self) -> list[int]:
        """``[C, H, W]``."""
        return list(self._image_shape)

    @property
    def num_channels(self) -> int:
        return self._image_shape[0]

    @property
    def resolution(self) -> int:
        """Width (= height) of the images; ValueError for non-square images."""
        c, h, w = self._image_shape
        if h != w:
            raise ValueError(f"{self._path!r}: images are {w}x{h}, not square")
        return h

    @property
    def label_shape(self) -> list[int]:
        if self._labels is None:
            return [0]
        if self._labels.dtype == np.int64:
            return [int(self._labels.max()) + 1]
        return list(self._labels.shape[1:])

    @property
    def label_dim(self) -> int:
        return self.label_shape[0]

    @property
    def has_labels(self) -> bool:
        return self.label_dim != 0


class _DecodeRows(torch.utils.data.Dataset):
    """Row ``r`` of a dataset's cache: its kept image ``r``, decoded and shape-checked (for building the cache)."""

    def __init__(self, dataset: ImageFolderDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset._kept)

    def __getitem__(self, row: int) -> np.ndarray:
        raw_idx = int(self.dataset._kept[row])
        return self.dataset._check_shape(raw_idx, self.dataset._decode(raw_idx))
