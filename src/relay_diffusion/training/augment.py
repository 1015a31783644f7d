"""Non-leaking data augmentation (Karras et al. 2022, appendix; EDM's ``--augment`` preset).

Each transformation is applied to a sample with probability ``p x strength``; the network is told what was
done through 9 *augmentation labels* per sample, so it learns the clean distribution at labels = 0 and the
augmentations never leak into generated images. Labels, in order (EDM's ``AugmentPipe`` layout):
``[xflip, yflip, scale, cos(rotation) - 1, sin(rotation), aniso w cos(r), aniso w sin(r), translate_x,
translate_y]``.

The geometric part resamples as EDM's pipeline does (the construction of Karras et al. 2020, "Training
generative adversarial networks with limited data", appendix B.2): reflect-pad by what the transform
reveals, upsample 2x with the Symlet-6 wavelet low-pass filter, sample bilinearly, low-pass with the same
filter and decimate. For the same parameters the images match that pipeline (to float32 rounding; checked
against an independent float64 computation in ``tests/test_augment.py``).

Where this still differs from the reference:
- The random draws. Here every sample draws a fixed-size block (11 uniforms, 4 normals) from its own
  generator, so a sample's augmentation depends on its seed only; EDM draws each parameter for the whole
  batch from the global generator. The distribution of parameters is the same, the numbers are not.
- The padding margin is each sample's own; EDM pads the whole batch by the largest margin any sample needs.
  The margin only moves where the zero border of the intermediate canvas lies, which reaches the outermost
  filter taps near revealed borders (differences ~1e-6); per sample, an image's augmentation does not
  depend on the batch it is in, so one process and several give the same batches.
The whole step runs on the device with shapes fixed by the image size (:func:`resample`): nothing is read
back to the host, so a training step never waits for the accelerator here.
Kept from the reference on purpose: sym6 is not linear-phase, so a rotation moves the content by up to
~0.1 pixel (0.095 px per axis for a half turn); and the aniso labels ``(w cos r, w sin r)`` do not tell
``(w, r)`` from ``(-w, r + pi)``, which stretch along perpendicular axes. Changing either would change what
the reference's networks were trained on.
Written here rather than taken from a library because the draws must come from those generators and the
labels must match the networks' ``augment_dim = 9`` layout.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from relay_diffusion.core.rng import SeedGenerators

#: Per-sample draws: uniforms (coins and angles) and normals (magnitudes), always drawn in full.
NUM_UNIFORMS = 11
NUM_NORMALS = 4
NUM_LABELS = 9
#: Decomposition low-pass filter of the Symlet-6 wavelet (PyWavelets' ``pywt.Wavelet('sym6').dec_lo``): the
#: resampling filter of EDM's AugmentPipe. Orthonormal: sum h = sqrt(2), sum h[k] h[k + 2m] = [m == 0].
SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)
#: Extra border, in pixels, of the intermediate canvas on each side (a quarter of the filter length).
FILTER_PAD = len(SYM6) // 4


@dataclass
class AugmentParams:
    """The drawn parameters of a batch, one entry per sample (0 = not applied)."""

    xflip: torch.Tensor         # [N] 1 = mirror left-right
    yflip: torch.Tensor         # [N] 1 = mirror top-bottom
    scale: torch.Tensor         # [N] isotropic scale exponent w: scale by 2^(w scale_std)
    rotate: torch.Tensor        # [N] rotation angle (radians)
    aniso: torch.Tensor         # [N] anisotropic scale exponent w: 2^(w aniso_std) along the direction r
    aniso_angle: torch.Tensor   # [N] r
    translate: torch.Tensor     # [N, 2] translation in units of translate_frac_std x (width, height)

    def labels(self) -> torch.Tensor:
        """The 9 augmentation labels ``[N, 9]`` in EDM's order (module docstring)."""
        w, r = self.aniso, self.aniso_angle
        return torch.stack([self.xflip, self.yflip, self.scale, self.rotate.cos() - 1, self.rotate.sin(),
                            w * r.cos(), w * r.sin(), self.translate[:, 0], self.translate[:, 1]], dim=1)


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

    @property
    def geometric(self) -> bool:
        """Whether the resampling runs at all (EDM runs it for the whole batch as soon as one is enabled)."""
        return self.p > 0 and any(v > 0 for v in (self.scale, self.rotate_frac, self.aniso, self.translate_frac))

    def draw(self, rng: SeedGenerators, device: torch.device) -> AugmentParams:
        """One fixed-size draw per sample from its generator, mapped to the parameters."""
        u = rng.rand([NUM_UNIFORMS], dtype=torch.float32).to(device)  # [N, 11]
        z = rng.randn([NUM_NORMALS], dtype=torch.float32).to(device)  # [N, 4]
        zero = torch.zeros_like(u[:, 0])

        def applies(i: int, strength: float) -> torch.Tensor:
            return u[:, i] < strength * self.p

        return AugmentParams(
            xflip=torch.where(applies(1, self.xflip) & (u[:, 0] < 0.5), 1.0, zero),
            yflip=torch.where(applies(3, self.yflip) & (u[:, 2] < 0.5), 1.0, zero),
            scale=torch.where(applies(4, self.scale), z[:, 0], zero),
            rotate=torch.where(applies(6, self.rotate_frac), (u[:, 5] * 2 - 1) * math.pi * self.rotate_frac_max, zero),
            aniso=torch.where(applies(8, self.aniso), z[:, 1], zero),
            aniso_angle=torch.where(u[:, 9] < self.aniso_rotate_prob, (u[:, 7] * 2 - 1) * math.pi, zero),
            translate=torch.where(applies(10, self.translate_frac)[:, None], z[:, 2:4], torch.zeros_like(z[:, 2:4])),
        )

    def inverse_matrix(self, params: AugmentParams, height: int, width: int) -> torch.Tensor:
        """``G^-1 [N, 3, 3]`` mapping output to input pixel coordinates about the image centre (x right, y
        down): ``S(1/s) R(theta) R(-r) S(1/a, a) R(r) T(-t)``, EDM's order of the transformations."""
        n = params.scale.shape[0]
        s = torch.exp2(params.scale * self.scale_std)
        a = torch.exp2(params.aniso * self.aniso_std)
        r = params.aniso_angle
        tx = params.translate[:, 0] * width * self.translate_frac_std
        ty = params.translate[:, 1] * height * self.translate_frac_std
        g = torch.eye(3, device=s.device, dtype=s.dtype).expand(n, 3, 3)
        g = g @ _scale(1 / s, 1 / s) @ _rotate(params.rotate)
        g = g @ _rotate(-r) @ _scale(1 / a, a) @ _rotate(r)
        return g @ _translate(-tx, -ty)

    def __call__(self, images: torch.Tensor, rng: SeedGenerators) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, h, w = images.shape
        params = self.draw(rng, images.device)
        # Pixel blitting: flips are exact.
        images = torch.where(params.xflip.view(-1, 1, 1, 1) > 0, images.flip(3), images)
        images = torch.where(params.yflip.view(-1, 1, 1, 1) > 0, images.flip(2), images)
        if self.geometric:
            images = resample(images, self.inverse_matrix(params, h, w))
        return images, params.labels()


def _matrix(rows: list[list[torch.Tensor | float]], like: torch.Tensor) -> torch.Tensor:
    """Stack per-sample entries into ``[N, 3, 3]`` (constants filled on the device: no copy from the host)."""
    return torch.stack(
        [torch.stack([v.expand_as(like) if isinstance(v, torch.Tensor) else torch.full_like(like, v) for v in r], -1)
         for r in rows], -2
    )


def _scale(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    return _matrix([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]], sx)


def _rotate(a: torch.Tensor) -> torch.Tensor:
    c, s = a.cos(), a.sin()
    return _matrix([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], a)


def _translate(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    return _matrix([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]], tx)


# --- resampling ---------------------------------------------------------------------------------------------
def sample_margins(g_inv: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Each sample's reflection padding ``[N, 4]`` (left, right, top, bottom; whole numbers, on ``g_inv``'s
    device): what covers where its output corners come from, plus ``2 FILTER_PAD`` pixels for the filters; at
    most one image size less one (what reflection allows)."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    # G^-1 applied to the output corners (+-cx, +-cy): linear part times the signs, plus the translation.
    lin, shift = g_inv[:, :2, :2], g_inv[:, :2, 2]  # [N, 2, 2], [N, 2]
    corners = [lin[:, :, 0] * sx + lin[:, :, 1] * sy + shift for sx, sy in ((-cx, -cy), (cx, -cy), (cx, cy), (-cx, cy))]
    src = torch.stack(corners, dim=1)  # [N, 4 corners, xy]
    need = torch.cat([-src, src], dim=2).amax(dim=1)  # [N, (left, top, right, bottom)] extents
    need = need + torch.stack([need.new_full((), 2 * FILTER_PAD - cx), need.new_full((), 2 * FILTER_PAD - cy)] * 2)
    limit = torch.stack([need.new_full((), width - 1), need.new_full((), height - 1)] * 2)
    left, top, right, bottom = torch.minimum(need.clamp(min=0), limit).ceil().unbind(1)
    return torch.stack([left, right, top, bottom], dim=1)


def pad_margins(g_inv: torch.Tensor, height: int, width: int) -> tuple[int, int, int, int]:
    """The largest :func:`sample_margins` of the batch, as integers ``(left, right, top, bottom)`` (EDM's one
    margin per batch; read back to the host, for :func:`resample_batch`)."""
    left, right, top, bottom = (int(v) for v in sample_margins(g_inv, height, width).amax(dim=0).tolist())
    return left, right, top, bottom


def _depthwise(x: torch.Tensor, taps: torch.Tensor, dim: int, stride: int, padding: int) -> torch.Tensor:
    """Depthwise correlation of ``x [N, C, H, W]`` with the 1-D ``taps`` along ``dim`` (2 or 3), zero-padded."""
    c = x.shape[1]
    weight = taps.view(1, 1, -1, 1) if dim == 2 else taps.view(1, 1, 1, -1)
    strides = (stride, 1) if dim == 2 else (1, stride)
    pads = (padding, 0) if dim == 2 else (0, padding)
    return F.conv2d(x, weight.expand(c, 1, *weight.shape[2:]), stride=strides, padding=pads, groups=c)


def _sym6(like: torch.Tensor) -> torch.Tensor:
    """SYM6 in ``like``'s dtype and device (rounded from float64, not through float32)."""
    return _sym6_on(like.dtype, like.device)


@functools.lru_cache(maxsize=16)
def _sym6_on(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The filter made once per dtype and device (a copy from the host would wait for the device each call)."""
    return torch.tensor(SYM6, dtype=torch.float64).to(dtype).to(device)


def upsample2x(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``n -> 2n`` samples along ``dim``: insert a zero after every sample but the last, then convolve with
    SYM6 so that ``out[i] = sum_k h[k] z[i + 5 - k]`` (``z`` the zero-stuffed signal)."""
    n = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = 2 * n - 1
    z = x.new_zeros(shape)
    if dim == 2:
        z[:, :, ::2] = x
    else:
        z[:, :, :, ::2] = x
    taps = _sym6(x).flip(0)  # correlation with the reversed filter = convolution
    return _depthwise(z, taps, dim, stride=1, padding=len(SYM6) // 2)


def downsample2x(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``2m -> m`` samples along ``dim``: ``out[k] = sum_j h[j] x[2k + j - 5]`` (SYM6 low-pass, decimation)."""
    return _depthwise(x, _sym6(x), dim, stride=2, padding=(len(SYM6) - 1) // 2)


def sampling_grid(g_inv: torch.Tensor, offset: tuple[float, float], out_hw: tuple[int, int],
                  up_hw: tuple[int, int]) -> torch.Tensor:
    """``grid_sample`` coordinates ``[N, Ho, Wo, 2]`` (``align_corners=False``) of the 2x output canvas.

    An output pixel ``o`` of the canvas sits at ``x2 = o - (Wo - 1)/2`` (2x pixels about its centre), i.e. at
    ``x1 = (x2 + 1/2) / 2`` in input pixels; it reads the padded input at ``G^-1 x1 + offset`` (offset: the
    padding's shift of the centre), which lies at ``u = 2 (G^-1 x1 + offset) - 1/2`` on the upsampled image,
    normalised as ``2 u / W_up``. The half pixels follow the wavelet filters' alignment (EDM's pipeline).
    """
    (ho, wo), (hu, wu) = out_hw, up_hw
    dev, dt = g_inv.device, g_inv.dtype
    xs = (torch.arange(wo, device=dev, dtype=dt) - (wo - 1) / 2 + 0.5) / 2
    ys = (torch.arange(ho, device=dev, dtype=dt) - (ho - 1) / 2 + 0.5) / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # [Ho, Wo]
    # G^-1 (gx, gy, 1) written out elementwise: a batched matrix product would round differently by batch size.
    g = g_inv[:, :2, :, None, None]  # [N, 2, 3, 1, 1]
    src = [g[:, i, 0] * gx + g[:, i, 1] * gy + g[:, i, 2] for i in (0, 1)]  # [N, Ho, Wo] each
    u = [2 * (src[i] + offset[i]) - 0.5 for i in (0, 1)]
    return torch.stack([u[0] / (wu / 2), u[1] / (hu / 2)], dim=-1)


def resample(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """Apply an affine map per sample: ``out(x) = images(G^-1 x)``, ``x`` in pixel units about the centre.

    ``images``: ``[N, C, H, W]``; ``g_inv``: ``[N, 3, 3]``. Each sample with its own margin (module docstring):
    the result of :func:`resample_batch` on that sample alone, computed for the whole batch at once with shapes
    that depend on the image size only. The canvas is reflect-padded by the most reflection allows (``W - 1``,
    ``H - 1``) and everything outside a sample's own margin is zeroed, before the 2x upsampling (the zero
    border its filters see) and after it (where the bilinear step finds zeros); so the values are those of a
    canvas cut to that margin up to the rounding of the bilinear coordinates, which are measured on the larger
    canvas: in float32 a few 1e-6 at 8x8 to ~1e-5 at 32x32 from cutting the canvas per sample, the size of
    either way's own error against float64. No value is read back to the host.
    """
    _, _, h, w = images.shape
    g_inv = g_inv.to(images.dtype)
    mx, my = w - 1, h - 1
    left, right, top, bottom = sample_margins(g_inv, h, w).unbind(1)  # [N] each
    x = F.pad(images, [mx, mx, my, my], mode="reflect")
    cols = torch.arange(-mx, w + mx, device=images.device, dtype=images.dtype)  # input pixel of each column
    rows = torch.arange(-my, h + my, device=images.device, dtype=images.dtype)
    keep_cols = (cols >= -left[:, None]) & (cols < w + right[:, None])  # [N, W + 2 mx]
    keep_rows = (rows >= -top[:, None]) & (rows < h + bottom[:, None])
    x = torch.where(keep_rows[:, None, :, None] & keep_cols[:, None, None, :], x, 0)
    x = upsample2x(upsample2x(x, 3), 2)
    # Upsampled sample 2j + t (t = 0, 1) belongs to canvas pixel j: keep what lies within the sample's canvas.
    keep_cols = keep_cols[:, :, None].expand(-1, -1, 2).flatten(1)
    keep_rows = keep_rows[:, :, None].expand(-1, -1, 2).flatten(1)
    x = torch.where(keep_rows[:, None, :, None] & keep_cols[:, None, None, :], x, 0)
    out_hw = (2 * (h + 2 * FILTER_PAD), 2 * (w + 2 * FILTER_PAD))
    grid = sampling_grid(g_inv, (0.0, 0.0), out_hw, x.shape[2:])  # the padded canvas is centred on the image
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = downsample2x(x, 3)[:, :, :, FILTER_PAD:-FILTER_PAD]
    return downsample2x(x, 2)[:, :, FILTER_PAD:-FILTER_PAD, :]


def resample_batch(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """:func:`resample` with one margin for the batch (EDM's way): reflect-pad (:func:`pad_margins`), upsample
    2x with SYM6, sample bilinearly (zeros outside), SYM6 low-pass and decimate, crop back to ``H x W``."""
    n, c, h, w = images.shape
    g_inv = g_inv.to(images.dtype)
    left, right, top, bottom = pad_margins(g_inv, h, w)
    x = F.pad(images, [left, right, top, bottom], mode="reflect")
    x = upsample2x(upsample2x(x, 3), 2)  # [N, C, 2 (H + top + bottom), 2 (W + left + right)]
    out_hw = (2 * (h + 2 * FILTER_PAD), 2 * (w + 2 * FILTER_PAD))
    grid = sampling_grid(g_inv, ((left - right) / 2, (top - bottom) / 2), out_hw, x.shape[2:])
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = downsample2x(x, 3)[:, :, :, FILTER_PAD:-FILTER_PAD]
    return downsample2x(x, 2)[:, :, FILTER_PAD:-FILTER_PAD, :]
