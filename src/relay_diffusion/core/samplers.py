"""Samplers (docs/math.md §6): EDM's Heun sampler, its SDE-step variant, and the relay blur sampler.

All are pure functions with one signature shape: ``(net, latents, rng, class_labels, *, settings, callback)``.
``net(x, sigma, class_labels)`` is a denoiser (a preconditioned network or the toy); ``rng`` supplies every
random draw (:class:`relay_diffusion.core.rng.SeedGenerators`, one generator per sample) in the order of docs/math.md §8.
Sampler state is float64; the network sees float32 and its output is cast back to float64.

No step reads a value back from the device: every decision that depends on a noise level (churn, the
guidance interval, the last step) is taken on host copies of the schedule made once before the loop
(:func:`host_levels`, :func:`churn_levels`), so an accelerator is never made to wait inside the loop.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from relay_diffusion.core.blur import dct, idct, to_patches
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.rng import SeedGenerators

Callback = Optional[Callable[[dict[str, Any]], None]]
F64 = torch.float64


def time_steps(
    num_steps: int, sigma_min: float, sigma_max: float, rho: float, net: Any = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """EDM's noise levels ``t_0 > ... > t_{N-1}`` followed by ``t_N = 0`` (docs/math.md §6), float64, ``[N + 1]``.

    ``sigma_min``/``sigma_max`` are clipped to the network's supported range; levels are rounded by
    ``net.round_sigma`` where the network has one (iDDPM's discrete grid).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s_min = max(sigma_min, getattr(net, "sigma_min", 0.0))
    s_max = min(sigma_max, getattr(net, "sigma_max", math.inf))
    i = torch.arange(num_steps, dtype=F64, device=device)
    frac = i / (num_steps - 1) if num_steps > 1 else i
    t = (s_max ** (1 / rho) + frac * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    t = _round_sigma(net, t)
    return torch.cat([t, torch.zeros_like(t[:1])])


def _round_sigma(net: Any, t: torch.Tensor) -> torch.Tensor:
    fn = getattr(net, "round_sigma", None)
    return torch.as_tensor(fn(t), dtype=F64, device=t.device) if fn is not None else t


def host_levels(t_steps: torch.Tensor) -> list[float]:
    """The noise levels as Python floats (one read of the schedule per sampling, before its loop)."""
    return t_steps.tolist()


def churn_levels(
    net: Any, t_steps: torch.Tensor, num_steps: int, S_churn: float, S_min: float, S_max: float,
) -> tuple[torch.Tensor, list[float]]:
    """EDM's raised noise levels ``t_hat_i = t_i (1 + gamma_i)`` (docs/math.md §6a) of every step ``i`` of
    ``t_steps`` (``[N + 1]``, the last level excluded), rounded by the network: a float64 tensor ``[N]`` and
    its host copy. ``gamma_i = min(S_churn / num_steps, sqrt 2 - 1)`` where ``S_min <= t_i <= S_max``, else 0."""
    t = t_steps[:-1]
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    gammas = [gamma_max if S_min <= v <= S_max else 0.0 for v in host_levels(t)]
    t_hat = _round_sigma(net, t + torch.tensor(gammas, dtype=F64).to(t.device) * t)
    return t_hat, host_levels(t_hat)


def denoise(
    net: Callable, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None, cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None, level: float | None = None,
) -> torch.Tensor:
    """``D(x, t)`` in float64 from a float32 network call; classifier-free guidance when ``cfg_scale > 1``:
    ``c D(x, t, label) - (c - 1) D(x, t, no label)`` (docs/math.md §6), both halves in one call on a ``2N``
    batch whose second half has all-zero labels (which is what "no label" means to the networks). With
    ``guidance_interval = (lo, hi)`` guidance applies only for noise levels ``lo < t <= hi`` (Kynkaanniemi et
    al. 2024, arXiv 2404.07724); outside it ``D(x, t, label)`` alone (one network call). None: at every level.
    ``level``: ``t`` as a Python float where the caller has it, so that the interval is decided on the host.

    Autoguidance (Karras et al. 2024, arXiv 2406.02507): when ``net`` has a ``guide`` (a weaker denoiser of
    the same task, same labels), ``c D(x, t, label) - (c - 1) D_guide(x, t, label)`` instead, for
    unconditional networks too; scale and interval are the same settings."""
    sigma = t.to(torch.float32).reshape(-1).expand(x.shape[0])
    x32 = x.to(torch.float32)
    guide = getattr(net, "guide", None)
    if cfg_scale > 1 and (guide is not None or class_labels is not None) and \
            in_guidance_interval(t if level is None else level, guidance_interval):
        if guide is not None:
            good, bad = net(x32, sigma, class_labels).to(F64), guide(x32, sigma, class_labels).to(F64)
            return cfg_scale * good - (cfg_scale - 1) * bad
        labels = torch.cat([class_labels, torch.zeros_like(class_labels)])
        cond, uncond = net(torch.cat([x32, x32]), torch.cat([sigma, sigma]), labels).to(F64).chunk(2)
        return cfg_scale * cond - (cfg_scale - 1) * uncond
    return net(x32, sigma, class_labels).to(F64)


def in_guidance_interval(t: torch.Tensor | float, interval: tuple[float, float] | None) -> bool:
    """Whether guidance applies at noise level ``t``: ``lo < t <= hi``, always when ``interval`` is None."""
    if interval is None:
        return True
    lo, hi = interval
    return lo < float(t) <= hi


def _churn(
    x_cur: torch.Tensor, t_cur: torch.Tensor, t_hat: torch.Tensor, rng: SeedGenerators, S_noise: float,
) -> torch.Tensor:
    """EDM's churn (docs/math.md §6a): ``x`` at the raised level ``t_hat`` (:func:`churn_levels`) with fresh
    noise; the noise is drawn at every step, also when ``gamma = 0``. Returns ``x_hat``."""
    return x_cur + (t_hat.square() - t_cur.square()).sqrt() * S_noise * rng.randn_like(x_cur)


def edm_sampler(
    net: Callable,
    latents: torch.Tensor,
    rng: SeedGenerators,
    class_labels: torch.Tensor | None = None,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    cfg_scale: float = 1.0,
    sde_scale: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
    callback: Callback = None,
) -> torch.Tensor:
    """Stage-1 sampler: EDM's Heun steps with churn (docs/math.md §6a), or SDE steps when ``sde_scale`` is given (6b).

    ``latents``: ``[N, C, H, W]`` standard normal. Per step it draws the churn noise (always, also when
    ``gamma = 0``) and, for SDE steps, one fresh noise per network evaluation. Returns float64 images.
    """
    t_steps = time_steps(num_steps, sigma_min, sigma_max, rho, net, latents.device)
    levels = host_levels(t_steps)
    t_hats, hat_levels = churn_levels(net, t_steps, num_steps, S_churn, S_min, S_max)
    x_next = latents.to(F64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        t_hat = t_hats[i]
        x_hat = _churn(x_cur, t_cur, t_hat, rng, S_noise)
        denoised = denoise(net, x_hat, t_hat, class_labels, cfg_scale, guidance_interval, hat_levels[i])
        d_cur = (x_hat - denoised) / t_hat
        if sde_scale is None:
            x_next = x_hat + (t_next - t_hat) * d_cur
            if i < num_steps - 1:
                d_prime = (x_next - denoise(net, x_next, t_next, class_labels, cfg_scale, guidance_interval,
                                            levels[i + 1])) / t_next
                x_next = x_hat + (t_next - t_hat) * (d_cur + d_prime) / 2
        else:
            # Euler-Maruyama-style step that re-injects g = sde_scale * t_next of fresh noise (docs/math.md §6b).
            g = sde_scale * t_next
            a = ((t_next.square() - g.square()) / t_hat.square()).sqrt()
            x_next = x_hat + (a - 1) * t_hat * d_cur + g * rng.randn_like(x_cur)
            if i < num_steps - 1:
                d_prime = (x_next - denoise(net, x_next, t_next, class_labels, cfg_scale, guidance_interval,
                                            levels[i + 1])) / t_next
                x_next = x_hat + (a - 1) * t_hat * (d_cur + d_prime) / 2 + g * rng.randn_like(x_cur)
        if callback is not None:
            callback(dict(i=i, num_steps=num_steps, t=levels[i], x=x_next, denoised=denoised))
    return x_next


def relay_time_steps(
    num_steps: int, sigma_min: float, sigma_max: float, rho: float, truncation_sigma: float, net: Any = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The stage-2 grid (docs/math.md §6c): EDM's grid without its leading levels ``>= truncation_sigma``, then 0."""
    t = time_steps(num_steps, sigma_min, sigma_max, rho, net, device)[:-1]
    t = t[t < truncation_sigma]
    if len(t) == 0:
        raise ValueError(
            f"no stage-2 step is below truncation_sigma={truncation_sigma}; increase num_steps or truncation_sigma"
        )
    return torch.cat([t, torch.zeros_like(t[:1])])


def relay_sampler(
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
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    churn: bool = False,
    guidance_interval: tuple[float, float] | None = None,
    callback: Callback = None,
) -> torch.Tensor:
    """Stage-2 relay sampler (docs/math.md §6c): second-order blur-diffusion steps in the block-DCT domain.

    ``process`` is the forward process the network was trained on (relay factor p, blur schedule, block
    noise). ``latents``: ``[N, C, H, W]``, the stage-1 image upsampled by nearest neighbour (``H, W`` multiples
    of p). It starts at the truncation level ``t_0`` by adding ``t_0 (eps + block_scale block_noise(eps'))``.
    ``churn=True`` is the CelebA-HQ variant: an EDM-style churn step (``S_churn``, ``S_min``, ``S_max``,
    ``S_noise``) before every network call, whose noise is drawn at every step, also when ``gamma = 0``.
    Returns float64 images.
    """
    p = process.up_scale
    t_steps = relay_time_steps(num_steps, sigma_min, sigma_max, rho, truncation_sigma, net, latents.device)
    steps = len(t_steps) - 1
    levels = host_levels(t_steps)
    t_hats, hat_levels = churn_levels(net, t_steps, num_steps, S_churn, S_min, S_max) if churn else (
        t_steps[:-1], levels[:-1])
    x = latents.to(F64)
    shape = x.shape

    def noise() -> torch.Tensor:
        return process.noise(rng, x)

    def patches(u: torch.Tensor) -> torch.Tensor:
        return to_patches(dct(u, p), p)

    def alpha(t: torch.Tensor) -> torch.Tensor:
        return process.factors(t).to(device=x.device)

    x_next = x + t_steps[0] * noise()
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        t_hat, x_hat = t_cur, x_cur
        if churn:
            t_hat = t_hats[i]
            x_hat = _churn(x_cur, t_cur, t_hat, rng, S_noise)
        x0 = denoise(net, x_hat, t_hat, class_labels, cfg_scale, guidance_interval, hat_levels[i])
        if i == steps - 1:
            if callback is not None:
                callback(dict(i=i, num_steps=steps, t=levels[i], x=x0, denoised=x0))
            return x0
        # With churn the reference keeps U = dct(x_cur) (not x_hat) while using t_hat everywhere else;
        # kept as is so results stay reproducible against it.
        u = patches(x_cur)
        d_cur = (u - patches(x0)) / t_hat
        a_cur, a_next = alpha(t_hat), alpha(t_next)
        g = math.sqrt(1 - s_noise**2) * t_next / t_hat
        k = a_next + g - g * a_cur
        m = t_hat * (g * a_cur - a_next)
        x_next = idct((k * u + m * d_cur).reshape(shape), p) + s_noise * t_next * noise()
        x0_next = denoise(net, x_next, t_next, class_labels, cfg_scale, guidance_interval, levels[i + 1])
        d_prime = (patches(x_next) - patches(x0_next)) / t_next
        x_next = idct((k * u + m * (d_cur + d_prime) / 2).reshape(shape), p) + s_noise * t_next * noise()
        if callback is not None:
            callback(dict(i=i, num_steps=steps, t=levels[i], x=x_next, denoised=x0))
    raise AssertionError("unreachable")  # the last step returns
