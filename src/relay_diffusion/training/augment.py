"""Non-leaking data augmentation (Karras et al. 2022, appendix; EDM's ``--augment`` preset).

Each transformation is applied to a sample with probability ``p x strength``; the network is told what was
done through 9 *augmentation labels* per sample, so it learns the clean distribution at labels = 0 and the
augmentations never leak into generated images. Labels, in order:
``[xflip, yflip, scale, cos(rotation) - 1, sin(rotation), aniso cos(r), aniso sin(r), translate_x, translate_y]``.

Every random draw comes from the caller's per-sample generators (one fixed-size draw of uniforms and one of
normals per sample), so a sample's augmentation depends on its generator only, not on the batch.
Written here rather than taken from a library because the draws must come from those generators and the
labels must match the networks' ``augment_dim = 9`` layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from relay_diffusion.core.rng import SeedGenerators

#: Per-sample draws: uniforms (coins and angles) and normals (magnitudes), always drawn in full.
NUM_UNIFORMS = 11
NUM_NORMALS = 4
NUM_LABELS = 9
#: Lanczos-4 resampling kernel radius on the 2x grid (taps at odd offsets 1, 3, 5, 7).
_KERNEL_RADIUS = 7


@dataclass
class AugmentPipe:
    """Geometric augmentation with augmentation labels: ``pipe(images, rng) -> (images, labels [N, 9])``.

    ``images``: ``[N, C, H, W]`` floats in [-1, 1]; ``rng``: one generator per sample.
    Strengths multiply ``p``; a strength of 0 disables a transformation (its labels stay 0).
    """

    p: float = 1.0                      # overall probability multiplier
    xflip: float = 0.0                  # horizontal flip (with probability 1/2 when it applies)
    yflip: float = 0.0                  # vertical flip (with probability 1/2 when it applies)
    scale: float = 0.0                  # isotropic scaling by 2^(N(0, 1) * scale_std)
    rotate_frac: float = 0.0            # rotation by U(-1, 1) * pi * rotate_frac_max
    aniso: float = 0.0                  # anisotropic scaling along a random direction
    translate_frac: float = 0.0         # translation by N(0, 1) * translate_frac_std of the image size
    scale_std: float = 0.2
    rotate_frac_max: float = 1.0
    aniso_std: float = 0.2
    aniso_rotate_prob: float = 0.5
    translate_frac_std: float = 0.125

    @classmethod
    def edm_preset(cls, p: float) -> "AugmentPipe":
        """EDM's ``--augment`` preset: xflip=1e8 (always eligible); yflip, scale, rotate_frac, aniso and
        translate_frac 1."""
        return cls(p=p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

    def __call__(self, images: torch.Tensor, rng: SeedGenerators) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = images.shape
        dev = images.device
        u = rng.rand([NUM_UNIFORMS], dtype=torch.float32).to(dev)  # [N, 11]
        z = rng.randn([NUM_NORMALS], dtype=torch.float32).to(dev)  # [N, 4]
        zero = torch.zeros_like(u[:, 0])

        def applies(i: int, strength: float) -> torch.Tensor:
            return u[:, i] < strength * self.p

        # Pixel blitting: flips are exact.
        fx = torch.where(applies(1, self.xflip) & (u[:, 0] < 0.5), 1.0, zero)
        fy = torch.where(applies(3, self.yflip) & (u[:, 2] < 0.5), 1.0, zero)
        images = torch.where(fx.view(-1, 1, 1, 1) > 0, images.flip(3), images)
        images = torch.where(fy.view(-1, 1, 1, 1) > 0, images.flip(2), images)

        # General geometric transformations, as one matrix mapping output to input coordinates.
        g = torch.eye(3, device=dev).expand(n, 3, 3)
        s_w = torch.where(applies(4, self.scale), z[:, 0], zero)
        s = torch.exp2(s_w * self.scale_std)
        g = g @ _scale(1 / s, 1 / s)
        theta = torch.where(applies(6, self.rotate_frac), (u[:, 5] * 2 - 1) * math.pi * self.rotate_frac_max, zero)
        g = g @ _rotate(theta)
        a_w = torch.where(applies(8, self.aniso), z[:, 1], zero)
        a_r = torch.where(u[:, 9] < self.aniso_rotate_prob, (u[:, 7] * 2 - 1) * math.pi, zero)
        a_s = torch.exp2(a_w * self.aniso_std)
        g = g @ _rotate(-a_r) @ _scale(1 / a_s, a_s) @ _rotate(a_r)
        t = torch.where(applies(10, self.translate_frac)[:, None], z[:, 2:4], torch.zeros_like(z[:, 2:4]))
        g = g @ _translate(-t[:, 0] * w * self.translate_frac_std, -t[:, 1] * h * self.translate_frac_std)

        moved = (s_w != 0) | (theta != 0) | (a_w != 0) | (t != 0).any(dim=1)
        if bool(moved.any()):
            idx = moved.nonzero().squeeze(1)
            images = images.clone()
            images[idx] = resample(images[idx], g[idx])

        labels = torch.stack(
            [fx, fy, s_w, theta.cos() - 1, theta.sin(), a_w * a_r.cos(), a_w * a_r.sin(), t[:, 0], t[:, 1]], dim=1
        )
        return images, labels


def _matrix(rows: list[list[torch.Tensor | float]], like: torch.Tensor) -> torch.Tensor:
    """Stack per-sample entries into ``[N, 3, 3]``."""
    return torch.stack(
        [torch.stack([torch.as_tensor(v, dtype=like.dtype, device=like.device).expand_as(like) for v in r], -1)
         for r in rows], -2
    )


def _scale(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    return _matrix([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]], sx)


def _rotate(a: torch.Tensor) -> torch.Tensor:
    c, s = a.cos(), a.sin()
    return _matrix([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], a)


def _translate(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    return _matrix([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]], tx)


@lru_cache(maxsize=None)
def _lanczos_taps() -> tuple[float, ...]:
    """Interpolation kernel on the 2x grid: 1 at offset 0, Lanczos-4 weights at odd offsets, 0 elsewhere."""
    radius, a = _KERNEL_RADIUS, 4
    taps = []
    for k in range(-radius, radius + 1):
        if k == 0:
            taps.append(1.0)
        elif k % 2 == 0:
            taps.append(0.0)
        else:
            x = k / 2
            taps.append(math.sin(math.pi * x) / (math.pi * x) * math.sin(math.pi * x / a) / (math.pi * x / a))
    odd = sum(taps) - 1.0
    return tuple(t if i == radius else t / odd for i, t in enumerate(taps))


def _filter_axis(x: torch.Tensor, taps: torch.Tensor, dim: int) -> torch.Tensor:
    """Depthwise 'valid' correlation of ``x [N, C, H, W]`` with ``taps`` along ``dim`` (2 or 3)."""
    c = x.shape[1]
    k = taps.to(x.dtype).flip(0)
    weight = k.view(1, 1, -1, 1) if dim == 2 else k.view(1, 1, 1, -1)
    return F.conv2d(x, weight.expand(c, 1, *weight.shape[2:]), groups=c)


def _pad_axis(x: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    mode = "reflect" if x.shape[dim] > amount else "replicate"
    pad = [0, 0, amount, amount] if dim == 2 else [amount, amount, 0, 0]
    return F.pad(x, pad, mode=mode)


def _upsample2x(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Band-limited 2x upsampling along ``dim`` (``n -> 2n - 1`` samples): sample ``2k`` is the input's ``k``,
    ``2k + 1`` lies halfway, so both ends are pixel centres and reflections stay consistent."""
    m = _KERNEL_RADIUS
    pad = (m + 1) // 2
    taps = torch.tensor(_lanczos_taps(), device=x.device)
    xp = _pad_axis(x, pad, dim)
    shape = list(xp.shape)
    shape[dim] *= 2
    z = xp.new_zeros(shape)
    (z[:, :, ::2] if dim == 2 else z[:, :, :, ::2]).copy_(xp)
    y = _filter_axis(z, taps, dim)  # output o is centred on z[o + m], i.e. on 2x position o + m - 2 pad
    start = 2 * pad - m
    return y.narrow(dim, start, x.shape[dim] * 2 - 1)


def _downsample2x(y: torch.Tensor, dim: int) -> torch.Tensor:
    """Low-pass (the same kernel, halved) and keep the even samples along ``dim``."""
    m = _KERNEL_RADIUS
    taps = torch.tensor(_lanczos_taps(), device=y.device) / 2
    out = _filter_axis(_pad_axis(y, m, dim), taps, dim)
    return out[:, :, ::2] if dim == 2 else out[:, :, :, ::2]


def resample(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """Apply an affine map per sample: ``out(x) = images(g_inv x)``, ``x`` in pixel units about the centre.

    ``images``: ``[N, C, H, W]``; ``g_inv``: ``[N, 3, 3]``. Upsample 2x (Lanczos), sample bilinearly with
    reflection at the borders, low-pass and decimate back, which keeps aliasing low.
    """
    n, _, h, w = images.shape
    up = _upsample2x(_upsample2x(images, 2), 3)  # [N, C, 2H-1, 2W-1]; sample i sits at input coordinate i / 2
    cy, cx = (h - 1) / 2, (w - 1) / 2
    ys = torch.arange(2 * h - 1, device=images.device, dtype=images.dtype) / 2 - cy
    xs = torch.arange(2 * w - 1, device=images.device, dtype=images.dtype) / 2 - cx
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1)  # [2H, 2W, 3]
    src = torch.einsum("nij,hwj->nhwi", g_inv.to(images.dtype), pts)
    nx = (src[..., 0] + cx) / max(w - 1, 1) * 2 - 1  # align_corners=True: -1 and 1 are the outer pixel centres
    ny = (src[..., 1] + cy) / max(h - 1, 1) * 2 - 1
    out = F.grid_sample(up, torch.stack([nx, ny], dim=-1), mode="bilinear", padding_mode="reflection",
                        align_corners=True)
    return _downsample2x(_downsample2x(out, 2), 3)
