"""Bounded reads of files from elsewhere: a zip member, a gzip stream or an image never costs more memory than
what it claims to hold, and a claim past these bounds is refused with the member's name before it is read.

The bounds are far above any real data set's entries (an 8192 x 8192 RGBA PNG stored raw is 256 MiB; ImageNet's
``dataset.json`` is about 40 MiB) and far below a decompression bomb's gigabytes.
"""

from __future__ import annotations

import io
import os
import zipfile
from typing import BinaryIO

import PIL.Image

#: Largest encoded image file (a zip member or a file of a folder).
MAX_IMAGE_BYTES = 256 << 20
#: Largest JSON file read from a data set or a folder (``dataset.json`` and the like).
MAX_JSON_BYTES = 128 << 20
#: Largest image by pixel count, checked from the header before decoding: 8192 x 8192.
MAX_IMAGE_PIXELS = 8192 * 8192


class TooLargeError(ValueError):
    """A file or member claims (or turns out) to hold more than its bound."""


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def read_member(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """The bytes of zip member ``name``, at most ``limit``: the member's declared size is checked first, and
    the inflated stream is cut at that size (a member whose stream inflates beyond what it declares fails its
    CRC check instead of filling memory)."""
    size = zf.getinfo(name).file_size
    if size > limit:
        raise TooLargeError(f"{name}: {_mib(size)} inflated, more than the {_mib(limit)} such a file may hold")
    with zf.open(name) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLargeError(f"{name}: more than the {_mib(limit)} such a file may hold")
    return data


def read_file(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the file at ``path``, refused past ``limit`` (by its size, then by what is read)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise TooLargeError(f"{os.fspath(path)}: {_mib(size)}, more than the {_mib(limit)} such a file may hold")
        return read_stream(f, limit, os.fspath(path))


def read_stream(f: BinaryIO, limit: int, name: str) -> bytes:
    """At most ``limit`` bytes of a stream (a gzip stream, say); one more means it holds too much."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLargeError(f"{name}: more than the {_mib(limit)} such a file may hold")
    return data


def open_image(source: bytes | str | os.PathLike, name: str | None = None) -> PIL.Image.Image:
    """An image opened from its header (encoded bytes or a path), refused before decoding when it claims more
    than :data:`MAX_IMAGE_PIXELS` (a decompression bomb: a few kilobytes that decode to gigabytes)."""
    name = name or (os.fspath(source) if not isinstance(source, bytes) else "image")
    try:
        img = PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except PIL.Image.DecompressionBombError:  # Pillow's own bound, twice its warning threshold
        raise TooLargeError(f"{name}: more pixels than an image may have (a decompression bomb?)") from None
    try:
        check_pixels(img, name)
    except TooLargeError:
        img.close()
        raise
    return img


def check_pixels(img: PIL.Image.Image, name: str) -> None:
    """Refuse an opened, not yet decoded image of more than :data:`MAX_IMAGE_PIXELS` pixels."""
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise TooLargeError(f"{name}: {width} x {height} pixels, more than the {MAX_IMAGE_PIXELS:,} an image may "
                            "have (a decompression bomb?)")
