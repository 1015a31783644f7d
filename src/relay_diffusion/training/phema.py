"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing and improving the
training dynamics of diffusion models", EDM2, section 3 and appendix C).

A power-function EMA with exponent ``gamma`` averages the training trajectory ``theta(tau)`` with the profile

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t                      (EDM2 eq. 2)

whose relative standard deviation ("EMA length") is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))                           (EDM2 eq. 3)

It is tracked with the step ``ema <- beta ema + (1 - beta) theta`` where ``beta = (1 - delta/t)^(gamma + 1)``
for a step of ``delta`` images ending at ``t`` images (EDM2 eq. 4 / 127). The product of the betas telescopes:
after steps ending at ``t_1 < ... < t_k`` the weight of the network after step ``j`` is
``(t_j^(gamma+1) - t_(j-1)^(gamma+1)) / t_k^(gamma+1)``, i.e. exactly the integral of ``p_{t_k}`` over
``(t_(j-1), t_j]``. So the tracked average *is* the continuous profile applied to the piecewise-constant
trajectory, for any batch size (also one that changes on resume), and the reconstruction below is exact in
the same sense.

Post-hoc reconstruction: given snapshots ``hat_i`` of profiles ``p_i = p_{t_i, gamma_i}``, find coefficients
``x`` such that ``sum_i x_i p_i`` is the least-squares approximation of the wanted profile ``q``:
minimise ``|| sum_i x_i p_i - q ||^2`` (L2 over tau), whose normal equations are ``A x = b`` with
``A_ij = <p_i, p_j>`` and ``b_i = <p_i, q>``; then ``sum_i x_i hat_i`` is the reconstructed EMA. The inner
product of two power-function profiles has a closed form (EDM2 eq. 151): with ``m = min(t_a, t_b)``,

    <p_a, p_b> = int_0^m (g_a + 1)(g_b + 1) tau^(g_a + g_b) / (t_a^(g_a+1) t_b^(g_b+1)) dtau
               = (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a+1) t_b^(g_b+1)).

The coefficients are normalised to sum to one (EDM2 does the same) so that a constant trajectory is kept.
All of this is float64 NumPy: the matrices are small (one row per snapshot).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

#: sigma_rel of the flattest profile (gamma = 0, a uniform average of the whole run): sqrt(1/12).
SIGMA_REL_MAX = math.sqrt(1 / 12)


def sigma_rel_of_gamma(gamma: float) -> float:
    """EMA length (relative standard deviation) of the exponent ``gamma`` (EDM2 eq. 3)."""
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent ``gamma > 0`` of an EMA length ``0 < sigma_rel < sqrt(1/12)`` (inverse of EDM2 eq. 3).

    ``sigma^2 (gamma + 2)^2 (gamma + 3) = gamma + 1`` is the cubic
    ``gamma^3 + 7 gamma^2 + (16 - sigma^-2) gamma + (12 - sigma^-2) = 0``; for lengths in range it has exactly
    one positive root (sigma_rel decreases monotonically for gamma >= 0), which is the largest real root.
    """
    s = float(sigma_rel)
    if not 0 < s < SIGMA_REL_MAX:
        raise ValueError(f"EMA length sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}), got {sigma_rel}")
    inv = s ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    real = roots[np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots.real))].real
    return float(real.max())


def power_ema_beta(gamma: float, t_next: float, delta: float) -> float:
    """Decay of one power-function EMA step of ``delta`` images that ends at ``t_next`` images (EDM2 eq. 4)."""
    return (1.0 - delta / t_next) ** (gamma + 1.0)


def profile_inner(t_a, g_a, t_b, g_b) -> np.ndarray:
    """``<p_{t_a, g_a}, p_{t_b, g_b}>`` in L2 over tau (closed form in the module docstring); broadcasts."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    m = np.minimum(t_a, t_b)
    # Written with ratios m / t <= 1 so that large times and exponents neither overflow nor underflow.
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (m / t_a) ** (g_a + 1) * (m / t_b) ** (g_b + 1) / m


def posthoc_coefficients(in_nimg: Sequence[float], in_sigma_rel: Sequence[float],
                         out_nimg: float, out_sigma_rel: float) -> np.ndarray:
    """Coefficients ``x [len(in)]`` with ``sum_i x_i p_i`` the least-squares fit of the profile
    ``(out_nimg, out_sigma_rel)`` by the input profiles (normal equations ``A x = b``, normalised to sum 1)."""
    t = np.asarray(in_nimg, dtype=np.float64)
    g = np.array([gamma_of_sigma_rel(s) for s in in_sigma_rel])
    if t.shape != g.shape or t.ndim != 1 or len(t) == 0:
        raise ValueError("need one time per input profile, and at least one input")
    if np.any(t <= 0):
        raise ValueError("input profiles must have a positive time (nimg > 0)")
    a = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, float(out_nimg), gamma_of_sigma_rel(out_sigma_rel))
    try:
        x = np.linalg.solve(a, b)
    except np.linalg.LinAlgError:  # duplicate inputs: the minimum-norm least-squares solution is as good
        x = np.linalg.lstsq(a, b, rcond=None)[0]
    return x / x.sum()


def profile_fit_error(in_nimg: Sequence[float], in_sigma_rel: Sequence[float], out_nimg: float,
                      out_sigma_rel: float, coefficients: np.ndarray) -> float:
    """Relative L2 error ``|| sum_i x_i p_i - q || / || q ||`` of a reconstruction (0 = exact)."""
    t = np.asarray(in_nimg, dtype=np.float64)
    g = np.array([gamma_of_sigma_rel(s) for s in in_sigma_rel])
    go = gamma_of_sigma_rel(out_sigma_rel)
    x = np.asarray(coefficients, dtype=np.float64)
    a = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, out_nimg, go)
    qq = float(profile_inner(out_nimg, go, out_nimg, go))
    err2 = float(x @ a @ x - 2 * x @ b + qq)
    return math.sqrt(max(err2, 0.0) / qq)


class PowerEMATracker:
    """Power-function EMAs of ``net``'s parameters for several lengths (sorted), updated after every step.

    ``emas[i]`` is a copy of the network whose parameters average the trajectory with the profile of
    ``sigma_rels[i]``; buffers are not averaged (they are the network's own constants).
    """

    def __init__(self, net: torch.nn.Module, sigma_rels: Sequence[float]) -> None:
        import copy

        self.sigma_rels = sorted(float(s) for s in sigma_rels)
        self.gammas = [gamma_of_sigma_rel(s) for s in self.sigma_rels]
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, net: torch.nn.Module, nimg_after: int, batch: int, skip: torch.Tensor | None = None) -> None:
        """Average in ``net`` after a step of ``batch`` images that brought the total to ``nimg_after``; where the
        0-dim bool tensor ``skip`` is true (a skipped step), every average stays as it was (decided on the device)."""
        for gamma, ema in zip(self.gammas, self.emas):
            beta = power_ema_beta(gamma, nimg_after, batch)
            if skip is not None:
                beta = torch.where(skip, 1.0, beta)  # lerp with weight 1 returns the average itself
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))

    def state_dict(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels), "emas": [ema.state_dict() for ema in self.emas]}

    def load_state_dict(self, state: dict) -> None:
        stored = [float(s) for s in state["sigma_rels"]]
        if stored != self.sigma_rels:
            raise ValueError(f"the state tracks EMA profiles {stored}, not {self.sigma_rels}")
        for ema, sd in zip(self.emas, state["emas"]):
            ema.load_state_dict(sd)
