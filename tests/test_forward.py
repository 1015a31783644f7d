"""Properties of the relay forward process (docs/math.md §2-4, 6c)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

from relay_diffusion.core import blur as forward
from relay_diffusion.core.rng import SeedGenerators


@pytest.mark.parametrize("p,h,w", [(1, 3, 5), (2, 8, 8), (3, 9, 12), (4, 16, 8), (8, 16, 24)])
def test_idct_inverts_dct(p, h, w):
    x = torch.randn(2, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(p))
    torch.testing.assert_close(forward.idct(forward.dct(x, p), p), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(forward.dct(forward.idct(x, p), p), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("p", [2, 3, 4, 5])
def test_dct_matches_scipy_per_patch(p):
    x = torch.randn(1, 2, 2 * p, 3 * p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = forward.dct(x, p).numpy()
    for i in range(0, 2 * p, p):
        for j in range(0, 3 * p, p):
            patch = x[..., i : i + p, j : j + p].numpy()
            want = scipy.fft.dctn(patch, type=2, norm="ortho", axes=(-2, -1))
            np.testing.assert_allclose(got[..., i : i + p, j : j + p], want, rtol=0, atol=1e-12)
    c = forward.dct_matrix(p).numpy()
    np.testing.assert_allclose(c, scipy.fft.dct(np.eye(p), type=2, norm="ortho", axis=0), atol=1e-14)


def test_dct_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not divisible by the relay factor 4"):
        forward.dct(torch.zeros(1, 1, 10, 8), 4)


def test_blur_zero_is_identity_and_infinite_blur_is_patch_mean():
    p = 4
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(forward.blur(x, 0.0, p), x, rtol=0, atol=1e-12)
    # At infinite strength every non-DC coefficient keeps only min_scale.
    mean = torch.nn.functional.avg_pool2d(x, p).repeat_interleave(p, -2).repeat_interleave(p, -1)
    ms = forward.MIN_SCALE
    torch.testing.assert_close(forward.blur(x, 1e4, p), mean + ms * (x - mean), rtol=0, atol=1e-12)


def test_blur_per_sample_strength():
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    b = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64).reshape(3, 1, 1, 1)
    out = forward.blur(x, b, 4)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], forward.blur(x[i : i + 1], float(b[i]), 4))


def test_blur_schedule_monotone_in_t():
    # Until tau(t) reaches 1 (the end of the schedule), more noise means more blur: every factor decreases.
    for truncation_t, bsm in [(0.93, 3.0), (1.05, 2.0)]:
        t = torch.logspace(math.log10(0.002), math.log10(80.0), 400, dtype=torch.float64)
        tau = forward.normal_cdf((t.log() - forward.P_MEAN) / forward.P_STD) / truncation_t
        t = t[tau <= 1]
        a = forward.blur_schedule(t, 4, bsm, truncation_t)  # [T, p, 1, p]
        diffs = a[1:] - a[:-1]
        assert (diffs <= 1e-15).all()
        assert (diffs[..., 1:] < 0).any()  # and it really moves
        assert torch.equal(a[..., 0, 0, 0], torch.ones_like(a[..., 0, 0, 0])), "the patch mean (DC) is never blurred"


@pytest.mark.parametrize("p", [2, 4])
def test_block_noise_unit_variance_and_local_correlation(p):
    n, size = 4000, 4 * p
    eps = SeedGenerators(range(n)).randn([1, size, size], dtype=torch.float64)
    b = forward.block_noise(eps, p)[:, 0]  # [n, size, size]
    assert abs(b.var(dim=0).mean().item() - 1) < 6 * math.sqrt(2 / n)
    # Correlation at offset (dy, dx), pooled over all pixels (circular): (p-|dy|)(p-|dx|)/p^2 inside p, else 0.
    for dy in range(0, p + 2):
        for dx in range(0, p + 2):
            corr = (b * torch.roll(b, shifts=(dy, dx), dims=(1, 2))).mean().item()
            want = max(p - dy, 0) * max(p - dx, 0) / p**2
            assert abs(corr - want) < 6 * math.sqrt(2 / n), (dy, dx, corr, want)
