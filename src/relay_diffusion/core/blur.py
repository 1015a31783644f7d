"""The relay forward process: block DCT, patch-wise blur, the blur schedule and block noise.

docs/math.md §2-4 and 6c. Pure functions of tensors; any relay factor ``p`` and any ``H, W`` that are
multiples of ``p``. Blur factors are kept in *patch layout*, shape ``[..., p, 1, p]``, which broadcasts
against an image viewed as ``[N, C, H/p, p, W/p, p]`` (see :func:`to_patches`), so no full-size
attenuation map is ever built.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

#: Floor of every blur factor: even the strongest blur keeps this fraction of each frequency.
MIN_SCALE = 0.001
#: EDM's log-normal noise distribution (Karras et al. 2022, section 5), also used by the blur schedule.
P_MEAN = -1.2
P_STD = 1.2


@lru_cache(maxsize=32)
def _dct_matrix_cpu(p: int) -> torch.Tensor:
    k = torch.arange(p, dtype=torch.float64)[:, None]
    n = torch.arange(p, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * n + 1) * k / (2 * p)) * math.sqrt(2.0 / p)
    c[0] /= math.sqrt(2.0)
    return c


@lru_cache(maxsize=64)
def _dct_matrix_on(p: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # an ordinary tensor, usable with autograd whoever asked for it first
        return _dct_matrix_cpu(p).to(device=device, dtype=dtype)


def dct_matrix(p: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C`` of size ``[p, p]``: ``C[k, n] = s_k cos(pi (2n+1) k / 2p)``.

    Built once per ``(p, dtype, device)`` and kept (the float64 values rounded to ``dtype``), so the block
    DCT of every sampler step and training batch neither rebuilds it nor copies it to the device again.
    The returned tensor is shared: do not modify it in place."""
    if p < 1:
        raise ValueError(f"relay factor p must be >= 1, got {p}")
    return _dct_matrix_on(int(p), dtype, _device(device))


def _device(device: torch.device | str) -> torch.device:
    """``device`` with its index (``'cuda'`` is the current CUDA device), so that one device is one cache key."""
    device = torch.device(device)
    if device.index is None and device.type != "cpu" and hasattr(torch, device.type):
        module = getattr(torch, device.type)
        if hasattr(module, "current_device") and module.is_available():
            device = torch.device(device.type, module.current_device())
    return device


def _check_divisible(x: torch.Tensor, p: int) -> None:
    h, w = x.shape[-2:]
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the relay factor {p}")


def dct(x: torch.Tensor, p: int) -> torch.Tensor:
    """Block DCT (docs/math.md §2): orthonormal 2-D DCT-II of every non-overlapping ``p x p`` patch, in place of the patch.

    ``x``: ``[..., H, W]`` with ``H, W`` multiples of ``p``. Two small matrix products, no FFT.
    """
    _check_divisible(x, p)
    c = dct_matrix(p, x.dtype, x.device)
    *lead, h, w = x.shape
    y = torch.matmul(c, x.reshape(*lead, h // p, p, w))  # along H, patch by patch
    return torch.matmul(y.reshape(*lead, h, w // p, p), c.T).reshape(x.shape)  # along W


def idct(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of :func:`dct` (the DCT matrix is orthonormal, so its inverse is its transpose)."""
    _check_divisible(x, p)
    c = dct_matrix(p, x.dtype, x.device)
    *lead, h, w = x.shape
    y = torch.matmul(c.T, x.reshape(*lead, h // p, p, w))
    return torch.matmul(y.reshape(*lead, h, w // p, p), c).reshape(x.shape)


def to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """View ``[..., H, W]`` as ``[..., H/p, p, W/p, p]`` so patch-layout factors broadcast against it."""
    *lead, h, w = x.shape
    return x.reshape(*lead, h // p, p, w // p, p)


def blur_factors(b: torch.Tensor | float, p: int, min_scale: float = MIN_SCALE) -> torch.Tensor:
    """Per-frequency blur factors ``a(i, j; b)`` (docs/math.md §3) in patch layout ``[*b.shape, p, 1, p]``.

    ``a = exp(-f2 b^2 / 2) (1 - min_scale) + min_scale`` with ``f2 = (pi i / p)^2 + (pi j / p)^2``.
    ``b`` is a scalar or a tensor (e.g. ``[N, 1, 1, 1]`` for one strength per sample).
    """
    b = torch.as_tensor(b, dtype=torch.float64) if not torch.is_tensor(b) else b
    b2 = b.square()[..., None, None, None]
    return torch.exp(-_squared_frequencies(int(p), b.dtype, _device(b.device)) * b2 / 2) * (1 - min_scale) + min_scale


@lru_cache(maxsize=64)
def _squared_frequencies(p: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``f2 = (pi i / p)^2 + (pi j / p)^2`` in patch layout ``[p, 1, p]``, kept per ``(p, dtype, device)``."""
    with torch.inference_mode(False):
        freqs = torch.arange(p, dtype=dtype, device=device) * (math.pi / p)
        return freqs.square()[:, None, None] + freqs.square()[None, None, :]


def tile_factors(a: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Expand patch-layout factors ``[..., p, 1, p]`` to a full map ``[..., H, W]`` (for inspection/tests)."""
    p = a.shape[-1]
    return a.squeeze(-2).repeat(*([1] * (a.dim() - 3)), height // p, width // p)


def blur(x: torch.Tensor, b: torch.Tensor | float, p: int, min_scale: float = MIN_SCALE) -> torch.Tensor:
    """Blur every ``p x p`` patch towards its mean (docs/math.md §3): ``idct(dct(x) * a(b))``.

    ``x``: ``[N, C, H, W]``; ``b``: scalar or ``[N, 1, 1, 1]``.
    """
    b = torch.as_tensor(b, dtype=x.dtype, device=x.device)
    if b.dim() > 0:  # one strength per sample: factors [N, 1, 1, p, 1, p] against [N, C, H/p, p, W/p, p]
        b = b.reshape(b.shape[0], 1, 1)
    a = blur_factors(b, p, min_scale).to(x.dtype)
    return idct((to_patches(dct(x, p), p) * a).reshape(x.shape), p)


def blur_strength(t: torch.Tensor, blur_sigma_max: float, prob_length: float) -> torch.Tensor:
    """Blur strength at noise level ``t`` (docs/math.md §6c): ``b = bsm sin(tau pi / 2)^2``,
    ``tau = Phi((ln t - P_mean) / P_std) / L`` (``L = prob_length``, the reference's ``truncation_t``)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    tau = _normal_cdf((torch.log(t) - P_MEAN) / P_STD) / prob_length
    return blur_sigma_max * torch.sin(tau * math.pi / 2).square()


def blur_schedule(
    t: torch.Tensor | float, p: int, blur_sigma_max: float, prob_length: float, min_scale: float = MIN_SCALE
) -> torch.Tensor:
    """``A(t)``, the blur factors at noise level ``t`` (docs/math.md §6c), patch layout ``[*t.shape, p, 1, p]``."""
    return blur_factors(blur_strength(t, blur_sigma_max, prob_length), p, min_scale)


def block_noise(eps: torch.Tensor, p: int) -> torch.Tensor:
    """Block noise (docs/math.md §4): ``(1/p) sum_{dx,dy < p} roll(eps, (dx, dy), dims=(H, W))``.

    The sum of rolls is a circular ``p x p`` box sum over the window ending at each pixel, computed as a
    circular pad by ``p - 1`` at the top/left and one stride-1 average pool (several times faster than
    ``p^2`` rolls). Each pixel keeps unit variance for unit-variance ``eps``.
    """
    if p == 1:
        return eps.clone()
    *lead, h, w = eps.shape
    padded = F.pad(eps.reshape(1, -1, h, w), (p - 1, 0, p - 1, 0), mode="circular")
    return (F.avg_pool2d(padded, p, stride=1) * p).reshape(eps.shape)


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def normal_cdf(x: torch.Tensor | float) -> torch.Tensor:
    """Standard normal CDF ``Phi``."""
    return _normal_cdf(torch.as_tensor(x, dtype=torch.float64) if not torch.is_tensor(x) else x)


def normal_icdf(q: torch.Tensor | float) -> torch.Tensor:
    """Inverse standard normal CDF ``Phi^-1``."""
    q = torch.as_tensor(q, dtype=torch.float64) if not torch.is_tensor(q) else q
    return math.sqrt(2) * torch.erfinv(2 * q - 1)
