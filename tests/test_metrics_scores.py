"""The metric formulas (docs/math.md §11) against closed forms, scipy and brute-force implementations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch

from relay_diffusion.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    knn_radii,
    precision_recall,
    trace_sqrt_product,
)


def _random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def _fid_scipy(mu1, s1, mu2, s2) -> float:
    """The reference's formula: scipy.linalg.sqrtm of the product, real part of the trace."""
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.real(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)))


# ----------------------------------------------------------------------------------------------- FID

def test_fid_closed_form_for_diagonal_gaussians():
    # commuting covariances: tr sqrt(S1 S2) = sum sqrt(a_i b_i), so FID = |m1-m2|^2 + sum (sqrt a - sqrt b)^2
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    m1, m2 = rng.standard_normal(16), rng.standard_normal(16)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fid_closed_form_for_scaled_covariance():
    # S2 = c^2 S1: tr sqrt(S1 S2) = c tr S1, so FID = |dm|^2 + (1 - c)^2 tr S1
    rng = np.random.default_rng(1)
    s1 = _random_spd(rng, 32)
    m1, m2 = rng.standard_normal(32), rng.standard_normal(32)
    expected = np.sum((m1 - m2) ** 2) + (1 - 1.7) ** 2 * np.trace(s1)
    assert frechet_distance(m1, s1, m2, 1.7 ** 2 * s1) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("rank", [None, 10])  # full rank (Cholesky path) and singular (eigh path)
def test_trace_sqrt_product_matches_scipy_sqrtm(rank):
    rng = np.random.default_rng(2)
    s1, s2 = _random_spd(rng, 48, rank), _random_spd(rng, 48)
    expected = np.real(np.trace(scipy.linalg.sqrtm(s1 @ s2)))
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-7)


def test_fid_from_features_matches_scipy_and_is_zero_for_identical_sets():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 24)).astype(np.float32)
    y = (rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24)) * 0.3 + 0.5).astype(np.float32)
    mu1, s1 = feature_statistics(x, block=64)
    mu2, s2 = feature_statistics(y, block=1000)
    np.testing.assert_allclose(mu1, x.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(s1, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fid_scipy(mu1, s1, mu2, s2), rel=1e-8)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_fid_of_samples_approaches_the_gaussian_closed_form():
    rng = np.random.default_rng(4)
    d, n = 4, 200_000
    a, b = np.array([1.0, 2.0, 0.5, 1.5]), np.array([2.0, 1.0, 1.0, 0.5])
    m2 = np.array([1.0, 0, 0, -1])
    x = rng.standard_normal((n, d)) * np.sqrt(a)
    y = rng.standard_normal((n, d)) * np.sqrt(b) + m2
    expected = np.sum(m2 ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(*feature_statistics(x), *feature_statistics(y)) == pytest.approx(expected, abs=0.03)


def test_fid_rejects_statistics_of_different_dimensions():
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ------------------------------------------------------------------------------------------------ IS

def _is_direct(logits: np.ndarray, split: int) -> list[float]:
    """The reference's loop: exp / sum exp softmax, KL against the split's marginal."""
    out = []
    for i in range(0, len(logits), split):
        part = np.exp(logits[i:i + split]) / np.exp(logits[i:i + split]).sum(1, keepdims=True)
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        out.append(np.exp(np.mean(np.sum(kl, 1))))
    return out


def test_inception_score_matches_direct_formula_with_splits():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((1050, 20)) * 3
    direct = _is_direct(logits, 250)  # 5 splits, the last one short
    mean, std = inception_score(logits, split_size=250)
    assert mean == pytest.approx(np.mean(direct), rel=1e-10)
    assert std == pytest.approx(np.std(direct), rel=1e-8)


def test_inception_score_limits_and_stability():
    assert inception_score(np.zeros((100, 10)))[0] == pytest.approx(1.0)
    one_hot = np.eye(10)[np.arange(100) % 10] * 1e4  # huge logits: a naive exp overflows
    assert inception_score(one_hot)[0] == pytest.approx(10.0, rel=1e-9)
    assert np.isfinite(inception_score(torch.randn(64, 8, dtype=torch.float32) * 500)[0])


# ----------------------------------------------------------------------------------------------- P/R

def _pr_brute(ref: np.ndarray, smp: np.ndarray, k: int) -> tuple[float, float]:
    d_rr = ((ref[:, None] - ref[None]) ** 2).sum(-1)
    d_ss = ((smp[:, None] - smp[None]) ** 2).sum(-1)
    d_sr = ((smp[:, None] - ref[None]) ** 2).sum(-1)
    r_ref, r_smp = np.sort(d_rr, 1)[:, k], np.sort(d_ss, 1)[:, k]
    precision = np.mean([(d_sr[i] <= r_ref).any() for i in range(len(smp))])
    recall = np.mean([(d_sr[:, j] <= r_smp).any() for j in range(len(ref))])
    return precision, recall


@pytest.mark.parametrize("k, block", [(3, 7), (3, 4096), (1, 16), (5, 9)])
def test_precision_recall_match_brute_force(k, block):
    rng = np.random.default_rng(6)
    ref = rng.standard_normal((60, 6))
    smp = rng.standard_normal((45, 6)) * 1.3 + 0.4
    expected = _pr_brute(ref, smp, k)
    assert precision_recall(ref, smp, k=k, block=block) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a non-trivial case


def test_knn_radii_match_brute_force_and_identical_sets_give_full_precision_recall():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((50, 5)).astype(np.float32)
    d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.testing.assert_allclose(knn_radii(x, k=3, block=8).numpy(), np.sort(d, 1)[:, 3], rtol=1e-6, atol=1e-6)
    assert precision_recall(x, x, k=3, block=16) == (1.0, 1.0)


def test_precision_recall_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))


# ----------------------------------------------------------------------------------------------- KID

def _kid_torch_fidelity(f1: np.ndarray, f2: np.ndarray, subsets: int, size: int, seed: int) -> tuple[float, float]:
    """torch-fidelity's KID (metric_kid.kid_features_to_metric with its defaults: polynomial kernel of
    degree 3, gamma = 1/D, coef0 = 1, unbiased MMD^2), written out here because torch-fidelity depends on
    torchvision, which is not installable beside this project's torch build."""
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = f1[rng.choice(len(f1), size, replace=False)]
        y = f2[rng.choice(len(f2), size, replace=False)]
        def kernel(a, b):
            return (a @ b.T / a.shape[1] + 1) ** 3
        k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
        m = size
        mmds[i] = ((k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy))) / (m * (m - 1)) \
            - 2 * k_xy.sum() / (m * m)
    return float(mmds.mean()), float(mmds.std())


def test_kid_matches_torch_fidelity_formula():
    rng = np.random.default_rng(8)
    f1 = rng.standard_normal((120, 16))
    f2 = rng.standard_normal((90, 16)) * 1.2 + 0.1
    expected = _kid_torch_fidelity(f1, f2, subsets=7, size=40, seed=2020)
    got = kernel_inception_distance(f1, f2, subsets=7, subset_size=40, seed=2020, dtype=torch.float64)
    assert got == pytest.approx(expected, rel=1e-10)
    assert got[0] > 0
    # float32 kernels (the default, as torch-fidelity on float32 features) agree closely
    assert kernel_inception_distance(f1, f2, subsets=7, subset_size=40)[0] == pytest.approx(expected[0], rel=1e-4)


def test_kid_uses_only_its_own_generator():
    rng = np.random.default_rng(9)
    f1, f2 = rng.standard_normal((50, 4)), rng.standard_normal((50, 4))
    np.random.seed(1)
    a = kernel_inception_distance(f1, f2, subsets=3, subset_size=20)
    state = np.random.get_state()[1].copy()
    b = kernel_inception_distance(f1, f2, subsets=3, subset_size=20)
    assert a == b and np.array_equal(state, np.random.get_state()[1])
    assert kernel_inception_distance(f1, f2, subsets=3, subset_size=20, seed=5) != a


def test_kid_subset_larger_than_the_set_is_a_clear_error():
    with pytest.raises(ValueError, match="kid-subset-size"):
        kernel_inception_distance(np.zeros((10, 3)), np.zeros((30, 3)), subset_size=20)
