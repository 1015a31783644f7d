"""Third-order multistep predictor-corrector solvers for both relay stages (``multistep3``): one network
evaluation per step, deterministic. Derivation and measurements: docs/solvers/README.md, "Third order".

Both stages' ODEs have, per coefficient ``k`` (stage 1: every pixel with ``a_k = 1``; a relay stage: every
block-DCT coefficient with its blur factor ``a_k(t)``; :mod:`relay_diffusion.core.solvers`), the exact step
from ``t`` to ``t' = t e^-h`` (``tau = ln(t / s)`` runs from 0 to ``h``; ``rho_k = a_k / t``)::

    x' = (t'/t) x + t' int_t^t' rho_k'(s) D_k(s) ds .

Replace ``D`` by the polynomial ``P`` in ``tau`` through evaluations ``(tau_m, D_m)`` (Lagrange basis ``l_m``)
and integrate by parts (no derivative of the schedule is needed)::

    x' = e^-h x + sum_m w_m D_m,
    w_m = a_k(t') l_m(h) - e^-h a_k(t) l_m(0) - int_0^h a_k(t e^-tau) e^(tau - h) l_m'(tau) dtau .

With ``a = 1`` this is DPM-Solver++'s ``int_0^h e^(tau - h) l_m(tau) dtau`` (the exponential Adams weights). For
the blur schedule the integral has no closed form; it is computed per frequency with 16-point Gauss-Legendre
quadrature (its integrand is smooth in ``tau``; 16 and 40 points agree to 1e-11), so every weight is exact for
the interpolant, per frequency.

A step ``i`` (``t_i -> t_{i+1}``):

* predictor: ``P`` through ``D_i, D_{i-1}, D_{i-2}`` (order ``p = 3``; 2 and 1 where there is less history or
  near the end, below); with two points the midpoint weight of the 2M solver is used instead of the exact one;
* evaluate ``D_{i+1}`` at the predicted ``x~_{i+1}`` (the step's one network call);
* corrector (UniC, Zhao et al. 2023, arXiv 2302.04867): redo the step with ``P`` through the predictor's points
  and ``(h, D_{i+1})`` (one order higher): ``x_{i+1}``;
* re-base ``D_{i+1}`` to the corrected state with the Jacobian of the optimal denoiser of Gaussian data of
  per-pixel standard deviation ``data_std`` (0.5: EDM's sigma_data), ``J_k(t) = a_k s^2 / (a_k^2 s^2 + t^2)``
  (stage 1: EDM's ``c_skip``): ``D_{i+1} += J (x_{i+1} - x~_{i+1})``. Exact for a network whose non-skip
  branch does not change between the two points; no extra evaluation.

Order schedule over the ``N`` evaluations ``t_0 .. t_{N-1}``: ``p_i = min(3, i + 1, N - 1 - i)``, i.e. warm-up
1, 2, then 3, and the last two steps 2 and 1 (both corrected; the final corrector also corrects the output,
``x = D_{N-1}`` re-based as above). The corrected first-order last step has a local error ``O(h^3)``: the
method is third order. No random draws after the start; the relay start is the reference's (``process.noise``
at ``t_0``), so deterministic relay solvers share their starting point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch

from relay_diffusion.core.blur import dct, idct, to_patches
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.core.samplers import Callback, denoise, host_levels, relay_time_steps, time_steps

F64 = torch.float64
#: Gauss-Legendre points of the per-frequency weight integrals.
QUADRATURE_POINTS = 16
#: Per-pixel standard deviation of the Gaussian data model behind the re-basing Jacobian (EDM's sigma_data).
DATA_STD = 0.5

Factors = Callable[[torch.Tensor], torch.Tensor]  # t [...] -> a(t) [..., *F]


@lru_cache(maxsize=4)
def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre points and weights on [0, 1] (Golub-Welsch), float64; the weights sum to 1."""
    k = torch.arange(1, n, dtype=F64)
    off = k / torch.sqrt(4 * k * k - 1)
    points, vectors = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    return (points + 1) / 2, vectors[0].square()


def _lagrange(nodes: Sequence[float], s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Lagrange basis of ``nodes`` and its derivative at the points ``s``: two ``[len(nodes), len(s)]``."""
    values, derivatives = [], []
    for m, rm in enumerate(nodes):
        others = [rk for k, rk in enumerate(nodes) if k != m]
        scale = math.prod(rm - rk for rk in others)
        value, derivative = torch.ones_like(s), torch.zeros_like(s)
        for j in range(len(others)):
            derivative = derivative + math.prod((s - rk for k, rk in enumerate(others) if k != j), start=torch.ones_like(s))
            value = value * (s - others[j])
        values.append(value / scale)
        derivatives.append(derivative / scale)
    return torch.stack(values), torch.stack(derivatives)


def step_weights(taus: Sequence[float], h: float, t: float = 1.0, factors: Factors | None = None) -> list[torch.Tensor]:
    """The weights ``w_m`` of ``x' = e^-h x + sum_m w_m D_m`` (module docstring) for evaluations at
    ``tau_m = ln(t / t_m)`` on the step from ``t`` to ``t e^-h``. ``factors``: the blur factors ``a(t)`` (a
    relay stage; weights shaped like ``a``), None for ``a = 1`` (stage 1; 0-dim weights). Float64, CPU."""
    r = [tau / h for tau in taus]  # nodes in units of the step: O(1) for every step size
    s, q = _gauss_legendre(QUADRATURE_POINTS)
    ends, _ = _lagrange(r, torch.tensor([0.0, 1.0], dtype=F64))
    _, slopes = _lagrange(r, s)  # d l_m / d(tau / h)
    if factors is None:
        a_now = a_next = torch.tensor(1.0, dtype=F64)
        a_inner = torch.ones_like(s)
    else:
        a_now, a_next = factors(torch.tensor(t, dtype=F64)), factors(torch.tensor(t * math.exp(-h), dtype=F64))
        a_inner = factors(t * torch.exp(-h * s))
    kernel = (q * torch.exp(h * (s - 1))).reshape(-1, *[1] * (a_inner.dim() - 1))
    return [a_next * ends[m, 1] - math.exp(-h) * a_now * ends[m, 0] - (kernel * slopes[m].reshape(kernel.shape)
                                                                         * a_inner).sum(0) for m in range(len(r))]


@dataclass
class _Step:
    """One step ``t_i -> t_{i+1}``: which evaluations its predictor and corrector use, with their weights."""

    decay: float                    # e^-h = t_{i+1} / t_i
    predictor: list[int]            # evaluation indices, newest first
    predictor_weights: list[torch.Tensor]
    corrector: list[int]            # [i + 1] + predictor, or [] without the corrector
    corrector_weights: list[torch.Tensor]


def plan(levels: Sequence[float], order: int = 3, corrector: bool = True,
         factors: Factors | None = None) -> list[_Step]:
    """The steps of the grid ``levels`` (``t_0 > ... > t_{N-1} > 0 = t_N``, host floats): ``N - 1`` steps
    (the last evaluation returns the denoised image). Predictor order ``min(order, i + 1, N - 1 - i)``."""
    n = len(levels) - 1
    lam = [-math.log(v) for v in levels[:-1]]
    steps = []
    for i in range(n - 1):
        p = min(order, i + 1, n - 1 - i)
        h, t = lam[i + 1] - lam[i], levels[i]
        nodes = list(range(i, i - p, -1))
        taus = [lam[j] - lam[i] for j in nodes]
        if p == 2:  # the 2M solver's midpoint weight: D_i + (h / 2) (D_i - D_{i-1}) / h_{i-1} in the first-order step
            w0 = step_weights([0.0], h, t, factors)[0]
            k = h / (2 * -taus[1])
            weights = [w0 * (1 + k), -w0 * k]
        else:
            weights = step_weights(taus, h, t, factors)
        cnodes = [i + 1] + nodes if corrector else []
        cweights = step_weights([h] + taus, h, t, factors) if corrector else []
        steps.append(_Step(levels[i + 1] / levels[i], nodes, weights, cnodes, cweights))
    return steps


def _run(net: Callable, u: torch.Tensor, t_steps: torch.Tensor, levels: list[float], class_labels: torch.Tensor | None,
         cfg_scale: float, guidance_interval: tuple[float, float] | None, steps: list[_Step], jacobians: list,
         to_image: Callable, to_coef: Callable, callback: Callback) -> torch.Tensor:
    """The predictor-corrector loop in the coefficient domain (stage 1: pixels; relay: block-DCT patches) from
    ``u`` at ``t_steps[0]`` (``levels``: its host copy); ``jacobians[i]``: the re-basing Jacobian at level
    ``i``. Returns the image."""
    n = len(levels) - 1
    evaluations: dict[int, torch.Tensor] = {}
    u_start = u  # the (corrected) state the current step starts from
    for i in range(n):
        x0 = denoise(net, to_image(u), t_steps[i], class_labels, cfg_scale, guidance_interval, levels[i])
        evaluations[i] = to_coef(x0)
        if i > 0 and steps[i - 1].corrector:
            step = steps[i - 1]
            corrected = step.decay * u_start + sum(w * evaluations[j] for w, j in zip(step.corrector_weights,
                                                                                     step.corrector))
            evaluations[i] = evaluations[i] + jacobians[i] * (corrected - u)
            u = corrected
        if i == n - 1:
            out = to_image(evaluations[i]) if i > 0 and steps[i - 1].corrector else x0
            if callback is not None:
                callback(dict(i=i, num_steps=n, t=levels[i], x=out, denoised=x0))
            return out
        step = steps[i]
        u_start = u
        u = step.decay * u + sum(w * evaluations[j] for w, j in zip(step.predictor_weights, step.predictor))
        for j in [j for j in evaluations if j < i - 2]:
            del evaluations[j]
        if callback is not None:
            callback(dict(i=i, num_steps=n, t=levels[i], x=to_image(u), denoised=x0))
    raise AssertionError("unreachable")  # the last evaluation returns


def multistep3_edm_sampler(
    net: Callable,
    latents: torch.Tensor,
    rng: SeedGenerators | None = None,
    class_labels: torch.Tensor | None = None,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    order: int = 3,
    corrector: bool = True,
    data_std: float = DATA_STD,
    callback: Callback = None,
) -> torch.Tensor:
    """Stage 1: the third-order predictor-corrector solver of the module docstring on EDM's grid, ``num_steps``
    NFE. ``latents``: ``[N, C, H, W]`` standard normal; ``rng`` is accepted for a uniform signature and never
    drawn from. ``order`` (1-3) caps the predictor's order and ``corrector=False`` leaves the corrector and
    the re-basing out (controls for the tests). Returns float64 images."""
    _check_order(order)
    t_steps = time_steps(num_steps, sigma_min, sigma_max, rho, net, latents.device)
    levels = host_levels(t_steps)
    jacobians = [data_std**2 / (data_std**2 + v**2) for v in levels[:-1]]
    return _run(net, latents.to(F64) * t_steps[0], t_steps, levels, class_labels, cfg_scale, guidance_interval,
                plan(levels, order, corrector), jacobians, _same, _same, callback)


def multistep3_relay_sampler(
    net: Callable,
    latents: torch.Tensor,
    rng: SeedGenerators,
    class_labels: torch.Tensor | None = None,
    *,
    process: BlurProcess = BlurProcess(),
    num_steps: int = 18,
    sigma_min: float = 0.008,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    truncation_sigma: float = 0.9,
    s_noise: float = 0.0,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    order: int = 3,
    corrector: bool = True,
    data_std: float = DATA_STD,
    callback: Callback = None,
) -> torch.Tensor:
    """Stage 2: the third-order predictor-corrector blur solver of the module docstring, one NFE per step of
    the relay grid (``relay_time_steps``), deterministic: ``s_noise`` must be 0. Start and draws are the
    reference sampler's (``x = latents + t_0 process.noise``), so it starts where the other deterministic relay
    solvers start. ``latents``: ``[N, C, H, W]``, the nearest-upsampled previous stage. Float64 images."""
    _check_order(order)
    if s_noise != 0:
        raise ValueError(f"the multistep3 relay solver is deterministic: s_noise must be 0, got {s_noise}")
    p = process.up_scale
    t_steps = relay_time_steps(num_steps, sigma_min, sigma_max, rho, truncation_sigma, net, latents.device)
    levels = host_levels(t_steps)
    x = latents.to(F64)
    x = x + t_steps[0] * process.noise(rng, x)
    shape = x.shape

    def on_device(w: torch.Tensor) -> torch.Tensor:
        return w.to(x.device)

    steps = plan(levels, order, corrector, process.factors)
    for step in steps:
        step.predictor_weights = [on_device(w) for w in step.predictor_weights]
        step.corrector_weights = [on_device(w) for w in step.corrector_weights]
    a = process.factors(torch.tensor(levels[:-1], dtype=F64))
    jacobians = list(on_device(a * data_std**2 / (a.square() * data_std**2 + torch.tensor(levels[:-1], dtype=F64)
                                                  .reshape(-1, 1, 1, 1).square())))
    return _run(net, to_patches(dct(x, p), p), t_steps, levels, class_labels, cfg_scale, guidance_interval, steps,
                jacobians, lambda u: idct(u.reshape(shape), p), lambda v: to_patches(dct(v, p), p), callback)


def _same(v: torch.Tensor) -> torch.Tensor:
    return v


def _check_order(order: int) -> None:
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
