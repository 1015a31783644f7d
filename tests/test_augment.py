"""The augmentation pipeline: EDM's Symlet-6 resampling and 9-label layout.

The geometric transform for given parameters is checked against an independent float64 computation (NumPy
convolutions and ``scipy.ndimage.map_coordinates`` with EDM's chain of coordinate matrices), against the
analytic transform of a smooth image, and against exact cases (integer shifts, identity, quarter turns).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.training.augment import SYM6, AugmentParams, AugmentPipe, resample, resample_batch

H = W = 20


def smooth_image(h: int = H, w: int = W, channels: int = 3) -> tuple[np.ndarray, callable]:
    """A band-limited image and the function it samples, ``f(x, y)`` in pixel units about the centre."""
    def f(x, y):
        return np.stack([np.sin(0.3 * x + 0.2 * y + c) + 0.5 * np.cos(0.15 * x - 0.25 * y - c)
                         for c in range(channels)])

    cy, cx = (h - 1) / 2, (w - 1) / 2
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return f(xx - cx, yy - cy), f


def params(n: int, **values) -> AugmentParams:
    z = torch.zeros(n, dtype=torch.float64)
    p = dict(xflip=z, yflip=z, scale=z, rotate=z, aniso=z, aniso_angle=z, translate=torch.zeros(n, 2, dtype=z.dtype))
    p.update({k: torch.as_tensor(v, dtype=torch.float64) for k, v in values.items()})
    return AugmentParams(**p)


# --- an independent float64 implementation of EDM's geometric step -------------------------------------------
def _mat_scale(sx, sy):
    return np.array([[sx, 0, 0], [0, sy, 0], [0, 0, 1.0]])


def _mat_translate(tx, ty):
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]])


def reference_resample(image: np.ndarray, g_inv: np.ndarray, margins) -> np.ndarray:
    """One image ``[C, H, W]``: reflect-pad, zero-stuff and convolve with sym6 per axis, bilinear sampling
    (zeros outside) on EDM's coordinate chain, sym6 low-pass, decimate, crop."""
    h_filt = np.asarray(SYM6)
    c, h, w = image.shape
    left, right, top, bottom = margins
    x = np.pad(image, ((0, 0), (top, bottom), (left, right)), mode="reflect")

    def up(a, axis):
        def one(v):
            z = np.zeros(2 * len(v) - 1)
            z[::2] = v
            return np.convolve(z, h_filt)[5:5 + 2 * len(v)]
        return np.apply_along_axis(one, axis, a)

    def down(a, axis):
        return np.apply_along_axis(lambda v: np.convolve(v, h_filt[::-1])[6:6 + len(v):2], axis, a)

    x = up(up(x, 2), 1)
    hu, wu = x.shape[1:]
    ho, wo = 2 * (h + 6), 2 * (w + 6)
    # EDM's chain: shift to the padded centre, then conjugate by the 2x scale and the half-pixel shift.
    g = _mat_translate((left - right) / 2, (top - bottom) / 2) @ g_inv
    g = _mat_scale(2, 2) @ g @ _mat_scale(0.5, 0.5)
    g = _mat_translate(-0.5, -0.5) @ g @ _mat_translate(0.5, 0.5)
    oy, ox = np.mgrid[0:ho, 0:wo].astype(np.float64)
    pts = np.stack([ox - (wo - 1) / 2, oy - (ho - 1) / 2, np.ones_like(ox)])  # centred canvas coordinates
    src = np.einsum("ij,jhw->ihw", g, pts)
    cols, rows = src[0] + (wu - 1) / 2, src[1] + (hu - 1) / 2
    sampled = np.stack([ndimage.map_coordinates(ch, [rows, cols], order=1, mode="grid-constant", cval=0.0,
                                                prefilter=False) for ch in x])
    out = down(down(sampled, 2), 1)
    return out[:, 3:-3, 3:-3]


def reference_margins(g_inv: np.ndarray, h: int, w: int):
    """Reflection needed for the output corners plus 6 pixels, clipped to the image size less one."""
    cx, cy = (w - 1) / 2, (h - 1) / 2
    corners = np.array([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]]).T
    src = np.concatenate([g @ corners for g in g_inv], axis=1)[:2]
    left = np.clip(np.max(-src[0]) - cx + 6, 0, w - 1)
    right = np.clip(np.max(src[0]) - cx + 6, 0, w - 1)
    top = np.clip(np.max(-src[1]) - cy + 6, 0, h - 1)
    bottom = np.clip(np.max(src[1]) - cy + 6, 0, h - 1)
    return tuple(int(math.ceil(v)) for v in (left, right, top, bottom))


# --- tests --------------------------------------------------------------------------------------------------
def test_sym6_is_the_orthonormal_symlet():
    h = np.asarray(SYM6)
    assert len(h) == 12 and h.sum() == pytest.approx(math.sqrt(2), abs=1e-12)
    for m in range(6):  # sum_k h[k] h[k + 2m] = [m == 0]: upsampling then downsampling is the identity
        assert float(h[: 12 - 2 * m] @ h[2 * m:]) == pytest.approx(float(m == 0), abs=1e-12)


def test_sym6_matches_pywavelets():
    pywt = pytest.importorskip("pywt")
    np.testing.assert_allclose(SYM6, pywt.Wavelet("sym6").dec_lo, atol=1e-15)


@pytest.mark.parametrize("case", ["mixed", "zoom_out", "rotate_translate"])
def test_geometric_transform_matches_an_independent_computation(case):
    pipe = AugmentPipe(scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    p = {
        "mixed": params(2, scale=[0.7, -0.4], rotate=[0.3, -2.1], aniso=[-0.8, 1.2], aniso_angle=[0.7, 0.0],
                        translate=[[0.3, -0.2], [-0.6, 0.1]]),
        "zoom_out": params(1, scale=[-2.5], rotate=[0.1]),  # reveals more than reflection covers: zeros
        "rotate_translate": params(1, rotate=[math.pi / 5], translate=[[1.5, 0.8]]),
    }[case]
    g_inv = pipe.inverse_matrix(p, H, W)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(len(g_inv), 3, H, W))
    # Each sample with its own margin (resample), and all with the batch's largest (EDM's resample_batch).
    own = np.stack([reference_resample(img, g.numpy(), reference_margins(g[None].numpy(), H, W))
                    for img, g in zip(images, g_inv)])
    margins = reference_margins(g_inv.numpy(), H, W)
    shared = np.stack([reference_resample(img, g.numpy(), margins) for img, g in zip(images, g_inv)])
    np.testing.assert_allclose(resample(torch.from_numpy(images), g_inv).numpy(), own, rtol=0, atol=1e-10)
    np.testing.assert_allclose(resample_batch(torch.from_numpy(images), g_inv).numpy(), shared, rtol=0, atol=1e-10)
    got32 = resample(torch.from_numpy(images).float(), g_inv.float()).numpy()
    np.testing.assert_allclose(got32, own, rtol=0, atol=2e-5)


def test_inverse_matrix_is_edm_composition():
    """``G^-1 = S(1/s) R(theta) R(-r) S(1/a, a) R(r) T(-t)`` in pixels about the centre, x right, y down."""
    pipe = AugmentPipe(scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    p = params(1, scale=[0.9], rotate=[0.4], aniso=[-0.5], aniso_angle=[1.1], translate=[[0.2, -0.7]])
    s, a, th, r = 2 ** (0.9 * 0.2), 2 ** (-0.5 * 0.2), 0.4, 1.1

    def rot(t):
        return np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])

    forward = (_mat_translate(0.2 * W * 0.125, -0.7 * H * 0.125) @ rot(-r) @ _mat_scale(a, 1 / a) @ rot(r)
               @ rot(-th) @ _mat_scale(s, s))  # where the content of input point p ends up
    np.testing.assert_allclose(pipe.inverse_matrix(p, H, W)[0].numpy(), np.linalg.inv(forward), atol=1e-12)


def test_labels_describe_the_transform_of_a_smooth_image():
    """Decode scale, rotation and translation from the 9 labels and compare the augmented image with the
    smooth function it samples, evaluated where the inverse transform sends each pixel (interior only)."""
    size = 32
    image, f = smooth_image(size, size)
    pipe = AugmentPipe(scale=1, rotate_frac=1, translate_frac=1, translate_frac_std=0.05)
    n = 8
    out, labels = pipe(torch.from_numpy(np.repeat(image[None], n, 0)).float(), SeedGenerators(range(100, 100 + n)))
    assert labels.shape == (n, 9) and not labels[:, [0, 1, 5, 6]].any()
    cy = cx = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    errors = []
    for i in range(n):
        lab = labels[i].double().numpy()
        s, th = 2 ** (0.2 * lab[2]), math.atan2(lab[4], 1 + lab[3])
        t = (lab[7] * size * 0.05, lab[8] * size * 0.05)
        c, sn = math.cos(th), math.sin(th)
        forward = _mat_translate(*t) @ np.array([[c, sn, 0], [-sn, c, 0], [0, 0, 1]]) @ _mat_scale(s, s)
        src = np.einsum("ij,jhw->ihw", np.linalg.inv(forward), np.stack([xx - cx, yy - cy, np.ones_like(xx)]))
        inside = (np.abs(src[0]) < cx - 7) & (np.abs(src[1]) < cy - 7)  # beyond the filters' reach of borders
        assert inside.sum() > 50
        err = np.abs(out[i].numpy() - f(src[0], src[1]))[:, inside]
        errors.append(err.max())
    # Without rotation only the 2x bilinear step errs (< 0.01 here). Rotations move the content by up to
    # ~0.1 pixel (sym6 is not linear-phase; EDM's pipeline does the same), ~0.05 on this image; a misplaced
    # centre or half-pixel alignment would err by > 0.15.
    assert max(errors) < 0.06, errors


def test_exact_cases():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(1, 3, H, W)))
    pipe = AugmentPipe(translate_frac=1, translate_frac_std=0.1)
    # The identity: sym6 up then down is exact (orthonormal), borders included.
    out = resample(x, pipe.inverse_matrix(params(1), H, W))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-10)
    # An integer translation by (1, 2) pixels moves every interior pixel exactly.
    out = resample(x, pipe.inverse_matrix(params(1, translate=[[1 / (W * 0.1), 2 / (H * 0.1)]]), H, W))
    torch.testing.assert_close(out[..., 2:, 1:], x[..., :-2, :-1], rtol=0, atol=1e-10)
    # A quarter turn matches rot90 up to the filter's slight asymmetry.
    smooth = torch.from_numpy(smooth_image()[0])[None]
    out = resample(smooth, AugmentPipe(rotate_frac=1).inverse_matrix(params(1, rotate=[math.pi / 2]), H, W))
    assert float((out - torch.rot90(smooth, 1, (2, 3))).abs().max()) < 0.05


def test_pipe_runs_the_geometric_step_for_the_whole_batch_like_edm():
    x = torch.from_numpy(smooth_image()[0]).float()[None].repeat(4, 1, 1, 1)
    pipe = AugmentPipe.edm_preset(0.5)
    rng = SeedGenerators(range(4))
    out, labels = pipe(x, rng)
    p = pipe.draw(SeedGenerators(range(4)), x.device)
    flipped = torch.where(p.xflip.view(-1, 1, 1, 1) > 0, x.flip(3), x)
    flipped = torch.where(p.yflip.view(-1, 1, 1, 1) > 0, flipped.flip(2), flipped)
    torch.testing.assert_close(out, resample(flipped, pipe.inverse_matrix(p, H, W)), rtol=0, atol=0)
    assert torch.equal(labels, p.labels())
    assert AugmentPipe.edm_preset(0.0)(x, rng)[0] is x or torch.equal(AugmentPipe.edm_preset(0.0)(x, rng)[0], x)


def test_a_sample_does_not_depend_on_its_batch():
    x = torch.from_numpy(smooth_image()[0]).float()[None].repeat(6, 1, 1, 1) * torch.linspace(0.5, 1, 6).view(-1, 1, 1, 1)
    pipe = AugmentPipe.edm_preset(1.0)
    out, labels = pipe(x, SeedGenerators(range(6)))
    for i in range(6):
        alone, lab = pipe(x[i:i + 1], SeedGenerators([i]))
        assert torch.equal(alone, out[i:i + 1]) and torch.equal(lab, labels[i:i + 1])


def test_the_batch_is_resampled_on_the_device_like_each_sample_alone():
    """:func:`resample` does the whole batch at once with shapes fixed by the image size and reads nothing back
    to the host; each sample comes out as :func:`resample_batch` makes it alone (its own margin): to float64
    rounding, and to float32 rounding (the bilinear coordinates are measured on a larger canvas)."""
    from sync_audit import HostSyncAudit

    pipe = AugmentPipe.edm_preset(1.0)
    rng = np.random.default_rng(2)
    for size in (8, 20):
        p = pipe.draw(SeedGenerators(range(16)), torch.device("cpu"))
        g_inv = pipe.inverse_matrix(p, size, size).double()
        images = torch.from_numpy(rng.uniform(-1, 1, size=(16, 3, size, size)))
        alone = torch.cat([resample_batch(images[i:i + 1], g_inv[i:i + 1]) for i in range(16)])
        resample(images[:1].float(), g_inv[:1].float())  # the filter is made once per dtype and device
        with HostSyncAudit() as audit:
            out64 = resample(images, g_inv)
            out32 = resample(images.float(), g_inv.float())
        assert not audit.counts, audit.counts
        torch.testing.assert_close(out64, alone, rtol=0, atol=1e-12)
        error = (out32.double() - alone).abs()
        assert float(error.max()) < 2e-5 and float(error.mean()) < 2e-6
