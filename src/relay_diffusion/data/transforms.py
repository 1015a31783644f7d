"""Pure image helpers of the dataset tool and loader: any PIL mode to uint8 ``[H, W, C]`` (C = 1 or 3), the
crops and resizes of ``rdm dataset``, PNG encoding.

Arrays are uint8 ``[H, W, C]`` throughout; sizes are ``(width, height)`` as on the command line.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image

from relay_diffusion.utils.limits import open_image

Size = tuple[int, int]  # (width, height)

TRANSFORMS = ("none", "center-crop", "center-crop-wide")
RESAMPLE = {
    "lanczos": PIL.Image.Resampling.LANCZOS,
    "box": PIL.Image.Resampling.BOX,
    "bicubic": PIL.Image.Resampling.BICUBIC,
}
# zlib level of the written PNGs. On a 256x256 photo-like image, 1 encodes in ~3/4 the time of PIL's default 6
# for ~10% more bytes; 0 (EDM's choice) is twice as fast again but ~1.5x larger.
PNG_COMPRESS_LEVEL = 1
WHITE = (255, 255, 255)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def decode(data: bytes, name: str = "image") -> PIL.Image.Image:
    """Decode an encoded image fully (a truncated or corrupt file raises here, not later); one that claims more
    than :data:`~relay_diffusion.utils.limits.MAX_IMAGE_PIXELS` is refused before decoding."""
    img = open_image(data, name)
    img.load()
    return img


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """Map [0, 65535] to [0, 255] with rounding (v / 257)."""
    v = np.clip(values, 0, 65535).astype(np.uint32)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def composite(color: np.ndarray, alpha: np.ndarray, background: Sequence[int]) -> np.ndarray:
    """``color * a + background * (1 - a)`` with a = alpha / 255, rounded; color ``[H, W, C]``, alpha ``[H, W]``."""
    a = alpha.astype(np.uint32)[..., None]
    bg = np.asarray(background, dtype=np.uint32)
    return ((color.astype(np.uint32) * a + bg * (255 - a) + 127) // 255).astype(np.uint8)


def gray_level(color: Sequence[int]) -> int:
    """The luminance PIL gives an RGB colour (ITU-R 601-2), used as the background of grayscale images."""
    return int(PIL.Image.new("RGB", (1, 1), tuple(color)).convert("L").getpixel((0, 0)))


def to_array(img: PIL.Image.Image, background: Sequence[int] = WHITE) -> np.ndarray:
    """Any PIL image as uint8 ``[H, W, C]``: grayscale modes give C = 1, colour modes C = 3.

    Palette images become RGB (their transparency is honoured), bilevel ``1`` becomes 0/255, 16-bit images are
    scaled by 255/65535 (32-bit ``I`` is taken to hold 16-bit values, float ``F`` values in [0, 1]), CMYK and
    other colour spaces convert to RGB, and transparent images (LA, RGBA, tRNS) are composited on ``background``
    (RGB; grayscale images use its luminance).
    """
    mode = img.mode
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    elif mode in ("L", "RGB") and "transparency" in img.info:
        img = img.convert("LA" if mode == "L" else "RGBA")
    elif mode in ("1", "La", "RGBa"):
        img = img.convert({"1": "L", "La": "LA", "RGBa": "RGBA"}[mode])
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _sixteen_to_eight(np.asarray(img).astype(np.int64))[..., None]
    if mode == "F":
        return np.round(np.clip(np.asarray(img, dtype=np.float64), 0, 1) * 255).astype(np.uint8)[..., None]
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)[..., None]
    if mode == "LA":
        x = np.asarray(img, dtype=np.uint8)
        return composite(x[..., :1], x[..., 1], [gray_level(background)])
    if mode == "RGBA":
        x = np.asarray(img, dtype=np.uint8)
        return composite(x[..., :3], x[..., 3], background)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def block_mean(x: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """Mean of every ``fy x fx`` block, rounded half up: ``[H, W, C]`` -> ``[H/fy, W/fx, C]``.

    With ``fy = fx = p`` this is the low-resolution image the RDM blur process ends at (docs/math.md §1). PIL's
    BOX filter computes the same mean but rounds twice (rows, then columns), so it can be off by one.
    """
    h, w, c = x.shape
    n = fy * fx
    s = x.reshape(h // fy, fy, w // fx, fx, c).sum(axis=(1, 3), dtype=np.uint32)
    return ((s + n // 2) // n).astype(np.uint8)


def resize(x: np.ndarray, size: Size, resample: str) -> np.ndarray:
    """Resize ``[H, W, C]`` to ``size`` = (width, height); ``box`` by integer factors is the exact block mean."""
    h, w, c = x.shape
    width, height = size
    if (w, h) == (width, height):
        return x
    if resample == "box" and w % width == 0 and h % height == 0:
        return block_mean(x, h // height, w // width)
    img = PIL.Image.fromarray(x[..., 0] if c == 1 else x)
    return np.asarray(img.resize((width, height), RESAMPLE[resample]), dtype=np.uint8).reshape(height, width, c)


def center_crop(x: np.ndarray, size: Size) -> np.ndarray:
    """The largest centred window of ``x`` with the aspect ratio of ``size`` (a square for a square size)."""
    h, w = x.shape[:2]
    width, height = size
    if w * height > h * width:
        cw, ch = max(1, round(h * width / height)), h
    else:
        cw, ch = w, max(1, round(w * height / width))
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[top : top + ch, left : left + cw]


def transform_image(x: np.ndarray, transform: str, size: Size | None, resample: str) -> np.ndarray:
    """One output image: ``none`` resizes to ``size`` (if given) ignoring the aspect ratio; ``center-crop`` crops
    to the aspect ratio of ``size`` and resizes; ``center-crop-wide`` does the same for a wide size (W >= H) and
    centres the result on a black W x W square."""
    if size is None:
        return x
    if transform == "none":
        return resize(x, size, resample)
    y = resize(center_crop(x, size), size, resample)
    if transform == "center-crop":
        return y
    width, height = size
    canvas = np.zeros((width, width, x.shape[2]), dtype=np.uint8)
    top = (width - height) // 2
    canvas[top : top + height] = y
    return canvas


def output_shape(size: Size, transform: str) -> tuple[int, int]:
    """(height, width) of the images ``transform_image`` makes for ``size``."""
    width, height = size
    return (width, width) if transform == "center-crop-wide" else (height, width)


@dataclass(frozen=True)
class ImageSpec:
    """How ``rdm dataset`` turns one decoded image into its outputs (one per size)."""

    sizes: tuple[Size | None, ...]  # output sizes, None: keep the image's own size
    transform: str = "none"  # one of TRANSFORMS
    resample: str = "lanczos"  # one of RESAMPLE
    background: tuple[int, int, int] = WHITE  # RGB behind transparent pixels
    channels: int | None = None  # 1 or 3; None keeps each image's own


def make_outputs(x: np.ndarray, spec: ImageSpec) -> list[np.ndarray]:
    """The outputs of ``x`` (``[H, W, C]``), one per size of ``spec``, same order.

    With the box filter, a size that divides the largest output is computed from it by block means, so the
    low-resolution dataset is exactly the end point of the blur process applied to the high-resolution one.
    """
    if spec.channels == 3 and x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    outputs: dict[int, np.ndarray] = {}
    order = sorted(range(len(spec.sizes)), key=lambda i: np.prod(spec.sizes[i] or (0, 0)), reverse=True)
    for i in order:
        size = spec.sizes[i]
        if spec.resample == "box" and size is not None and outputs:
            big = outputs[order[0]]
            h, w = output_shape(size, spec.transform)
            if big.shape[0] % h == 0 and big.shape[1] % w == 0:
                outputs[i] = block_mean(big, big.shape[0] // h, big.shape[1] // w)
                continue
        outputs[i] = transform_image(x, spec.transform, size, spec.resample)
    return [outputs[i] for i in range(len(spec.sizes))]


def encode_png(x: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[H, W, C]`` array (C = 1: grayscale, C = 3: RGB)."""
    buf = io.BytesIO()
    PIL.Image.fromarray(x[..., 0] if x.shape[2] == 1 else x).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()
