"""The inputs ``rdm dataset`` reads: an image folder or zip, the CIFAR-10 python tarball, MNIST idx files, an LSUN
lmdb. A source lists its items in a fixed order; reading happens here (one process, mostly I/O), decoding in the
builder's worker processes. An item that cannot be read carries the reason instead of its data.
"""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from relay_diffusion.checkpoints.unpickle import UnpicklePolicy, encode_text, restricted_load
from relay_diffusion.utils.limits import MAX_IMAGE_BYTES, TooLargeError, read_file, read_member, read_stream
from relay_diffusion.data.files import (
    LABELS_FILE,
    list_files,
    list_image_files,
    read_labels_file,
)

MNIST_IMAGES = "train-images-idx3-ubyte.gz"
MNIST_LABELS = "train-labels-idx1-ubyte.gz"
CIFAR_DIR = "cifar-10-batches-py"
LMDB_DATA = "data.mdb"


@dataclass
class SourceItem:
    name: str  # where the image came from, for the report
    label: Any = None  # int class, list of floats, or None
    data: bytes | np.ndarray | None = None  # encoded file, or decoded uint8 [H, W, C]
    error: str | None = None  # why it could not be read (then data is None)


@dataclass
class Source:
    """Base class: ``len(source)`` items, iterated in a fixed order (each iteration starts over)."""

    path: str
    kind: str = ""
    label_origin: str | None = None  # where labels come from; None: unlabelled
    class_names: list[str] | None = None  # class_names[label], when known
    ignored: list[str] = field(default_factory=list)  # files present but not images

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[SourceItem]:
        raise NotImplementedError


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class FileSource(Source):
    """Images of a folder (recursive) or a zip, sorted by relative name. Labels from the class sub-folder (first
    path component) with ``labels_from_folders``, else from a ``dataset.json`` at the root if there is one."""

    def __init__(self, path: str, labels_from_folders: bool = False) -> None:
        super().__init__(path, kind="zip" if os.path.isfile(path) else "image-folder")
        all_names = list_files(path)
        self.names = list_image_files(path)  # an rdm generate folder's grid.png is not one of its images
        images = set(self.names)
        self.ignored = [n for n in all_names if n not in images and n != LABELS_FILE]
        if not self.names:
            raise ValueError(f"no image files in {path!r}")
        self.labels: list[Any] | None = None
        if labels_from_folders:
            loose = [n for n in self.names if "/" not in n]
            if loose:
                raise ValueError(f"--labels-from-folders: {loose[0]!r} in {path!r} is not inside a class folder")
            self.class_names = sorted({n.split("/", 1)[0] for n in self.names})
            index = {c: i for i, c in enumerate(self.class_names)}
            self.labels = [index[n.split("/", 1)[0]] for n in self.names]
            self.label_origin = "folders"
            return
        table = read_labels_file(path)
        if table is not None:
            missing = [n for n in self.names if n not in table]
            if missing:
                more = f" (and {len(missing) - 1} other images)" if len(missing) > 1 else ""
                raise ValueError(f"{LABELS_FILE} in {path!r} has no label for {missing[0]!r}{more}")
            self.labels = [table[n] for n in self.names]
            self.label_origin = LABELS_FILE

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[SourceItem]:
        labels = self.labels or [None] * len(self.names)
        if self.kind == "image-folder":
            for name, label in zip(self.names, labels):
                try:
                    data = read_file(os.path.join(self.path, name), MAX_IMAGE_BYTES)
                except (OSError, TooLargeError) as exc:
                    yield SourceItem(name, label, error=_reason(exc))
                else:
                    yield SourceItem(name, label, data)
            return
        with zipfile.ZipFile(self.path) as zf:
            for name, label in zip(self.names, labels):
                try:
                    data = read_member(zf, name, MAX_IMAGE_BYTES)
                except Exception as exc:  # a damaged member (bad CRC, bad deflate stream, ...) is reported, not fatal
                    yield SourceItem(name, label, error=_reason(exc))
                else:
                    yield SourceItem(name, label, data)


def _numpy_arrays_policy() -> UnpicklePolicy:
    """The CIFAR-10 batches are pickled dicts of numpy arrays: only the callables numpy's array pickles need."""
    core = getattr(np, "_core", None) or np.core
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): encode_text}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = core.multiarray._reconstruct
        allowed[(module, "scalar")] = core.multiarray.scalar
    return UnpicklePolicy(what="a CIFAR-10 batch", needed_for="numpy arrays", allowed=allowed)


CIFAR_POLICY = _numpy_arrays_policy()


def _load_pickle(tar: tarfile.TarFile, member: str) -> dict:
    f = tar.extractfile(member)
    if f is None:
        raise KeyError(member)
    return restricted_load(f, CIFAR_POLICY, encoding="bytes")


class CifarSource(Source):
    """The CIFAR-10 python tarball (``cifar-10-python.tar.gz``): the 50,000 training images of
    ``data_batch_1`` ... ``data_batch_5``, in order, with their class labels."""

    def __init__(self, path: str) -> None:
        super().__init__(path, kind="cifar-10", label_origin="cifar-10")
        images, labels = [], []
        try:
            with tarfile.open(path, "r:gz") as tar:
                for k in range(1, 6):
                    batch = _load_pickle(tar, f"{CIFAR_DIR}/data_batch_{k}")
                    images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                    labels.extend(int(x) for x in batch[b"labels"])
                try:
                    meta = _load_pickle(tar, f"{CIFAR_DIR}/batches.meta")
                    self.class_names = [n.decode() for n in meta[b"label_names"]]
                except KeyError:
                    pass
        except (OSError, EOFError, KeyError, tarfile.TarError, pickle.UnpicklingError, ValueError) as exc:
            raise ValueError(f"{path!r} is not a CIFAR-10 python tarball ({_reason(exc)})") from None
        self.images = np.concatenate(images).transpose(0, 2, 3, 1)  # [N, 32, 32, 3]
        self.labels = labels
        if len(self.labels) != len(self.images):
            raise ValueError(f"{path!r}: {len(self.images)} CIFAR-10 images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[SourceItem]:
        per_batch = len(self.images) // 5
        for i, (image, label) in enumerate(zip(self.images, self.labels)):
            yield SourceItem(f"data_batch_{i // per_batch + 1}[{i % per_batch}]", label, image)


#: Largest MNIST-style idx file, inflated (MNIST's training images are 47 MB).
MAX_IDX_BYTES = 1 << 30


def _read_idx(path: str) -> np.ndarray:
    """An idx file of unsigned bytes (MNIST), gzip-compressed."""
    with gzip.open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:3] != b"\0\0\x08":
            raise ValueError(f"{path!r} is not an idx file of unsigned bytes")
        ndim = head[3]
        dims = f.read(4 * ndim)
        shape = tuple(int.from_bytes(dims[4 * i : 4 + 4 * i], "big") for i in range(ndim))
        expected = int(np.prod(shape, dtype=object))
        if expected > MAX_IDX_BYTES:
            raise TooLargeError(f"{path!r}: its header says {shape}, more than the {MAX_IDX_BYTES >> 20} MiB an "
                                "idx file may hold")
        # the header says how many bytes follow: no more than that is read (a longer stream is refused)
        raw = head + dims + read_stream(f, expected, path)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path!r}: header says {shape} but holds {data.size} bytes")
    return data.reshape(shape)


class MnistSource(Source):
    """MNIST: a folder with ``train-images-idx3-ubyte.gz`` and ``train-labels-idx1-ubyte.gz`` (28 x 28 grayscale)."""

    def __init__(self, path: str) -> None:
        super().__init__(path, kind="mnist", label_origin="mnist", class_names=[str(d) for d in range(10)])
        try:
            self.images = _read_idx(os.path.join(path, MNIST_IMAGES))[..., None]  # [N, 28, 28, 1]
            self.labels = [int(x) for x in _read_idx(os.path.join(path, MNIST_LABELS))]
        except (OSError, EOFError) as exc:
            raise ValueError(f"cannot read MNIST from {path!r}: {_reason(exc)}") from None
        if self.images.ndim != 4 or len(self.labels) != len(self.images):
            raise ValueError(f"{path!r}: {len(self.images)} MNIST images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[SourceItem]:
        for i, (image, label) in enumerate(zip(self.images, self.labels)):
            yield SourceItem(f"train[{i}]", label, image)


class LmdbSource(Source):
    """An LSUN category: an lmdb (folder with ``data.mdb``, or that file) whose values are encoded images, in key
    order. Needs the optional ``lmdb`` package."""

    def __init__(self, path: str) -> None:
        super().__init__(path, kind="lmdb")
        with self._open() as env:
            self._len = int(env.stat()["entries"])

    def _open(self) -> Any:
        try:
            import lmdb
        except ImportError:
            raise ValueError(f"{self.path!r} is an lmdb: install the lmdb package (pip install lmdb)") from None
        try:
            return lmdb.open(self.path, subdir=os.path.isdir(self.path), readonly=True, lock=False, readahead=False)
        except lmdb.Error as exc:
            raise ValueError(f"cannot open lmdb {self.path!r}: {_reason(exc)}") from None

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[SourceItem]:
        with self._open() as env, env.begin(write=False) as txn:
            for key, value in txn.cursor():
                yield SourceItem(key.decode("utf-8", errors="replace"), None, bytes(value))


def open_source(path: str, labels_from_folders: bool = False) -> Source:
    """The source at ``path``, recognised by its layout; ValueError with the reason when it is not one."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path!r} does not exist")
    if not (os.path.isdir(path) or os.path.isfile(path)):  # a FIFO or a device would block the first read
        raise ValueError(f"{path!r} is neither a folder nor a regular file")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, MNIST_IMAGES)):
            source: Source = MnistSource(path)
        elif os.path.isfile(os.path.join(path, LMDB_DATA)):
            source = LmdbSource(path)
        else:
            return FileSource(path, labels_from_folders)
    elif path.lower().endswith(".zip"):
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path!r} is not a valid zip file")
        return FileSource(path, labels_from_folders)
    elif path.lower().endswith((".tar.gz", ".tgz")):
        source = CifarSource(path)
    elif os.path.basename(path) == LMDB_DATA:
        source = LmdbSource(path)
    else:
        raise ValueError(
            f"{path!r} is not an image folder, a .zip of images, the CIFAR-10 python .tar.gz, an MNIST folder or "
            "an lmdb"
        )
    if labels_from_folders:
        raise ValueError(f"--labels-from-folders applies to image folders and zips, not to {source.kind} ({path!r})")
    return source
