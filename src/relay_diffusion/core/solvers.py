"""Multistep exponential-integrator solvers for both relay stages: one network evaluation per step.

Same signature shape as :mod:`relay_diffusion.core.samplers` (``(net, latents, rng, class_labels, *, settings,
callback)``), same time grids, float64 state, float32 network calls (through :func:`samplers.denoise`, so
classifier-free guidance and its interval behave alike).

Stage 1 (:func:`multistep_edm_sampler`) solves EDM's probability-flow ODE ``dx/dt = (x - D(x, t)) / t``.
With ``lambda = -ln t`` its exact solution is the variation-of-constants formula (Lu et al. 2022,
DPM-Solver++, arXiv 2211.01095, eq. 9 with alpha = 1, sigma = t)::

    x(t') = (t'/t) x(t) + t' int_{lambda}^{lambda'} e^l D(l) dl .

Holding ``D`` at ``D_i`` gives DDIM, ``x' = (t'/t) x + (1 - t'/t) D_i``, first order. Second order: model ``D``
as linear in lambda through the last two evaluations, slope ``s_i = (D_i - D_{i-1}) / h_{i-1}``
(``h = lambda' - lambda = ln(t/t')``). Integrated exactly this adds ``(h - 1 + e^-h) s_i``; DPM-Solver++(2M)
(their Algorithm 2) keeps instead the leading term of that weight, i.e. it evaluates the linear model at the
midpoint of the step, ``D_mid = D_i + (h/2) s_i``, and takes the exact first-order step with it::

    x' = (t'/t) x + (1 - t'/t) (D_i + (h / 2) (D_i - D_{i-1}) / h_{i-1})                      (2M)

The two weights differ by ``O(h^3)``, so both are second order; the midpoint one had 1.5 to 2.6 times less error
on the exact Gaussian denoisers of both stages (the toys of tests/test_solvers.py, 9 to 91 steps) and is used. The first step (no
history) is DDIM; the last (``t' = 0``) returns ``D``. One network evaluation per step, no random draws.

Stage 2 (:func:`multistep_relay_sampler`): the blur process ``x_t = A(t) u0 + t xi`` (``A`` diagonal in the
block-DCT basis, ``xi = eps + s_block block_noise(eps')`` of a law that does not depend on t) has, per DCT
coefficient ``k`` with ``rho_k(t) = a_k(t) / t``, the probability-flow ODE ``d(x / t) / dt = rho_k'(t) D_k``
(the marginal velocity of the conditional paths ``x / t = rho(t) u0 + xi``; it holds with block noise too)::

    x'/t' = x/t + int_t^{t'} rho_k'(s) D_k(s) ds .

``D`` held fixed gives the reference's step with ``s_noise = 0`` (docs/math.md §6c), ``x' = (t'/t) x + (a' - (t'/t) a) D``:
the linear part is integrated exactly per frequency. ``D`` linear in lambda adds
``t' (int rho_k'(s) (lambda(s) - lambda_i) ds) s_i``, whose weight has no closed form for the blur schedule
``a_k``; its leading term is again ``(a' - (t'/t) a) h / 2``, so the same midpoint ``D_mid`` in the exact
first-order step is second order per frequency (error ``O(h^3)`` per step; measured: tests/test_solvers.py).

Stochastic stage-2 steps (``s_noise = s > 0``) keep the reference's structure (docs/math.md §6c, its first-order part)
``x' = g x + (a' - g a) D + s t' xi_new`` with ``g = sqrt(1 - s^2) t'/t``, again with ``D = D_mid`` (the way
SDE-DPM-Solver++(2M), Lu et al. 2022, corrects its first-order SDE step: the data term's coefficient times the
midpoint slope). That step is an ODE step to ``t'`` followed by a re-noising at ``t'`` that keeps the fraction
``c = sqrt(1 - s^2)`` of the noise, ``x' = c x_ode + (1 - c) a' D + s t' xi_new``; using ``D_mid`` in both
parts matters: extrapolating the re-noising's ``D`` to the end of the step (``D_i + h s_i``) over-disperses and
keeping ``D_i`` under-disperses (per-coefficient variance ratio 1.22 / 0.87 / 1.02 for end / ``D_i`` / midpoint
at ``s = 0.5``, 7 steps, on the exact toy: the slope also carries the previous step's fresh noise).
Draw order (docs/math.md §8): the reference's start (eps, eps' at ``t_0``), then one ``eps`` (and ``eps'`` when
``s_block > 0``) per step but the last; nothing else is drawn (none at all after the start when ``s_noise = 0``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from relay_diffusion.core.blur import dct, idct, to_patches
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.core.samplers import Callback, denoise, host_levels, relay_time_steps, time_steps

F64 = torch.float64


def multistep_edm_sampler(
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
    order: int = 2,
    callback: Callback = None,
) -> torch.Tensor:
    """Stage 1: the multistep solver (2M) of the module docstring on EDM's grid (docs/math.md §6), ``num_steps`` NFE.

    ``latents``: ``[N, C, H, W]`` standard normal. Deterministic: ``rng`` is accepted for a uniform signature
    and never drawn from. ``order=1`` is DDIM (the first-order negative control). Returns float64 images.
    """
    _check_order(order)
    t_steps = time_steps(num_steps, sigma_min, sigma_max, rho, net, latents.device)
    return _multistep_edm(net, latents.to(F64) * t_steps[0], t_steps, class_labels, cfg_scale,
                          guidance_interval, order, callback)


def _multistep_edm(
    net: Callable, x: torch.Tensor, t_steps: torch.Tensor, class_labels: torch.Tensor | None, cfg_scale: float,
    guidance_interval: tuple[float, float] | None, order: int, callback: Callback,
) -> torch.Tensor:
    """(2M) from ``x`` at ``t_steps[0]`` along ``t_steps`` (float64, last entry 0)."""
    steps, levels = len(t_steps) - 1, host_levels(t_steps)
    prev = None  # (D_{i-1}, h_{i-1})
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x0 = denoise(net, x, t_cur, class_labels, cfg_scale, guidance_interval, levels[i])
        if levels[i + 1] == 0:
            x = x0
        else:
            h = torch.log(t_cur / t_next)
            x0_mid = x0 if order == 1 or prev is None else x0 + (h / 2) * (x0 - prev[0]) / prev[1]
            x = (t_next / t_cur) * x - torch.expm1(-h) * x0_mid
            prev = (x0, h)
        if callback is not None:
            callback(dict(i=i, num_steps=steps, t=levels[i], x=x, denoised=x0))
    return x


def multistep_relay_sampler(
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
    s_noise: float = 0.2,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    order: int = 2,
    callback: Callback = None,
) -> torch.Tensor:
    """Stage 2: the multistep blur solver of the module docstring, one NFE per step of the relay grid.

    Grid and start are the reference sampler's (docs/math.md §6c): ``relay_time_steps`` (``num_steps`` before
    truncation), ``x = latents + t_0 (eps + s_block block_noise(eps'))`` with the same draws, so deterministic
    solvers share their starting point with :func:`samplers.relay_sampler`. ``latents``: ``[N, C, H, W]``, the
    nearest-upsampled previous stage. ``order=1`` is the reference's first-order part alone. Float64 images.
    """
    _check_order(order)
    if not 0 <= s_noise <= 1:
        raise ValueError(f"s_noise must be in [0, 1], got {s_noise}")
    t_steps = relay_time_steps(num_steps, sigma_min, sigma_max, rho, truncation_sigma, net, latents.device)
    x = latents.to(F64)
    x = x + t_steps[0] * process.noise(rng, x)
    return _multistep_relay(net, x, t_steps, rng, class_labels, process, s_noise, cfg_scale, guidance_interval,
                            order, callback)


def _multistep_relay(
    net: Callable, x: torch.Tensor, t_steps: torch.Tensor, rng: SeedGenerators | None,
    class_labels: torch.Tensor | None, process: BlurProcess, s_noise: float, cfg_scale: float,
    guidance_interval: tuple[float, float] | None, order: int, callback: Callback,
) -> torch.Tensor:
    """The stage-2 steps from ``x`` at ``t_steps[0]`` (the start already added), float64."""
    p, shape, steps, levels = process.up_scale, x.shape, len(t_steps) - 1, host_levels(t_steps)
    keep = math.sqrt(1 - s_noise**2)  # c: the fraction of the current noise a step keeps

    def patches(u: torch.Tensor) -> torch.Tensor:
        return to_patches(dct(u, p), p)

    prev = None  # (dct(D_{i-1}) in patch layout, h_{i-1})
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x0 = denoise(net, x, t_cur, class_labels, cfg_scale, guidance_interval, levels[i])
        if i == steps - 1:  # t_next = 0: the last step returns the denoised image, as the reference does
            if callback is not None:
                callback(dict(i=i, num_steps=steps, t=levels[i], x=x0, denoised=x0))
            return x0
        u, u0 = patches(x), patches(x0)
        a_cur, a_next = (process.factors(t).to(device=x.device) for t in (t_cur, t_next))
        g = keep * t_next / t_cur
        h = torch.log(t_cur / t_next)
        u0_mid = u0 if order == 1 or prev is None else u0 + (h / 2) * (u0 - prev[0]) / prev[1]
        u_next = g * u + (a_next - g * a_cur) * u0_mid  # the reference's first-order step (docs/math.md §6c) with D_mid
        prev = (u0, h)
        x = idct(u_next.reshape(shape), p)
        if s_noise > 0:
            x = x + s_noise * t_next * process.noise(rng, x)
        if callback is not None:
            callback(dict(i=i, num_steps=steps, t=levels[i], x=x, denoised=x0))
    raise AssertionError("unreachable")  # the last step returns


def _check_order(order: int) -> None:
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
