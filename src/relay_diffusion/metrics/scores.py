"""The metrics themselves, as pure functions of feature arrays (docs/math.md §11).

Inputs are numpy arrays or tensors of shape [N, D] (any float dtype); work happens in float64 on
``device`` in blocks of rows, so that 50k x 50k precision/recall stays within a few GB. Randomness
(KID subsets) comes from a generator seeded by the caller, never from the global RNG.
"""

from __future__ import annotations

import math
from typing import Union

import numpy as np
import scipy.linalg
import scipy.linalg.lapack
import torch

Array = Union[np.ndarray, torch.Tensor]
DEFAULT_BLOCK = 4096  # rows per block: a 4096 x 4096 float64 distance block is 128 MB


def _rows(x: Array, start: int, stop: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, stop) of ``x`` as a tensor on ``device`` (no copy of the whole array)."""
    part = x[start:stop]
    part = torch.from_numpy(np.ascontiguousarray(part)) if isinstance(part, np.ndarray) else part
    return part.to(device=device, dtype=dtype)


def _check_features(x: Array, name: str, min_rows: int = 1) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name}: expected features [N, D], got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} rows, got {x.shape[0]}")


# ----------------------------------------------------------------------------------------------
# FID / sFID

def feature_statistics(feat: Array, block: int = DEFAULT_BLOCK,
                       device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of ``feat`` [N, D], in float64 (two passes: the mean,
    then centred products, which avoids the cancellation of sum(x x^T) - N mu mu^T)."""
    _check_features(feat, "features", min_rows=2)
    n, d = feat.shape
    total = torch.zeros(d, dtype=torch.float64, device=device)
    for i in range(0, n, block):
        total += _rows(feat, i, i + block, device, torch.float64).sum(0)
    mu = total / n
    sigma = torch.zeros(d, d, dtype=torch.float64, device=device)
    for i in range(0, n, block):
        x = _rows(feat, i, i + block, device, torch.float64) - mu
        sigma.addmm_(x.T, x)
    sigma /= n - 1
    return mu.cpu().numpy(), sigma.cpu().numpy()


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrtm(sigma1 @ sigma2) for symmetric positive semi-definite sigma1, sigma2 (float64).

    Exact method without a general matrix square root: the trace is the sum of the square roots of
    the eigenvalues of sigma1 sigma2, which are those of the symmetric PSD matrix B^T sigma2 B for
    any factor sigma1 = B B^T (plus zeros). B comes from LAPACK's pivoted Cholesky (``dpstrf``),
    which also finds the rank r of sigma1 (r < D when there are fewer images than dimensions), so
    one r x r symmetric eigenvalue solve replaces scipy.linalg.sqrtm's Schur-form square root of a
    non-symmetric D x D matrix (about 10x slower at D = 2048, and complex when the product is
    singular). Eigenvalues that rounding makes slightly negative are clipped to 0.
    """
    s1 = np.asarray(sigma1, dtype=np.float64)
    s2 = np.asarray(sigma2, dtype=np.float64)
    c, piv, rank, info = scipy.linalg.lapack.dpstrf((s1 + s1.T) / 2, lower=1)
    if info < 0:
        raise ValueError(f"pivoted Cholesky failed (LAPACK dpstrf info {info})")
    factor = np.zeros((s1.shape[0], rank))
    factor[piv - 1] = np.tril(c)[:, :rank]  # sigma1 = P L L^T P^T, factor = P L
    m = factor.T @ s2 @ factor
    ev = scipy.linalg.eigh((m + m.T) / 2, eigvals_only=True, driver="evd")
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) (Heusel et al. 2017)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    tr = np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + tr)


# ----------------------------------------------------------------------------------------------
# Inception score

def inception_score(logits: Array, split_size: int = 5000) -> tuple[float, float]:
    """Mean and standard deviation over splits of exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016).

    ``logits`` [N, C]; splits are consecutive runs of ``split_size`` images (the last may be
    shorter), as the reference. Softmax and the marginal p(y) are taken in log space (log_softmax,
    logsumexp) in float64, so large logits neither overflow nor give log(0).
    """
    _check_features(logits, "logits")
    if split_size < 1:
        raise ValueError(f"split_size must be positive, got {split_size}")
    scores = []
    for i in range(0, logits.shape[0], split_size):
        logp = torch.log_softmax(_rows(logits, i, i + split_size, "cpu", torch.float64), dim=1)
        log_py = torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])
        kl = (logp.exp() * (logp - log_py)).sum(1).mean()
        scores.append(math.exp(kl.item()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------
# Precision / recall (Kynkaanniemi et al. 2019)

def _sq_norms(x: Array, block: int, device, dtype) -> torch.Tensor:
    return torch.cat([_rows(x, i, i + block, device, dtype).square().sum(1) for i in range(0, x.shape[0], block)])


def _sq_dists(a: torch.Tensor, a2: torch.Tensor, b: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)] from the norm expansion, clamped at 0."""
    return (a2[:, None] - 2 * (a @ b.T) + b2[None, :]).clamp_(min=0)


def knn_radii(feat: Array, k: int = 3, block: int = DEFAULT_BLOCK, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Squared distance of every row of ``feat`` to its k-th nearest neighbour in ``feat`` (the point
    itself counts as the 0-th), [N]. Computed block by block, keeping the k + 1 smallest per row."""
    _check_features(feat, "features", min_rows=k + 1)
    n = feat.shape[0]
    norms = _sq_norms(feat, block, device, dtype)
    radii = torch.empty(n, dtype=dtype, device=device)
    for i in range(0, n, block):
        rows = _rows(feat, i, i + block, device, dtype)
        best = torch.full((rows.shape[0], k + 1), math.inf, dtype=dtype, device=device)
        for j in range(0, n, block):
            d = _sq_dists(rows, norms[i:i + block], _rows(feat, j, j + block, device, dtype), norms[j:j + block])
            best = torch.cat([best, d], 1).topk(k + 1, dim=1, largest=False).values
        radii[i:i + block] = best[:, k]
    return radii


def precision_recall(ref_feat: Array, sample_feat: Array, k: int = 3, block: int = DEFAULT_BLOCK,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    """Improved precision and recall with k-NN manifolds.

    precision = share of samples within the k-NN ball of some reference point;
    recall = share of reference points within the k-NN ball of some sample. Distances are compared
    squared (as the reference); memory is O(block^2), independent of N.
    """
    _check_features(ref_feat, "reference features", min_rows=k + 1)
    _check_features(sample_feat, "sample features", min_rows=k + 1)
    if ref_feat.shape[1] != sample_feat.shape[1]:
        raise ValueError(f"feature dimensions differ: reference {ref_feat.shape[1]}, sample {sample_feat.shape[1]}")
    r_ref = knn_radii(ref_feat, k, block, device, dtype)
    r_smp = knn_radii(sample_feat, k, block, device, dtype)
    n_ref2 = _sq_norms(ref_feat, block, device, dtype)
    n_smp2 = _sq_norms(sample_feat, block, device, dtype)
    sample_in = torch.zeros(sample_feat.shape[0], dtype=torch.bool, device=device)
    ref_in = torch.zeros(ref_feat.shape[0], dtype=torch.bool, device=device)
    for i in range(0, sample_feat.shape[0], block):
        smp = _rows(sample_feat, i, i + block, device, dtype)
        for j in range(0, ref_feat.shape[0], block):
            d = _sq_dists(smp, n_smp2[i:i + block], _rows(ref_feat, j, j + block, device, dtype), n_ref2[j:j + block])
            sample_in[i:i + block] |= (d <= r_ref[None, j:j + block]).any(1)
            ref_in[j:j + block] |= (d <= r_smp[i:i + block, None]).any(0)
    return sample_in.double().mean().item(), ref_in.double().mean().item()


# ----------------------------------------------------------------------------------------------
# Kernel inception distance (Binkowski et al. 2018), as torch-fidelity computes it

def kernel_inception_distance(feat1: Array, feat2: Array, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 2020, degree: int = 3, gamma: float | None = None, coef0: float = 1.0,
                              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """Mean and standard deviation over ``subsets`` random subsets of the unbiased MMD^2 with the
    polynomial kernel k(x, y) = (gamma x.y + coef0)^degree, gamma = 1 / D by default.

    Subsets are drawn without replacement by ``numpy.random.RandomState(seed).choice``, in the order
    torch-fidelity draws them (same seed, same subsets). Kernel matrices are computed in ``dtype``
    (float32, as torch-fidelity does for float32 features: the matrix products are the cost, 3 per
    subset) and summed in float64.
    """
    _check_features(feat1, "first features", min_rows=2)
    _check_features(feat2, "second features", min_rows=2)
    if feat1.shape[1] != feat2.shape[1]:
        raise ValueError(f"feature dimensions differ: {feat1.shape[1]} vs {feat2.shape[1]}")
    n1, n2, d = feat1.shape[0], feat2.shape[0], feat1.shape[1]
    if subset_size > min(n1, n2) or subset_size < 2:
        raise ValueError(f"KID subset size {subset_size} must be in [2, {min(n1, n2)}] "
                         f"(the smaller feature set has {min(n1, n2)} rows); lower --kid-subset-size")
    g = 1.0 / d if gamma is None else gamma
    m = subset_size
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.T * g + coef0) ** degree

    for s in range(subsets):
        x = _gather(feat1, rng.choice(n1, m, replace=False), device, dtype)
        y = _gather(feat2, rng.choice(n2, m, replace=False), device, dtype)
        sums = {}
        for name, (a, b) in {"xx": (x, x), "yy": (y, y), "xy": (x, y)}.items():
            k = kernel(a, b)
            sums[name] = k.sum(dtype=torch.float64).item()
            sums[name + "_diag"] = k.diagonal().sum(dtype=torch.float64).item()
        off_diag = sums["xx"] - sums["xx_diag"] + sums["yy"] - sums["yy_diag"]
        mmds[s] = off_diag / (m * (m - 1)) - 2 * sums["xy"] / (m * m)
    return float(mmds.mean()), float(mmds.std())


def _gather(x: Array, index: np.ndarray, device, dtype: torch.dtype) -> torch.Tensor:
    rows = x[index] if isinstance(x, np.ndarray) else x[torch.as_tensor(index, device=x.device)]
    rows = torch.from_numpy(np.ascontiguousarray(rows)) if isinstance(rows, np.ndarray) else rows
    return rows.to(device=device, dtype=dtype)
