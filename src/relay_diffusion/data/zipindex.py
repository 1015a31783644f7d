"""Where the members of a zip data set are, in a few numpy arrays instead of one Python object per member.

``zipfile.ZipFile`` keeps a ``ZipInfo`` of ~600 bytes per member, and every process that opens the data set
(each rank and each of its loader workers) builds its own: at ImageNet's 1.28 M images that is ~0.8 GB per
process, multiplied by ranks x workers. :class:`ZipIndex` reads the central directory once, keeps each member's
offset, sizes, CRC and compression method in arrays (~30 bytes per member, shared by the forked workers as they
never touch them from Python), and reads a member by seeking to it: the same bytes as ``ZipFile.read``, with the
same CRC check, and never more than the member declares.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np

from relay_diffusion.utils.limits import MAX_IMAGE_BYTES, TooLargeError

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # signature, version, flags, method, time, date, crc, sizes, name, extra


class ZipIndex:
    """The members ``names`` of the zip at ``path``, in that order, readable by position. ``infos``: their
    ``ZipInfo`` when the caller has read the central directory already (else it is read here)."""

    def __init__(self, path: str | os.PathLike, names: Sequence[str],
                 infos: Sequence[zipfile.ZipInfo] | None = None) -> None:
        self.path = os.fspath(path)
        if infos is None:
            with zipfile.ZipFile(self.path) as zf:
                infos = [zf.getinfo(name) for name in names]
        self.offset = np.array([i.header_offset for i in infos], dtype=np.int64)
        self.compressed = np.array([i.compress_size for i in infos], dtype=np.int64)
        self.size = np.array([i.file_size for i in infos], dtype=np.int64)
        self.crc = np.array([i.CRC for i in infos], dtype=np.uint32)
        self.method = np.array([i.compress_type for i in infos], dtype=np.int32)
        self.encrypted = np.array([bool(i.flag_bits & 0x1) for i in infos], dtype=bool)

    def __len__(self) -> int:
        return len(self.offset)

    def read(self, f: BinaryIO, i: int, name: str) -> bytes:
        """Member ``i`` (called ``name`` in errors) from the open zip file ``f``."""
        size, method = int(self.size[i]), int(self.method[i])
        if max(size, int(self.compressed[i])) > MAX_IMAGE_BYTES:  # what is inflated, and what is read for it
            raise TooLargeError(f"{name}: {max(size, int(self.compressed[i])) >> 20} MiB, more than the "
                                f"{MAX_IMAGE_BYTES >> 20} MiB an image file may hold")
        if self.encrypted[i] or method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            with zipfile.ZipFile(self.path) as zf:  # encrypted, bzip2, lzma: rare; zipfile's own reader
                return zf.read(name)
        f.seek(int(self.offset[i]))
        header = f.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"{name}: bad local file header")
        name_len, extra_len = _LOCAL_HEADER.unpack(header)[-2:]
        f.seek(int(self.offset[i]) + _LOCAL_HEADER.size + name_len + extra_len)
        raw = f.read(int(self.compressed[i]))
        if method == zipfile.ZIP_STORED:
            data = raw
        else:
            inflate = zlib.decompressobj(-15)
            data = inflate.decompress(raw, size + 1)
        if len(data) != size or zlib.crc32(data) != int(self.crc[i]):
            raise zipfile.BadZipFile(f"Bad CRC-32 or size for file {name!r}")
        return data
