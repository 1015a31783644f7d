"""One decoded copy of a dataset per machine: a memory-mapped uint8 ``.npy`` file ``[N, C, H, W]``.

The first process that needs the file decodes every image into it under a temporary name and renames it into
place while it holds ``<file>.lock``; every other process (other ranks, their loader workers, later runs)
waits for the lock, checks the file and maps it read-only. Mapped pages live once in the page cache, so host
memory does not grow with processes x workers, and the kernel can drop and reread them under memory pressure.

A file is used only if its name matches the dataset's fingerprint (path, size and modification time of the
zip or of every image file, image shape, which images) and it is whole (``.npy`` header, file length, and its
first and last images equal to freshly decoded ones); anything else is rebuilt.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from relay_diffusion.utils.fileio import user_cache_dir

try:  # POSIX; elsewhere builders may race, which the temp-file-and-rename write keeps correct
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["SharedImageCache", "available_memory", "cache_refusal", "default_cache_dir", "source_fingerprint"]

FORMAT_VERSION = 1


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/relay-diffusion/datasets`` (``~/.cache/...`` when unset)."""
    return os.fspath(user_cache_dir("datasets"))


def available_memory() -> Optional[int]:
    """Bytes of memory the kernel can hand out without swapping (``MemAvailable``); None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def cache_refusal(nbytes: int) -> Optional[str]:
    """Why a cache of ``nbytes`` decoded bytes is refused (more than the available memory), or None."""
    free = available_memory()
    if free is None or nbytes <= free:
        return None
    return (f"the decoded dataset needs {nbytes / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB of memory is "
            f"available; train without it (--cache=0, the default: loader workers decode images as needed)")


def source_fingerprint(path: str, fnames: Sequence[str]) -> dict:
    """What identifies the images' bytes: the zip's size and mtime, or every image file's."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        st = os.stat(path)
        return {"zip": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    h = hashlib.sha256()
    for name in fnames:
        st = os.stat(os.path.join(path, name))
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"folder": path, "files": h.hexdigest()}


class SharedImageCache:
    """Decoded images ``[N, C, H, W]`` uint8 in one file, mapped lazily in each process (picklable)."""

    def __init__(self, path: str, shape: tuple[int, ...], status: str) -> None:
        self.path, self.shape = path, tuple(shape)
        self.status = status  # "built", "reused" or "rebuilt (...)": what opening it did
        self._array: Optional[np.ndarray] = None
        self._pid: Optional[int] = None

    @classmethod
    def open(cls, folder: str, name: str, fingerprint: dict, shape: Sequence[int],
             decode: Callable[[int], np.ndarray], rows: Callable[[], Iterator[np.ndarray]]) -> "SharedImageCache":
        """The cache of ``fingerprint`` in ``folder``, built if missing, stale or damaged.

        ``shape``: ``[N, C, H, W]``; ``decode(row)``: one image (for the spot check); ``rows()``: every image in
        row order (for building). Raises OSError when the folder or file cannot be written.
        """
        shape = tuple(int(s) for s in shape)
        key = hashlib.sha256(json.dumps([FORMAT_VERSION, fingerprint, shape], sort_keys=True).encode()).hexdigest()
        path = os.path.join(folder, f"{name}-{'x'.join(map(str, shape[1:]))}-n{shape[0]}-{key[:16]}.npy")
        if _check(path, shape, decode) is None:
            return cls(path, shape, "reused")
        os.makedirs(folder, exist_ok=True)
        with _exclusive(path + ".lock"):
            problem = _check(path, shape, decode)  # another process may have built it while this one waited
            if problem is None:
                return cls(path, shape, "reused")
            _build(path, shape, rows)
        problem_now = _check(path, shape, decode)
        if problem_now is not None:
            raise OSError(f"the dataset cache {path} cannot be read back after writing it: {problem_now}")
        return cls(path, shape, "built" if problem == "missing" else f"rebuilt ({problem})")

    def array(self) -> np.ndarray:
        """The read-only mapping, opened once per process (a forked loader worker maps it again)."""
        if self._array is None or self._pid != os.getpid():
            self._array = np.load(self.path, mmap_mode="r")
            self._pid = os.getpid()
        return self._array

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _array=None, _pid=None)


def _check(path: str, shape: tuple[int, ...], decode: Callable[[int], np.ndarray]) -> Optional[str]:
    """None if ``path`` is a whole cache of ``shape``; otherwise what is wrong with it."""
    if not os.path.exists(path):
        return "missing"
    try:
        arr = np.load(path, mmap_mode="r")
        if arr.shape != shape or arr.dtype != np.uint8 or not arr.flags.c_contiguous:
            return f"holds {arr.dtype} {list(arr.shape)}, expected uint8 {list(shape)}"
        if os.path.getsize(path) != arr.offset + arr.nbytes:
            return "wrong file length"
        for row in {0, shape[0] - 1}:
            if not np.array_equal(arr[row], decode(row)):
                return f"image {row} differs from the dataset"
    except (OSError, ValueError, EOFError) as exc:
        return f"unreadable: {exc}"
    return None


@contextlib.contextmanager
def _exclusive(lock_path: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (waits for other holders). Where the filesystem has no locks
    (ENOLCK on some network filesystems), go on without: concurrent builders then each write their own
    temporary file and the last rename wins, which readers never see half-done."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _build(path: str, shape: tuple[int, ...], rows: Callable[[], Iterator[np.ndarray]]) -> None:
    """Write the cache under a temporary name (plain writes, so the builder maps none of it), then rename."""
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):  # left by a killed builder (the lock is ours now)
        with contextlib.suppress(OSError):
            os.remove(stale)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        header = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        offset = header.offset
        del header
        with open(tmp, "r+b") as f:
            f.seek(offset)
            count = 0
            for image in rows():
                f.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
                count += 1
            if count != shape[0]:
                raise OSError(f"expected {shape[0]} images, decoded {count}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
