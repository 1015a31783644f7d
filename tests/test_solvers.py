"""The multistep solvers (core.solvers) against exact solutions: empirical order, error at equal NFE, the shared
start, draw order, stochastic statistics, block noise, the guidance interval and NFE counting.

Exact references: stage 1, the Gaussian toy of docs/math.md §12, whose probability-flow ODE solution is
``m + sqrt(v + t'^2) / sqrt(v + t^2) (x - m)``; stage 2, :class:`BlurGaussianToyDenoiser` with block noise off,
exact per block-DCT coefficient. Both samplers end with ``x = D(x, t_last)``, so the exact answer is the flow to
``t_last`` followed by the (linear) exact denoiser there.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from relay_diffusion.core.blur import blur, dct, idct, to_patches
from relay_diffusion.core.blur_toy import BlurGaussianToyDenoiser
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.core.samplers import denoise, edm_sampler, relay_sampler, relay_time_steps, time_steps
from relay_diffusion.core.registry import nfe_first, nfe_second
from relay_diffusion.core.solvers import multistep_edm_sampler, multistep_relay_sampler
from relay_diffusion.core.toy import GaussianToyDenoiser

F64 = torch.float64


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).square().mean().sqrt().item()


def _order(e1: float, e2: float, n1: int, n2: int) -> float:
    """Empirical order p of ``error ~ n^-p`` from errors ``e1, e2`` at ``n1 < n2`` steps."""
    return math.log(e1 / e2) / math.log(n2 / n1)


class Counting:
    """A denoiser wrapper that counts calls (``calls``) and remembers every input."""

    def __init__(self, net):
        self.net, self.calls, self.inputs = net, 0, []
        self.sigma_min, self.sigma_max = net.sigma_min, net.sigma_max

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        self.inputs.append((x.clone(), sigma.clone(), class_labels))
        return self.net(x, sigma, class_labels)


# ---------------------------------------------------------------------------------------------------------
# Stage 1

NET1 = GaussianToyDenoiser(3, 8)
LAT1 = SeedGenerators(range(8)).randn([3, 8, 8])


def _exact_first(num_steps: int) -> torch.Tensor:
    t = time_steps(num_steps, 0.002, 80, 7)
    m, v, t0, tl = NET1.mean().to(F64), NET1.var, float(t[0]), float(t[-2])
    x = m + math.sqrt(v + tl**2) / math.sqrt(v + t0**2) * (LAT1.to(F64) * t0 - m)
    a = v / (tl**2 + v)
    return a * x + (1 - a) * m


def _err_first(solver: str, num_steps: int, **kw) -> float:
    if solver == "heun":
        x = edm_sampler(NET1, LAT1, SeedGenerators(range(8)), num_steps=num_steps)
    else:
        x = multistep_edm_sampler(NET1, LAT1, None, num_steps=num_steps, **kw)
    return _rms(x, _exact_first(num_steps))


def test_first_stage_order_two_and_ddim_control_order_one():
    """Measured: multistep 8.36e-3 -> 1.87e-3 (32 -> 64 steps, order 2.16); DDIM 4.31e-2 -> 2.17e-2 (0.99)."""
    ms = _order(_err_first("multistep", 32), _err_first("multistep", 64), 32, 64)
    ddim = _order(_err_first("multistep", 32, order=1), _err_first("multistep", 64, order=1), 32, 64)
    heun = _order(_err_first("heun", 32), _err_first("heun", 64), 32, 64)
    assert 1.7 < ms < 2.6, ms
    assert 0.8 < ddim < 1.3, ddim  # the same test fails a first-order solver
    assert 1.7 < heun < 2.6, heun


@pytest.mark.parametrize("nfe", [9, 17, 33, 65])
def test_first_stage_beats_heun_at_equal_nfe(nfe):
    """At 9 NFE: multistep 7.7e-2 vs Heun (5 steps) 0.75."""
    assert nfe_first("heun", (nfe + 1) // 2) == nfe == nfe_first("multistep", nfe)
    assert _err_first("multistep", nfe) < _err_first("heun", (nfe + 1) // 2)


def test_first_stage_is_deterministic_and_one_call_per_step():
    net = Counting(NET1)
    a = multistep_edm_sampler(net, LAT1, None, num_steps=9)
    assert net.calls == 9 == nfe_first("multistep", 9)
    torch.testing.assert_close(a, multistep_edm_sampler(NET1, LAT1, None, num_steps=9), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Stage 2

PROC0 = BlurProcess(block_scale=0.0)
NET2 = BlurGaussianToyDenoiser(PROC0, 3, 16)
LOW = 0.5 * torch.sin(torch.arange(2 * 3 * 4 * 4, dtype=F64)).reshape(2, 3, 4, 4)
LAT2 = F.interpolate(LOW, scale_factor=4, mode="nearest")


def _exact_second(num_steps: int) -> torch.Tensor:
    t = relay_time_steps(num_steps, 0.008, 80, 7, 0.9)
    x = LAT2 + t[0] * SeedGenerators([1, 2]).randn_like(LAT2)  # the samplers' start (block noise off)
    return NET2(NET2.flow(x, float(t[0]), float(t[-2])), t[-2].expand(2)).to(F64)


def _err_second(solver: str, num_steps: int, **kw) -> float:
    fn = relay_sampler if solver == "reference" else multistep_relay_sampler
    x = fn(NET2, LAT2, SeedGenerators([1, 2]), process=PROC0, num_steps=num_steps, s_noise=0.0, **kw)
    return _rms(x, _exact_second(num_steps))


def test_blur_toy_is_consistent_with_its_ode():
    """The toy's flow solves d(x/t)/dt = rho_k'(t) D_k (per DCT coefficient) and composes; its denoiser is the
    posterior mean (orthogonality of the error to x_t, Monte Carlo over 4000 draws)."""
    x = LAT2 + 0.5 * SeedGenerators([3, 4]).randn_like(LAT2)
    t, dt = 0.5, 1e-5
    lhs = (NET2.flow(x, t, t - dt) / (t - dt) - NET2.flow(x, t, t + dt) / (t + dt)) / (-2 * dt)
    rho = lambda s: PROC0.factors(torch.tensor(s)) / s  # noqa: E731
    rho_dot = (rho(t + dt) - rho(t - dt)) / (2 * dt)
    d = to_patches(dct(NET2(x, torch.full((2,), t)).to(F64), 4), 4)
    torch.testing.assert_close(to_patches(dct(lhs, 4), 4), rho_dot * d, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(NET2.flow(NET2.flow(x, t, 0.2), 0.2, 0.01), NET2.flow(x, t, 0.01))
    # Monte Carlo: u0 ~ data, x_t = A u0 + t n; E[(u0 - D(x_t)) x_t] = 0 per coefficient
    net, n = BlurGaussianToyDenoiser(PROC0, 1, 4), 4000
    rng = SeedGenerators(range(n))
    u0 = to_patches(dct(net.mean_image.expand(n, 1, 4, 4), 4), 4) + net.coef_var.sqrt() * to_patches(
        rng.randn([1, 4, 4], dtype=F64), 4)
    a = PROC0.factors(torch.tensor(t))
    xt = a * u0 + t * to_patches(rng.randn([1, 4, 4], dtype=F64), 4)
    xt_img = idct(xt.reshape(n, 1, 4, 4), 4)
    err = u0 - to_patches(dct(net(xt_img, torch.full((n,), t)).to(F64), 4), 4)
    cov = (err * (xt - xt.mean(0))).mean(0)
    assert cov.abs().max().item() < 5 * (err.std(0) * xt.std(0)).max().item() / math.sqrt(n)


def test_second_stage_order_two_reference_order_one():
    """Measured (grid 130 -> 258, N' = 46 -> 91 steps): multistep 2.91e-4 -> 8.27e-5 (order 1.84); its first-order
    part alone 8.23e-3 -> 4.17e-3 (0.99); the reference sampler 2.80e-3 -> 1.47e-3 (0.95: its Heun-like
    averaging of d is not second order for the blur ODE)."""
    n1, n2 = (len(relay_time_steps(n, 0.008, 80, 7, 0.9)) - 1 for n in (130, 258))
    ms = _order(_err_second("multistep", 130), _err_second("multistep", 258), n1, n2)
    first = _order(_err_second("multistep", 130, order=1), _err_second("multistep", 258, order=1), n1, n2)
    assert 1.6 < ms < 2.6, ms
    assert 0.7 < first < 1.3, first  # negative control
    ref = _order(_err_second("reference", 130), _err_second("reference", 258), n1, n2)
    assert 0.7 < ref < 1.3, ref


@pytest.mark.parametrize("num_steps", [18, 34, 66])
def test_second_stage_beats_reference_on_same_grid(num_steps):
    """Same grid, half the NFE: at the default grid (18) multistep 7.9e-3 (7 NFE) vs reference 1.6e-2 (13 NFE)."""
    assert nfe_second("multistep", num_steps) * 2 - 1 == nfe_second("reference", num_steps)
    assert _err_second("multistep", num_steps) < _err_second("reference", num_steps)


def test_second_stage_shares_the_start_and_draws_one_noise_per_step():
    proc = BlurProcess()  # block noise on: eps, eps' per draw
    net = BlurGaussianToyDenoiser(proc, 3, 16)
    ref, ms = Counting(net), Counting(net)
    relay_sampler(ref, LAT2, SeedGenerators([1, 2]), process=proc, num_steps=18, s_noise=0.0)
    ms_rng = SeedGenerators([1, 2])
    multistep_relay_sampler(ms, LAT2, ms_rng, process=proc, num_steps=18, s_noise=0.0)
    torch.testing.assert_close(ms.inputs[0][0], ref.inputs[0][0], rtol=0, atol=0)  # same start, same draws
    steps = nfe_second("multistep", 18)
    assert ms.calls == steps == 7 and ref.calls == nfe_second("reference", 18) == 13
    # s_noise = 0 draws the start only; s_noise > 0 one eps (+ eps') per step but the last
    probe = SeedGenerators([1, 2])
    probe.randn_like(LAT2), probe.randn_like(LAT2)
    assert all(torch.equal(a, b) for a, b in zip(ms_rng.get_state(), probe.get_state()))
    rng = SeedGenerators([1, 2])
    multistep_relay_sampler(net, LAT2, rng, process=proc, num_steps=18, s_noise=0.2)
    for _ in range(2 * (steps - 1)):  # eps, eps' for each of the N' - 1 steps that are not the last
        probe.randn_like(LAT2)
    assert all(torch.equal(a, b) for a, b in zip(rng.get_state(), probe.get_state()))


def test_stochastic_steps_sample_the_data_distribution():
    """From an exact start (x_{t_0} drawn from the forward marginal) the stochastic multistep steps (s_noise 0.2,
    default grid, 7 NFE) must return data statistics: per-coefficient mean m_k (5 standard errors) and variance
    v_k (ratio averaged over the 16 coefficients within 0.03; measured 1.009, max |z| 2.6). The reference sampler
    on the same grid (13 NFE) has a mean bias (max |z| 9.9, ratio 1.048); a sampler stopped early fails too."""
    net, n = BlurGaussianToyDenoiser(PROC0, 1, 4), 3000
    rng = SeedGenerators(range(n, 2 * n))  # other seeds than the sampler's: the data must not share its noise
    m, v = to_patches(dct(net.mean_image, 4), 4), net.coef_var
    u0 = m + v.sqrt() * to_patches(rng.randn([1, 4, 4], dtype=F64), 4)
    t0 = float(relay_time_steps(18, 0.008, 80, 7, 0.9)[0])
    latents = blur(idct(u0.reshape(n, 1, 4, 4), 4), PROC0.strength(torch.tensor(t0)).item(), 4)

    def stats(fn, **kw):
        out = fn(net, latents, SeedGenerators(range(n)), process=PROC0, num_steps=18, s_noise=0.2, **kw)
        c = to_patches(dct(out, 4), 4)
        return ((c.mean(0) - m) / (v / n).sqrt()).abs().max().item(), (c.var(0) / v).mean().item()

    z, ratio = stats(multistep_relay_sampler)
    assert z < 5 and abs(ratio - 1) < 0.03, (z, ratio)
    z_ref, _ = stats(relay_sampler)
    assert z_ref > z
    _, wrong = stats(multistep_relay_sampler, sigma_min=0.3)
    assert abs(wrong - 1) > 0.03, wrong


def test_second_stage_with_block_noise_stays_close_to_fine_grid():
    """Block noise on (the toy is then not exact): multistep and reference agree on a fine grid, and the
    multistep solver on the default grid is close to that (RMS well below the image scale)."""
    proc = BlurProcess()
    net = BlurGaussianToyDenoiser(proc, 3, 16)
    run = lambda fn, n, s=0.0: fn(net, LAT2, SeedGenerators([1, 2]), process=proc, num_steps=n, s_noise=s)  # noqa
    fine_ms, fine_ref = run(multistep_relay_sampler, 258), run(relay_sampler, 258)
    assert _rms(fine_ms, fine_ref) < 3e-3
    coarse = run(multistep_relay_sampler, 18)
    assert torch.isfinite(coarse).all()
    assert _rms(coarse, run(multistep_relay_sampler, 258)) < 0.03  # a different start (grid 18 vs 258)
    stochastic = run(multistep_relay_sampler, 18, 0.2)
    assert torch.isfinite(stochastic).all() and stochastic.abs().max() < 3


# ---------------------------------------------------------------------------------------------------------
# Guidance interval, NFE


def test_guidance_interval():
    net = GaussianToyDenoiser(1, 4, label_dim=2)
    x = torch.randn(1, 1, 4, 4, dtype=F64)
    labels = torch.tensor([[1.0, 0.0]])
    t = torch.tensor(1.0, dtype=F64)
    cond, guided = denoise(net, x, t, labels), denoise(net, x, t, labels, 3.0)
    assert not torch.equal(cond, guided)
    assert torch.equal(denoise(net, x, t, labels, 3.0, (0.5, 2.0)), guided)
    assert torch.equal(denoise(net, x, t, labels, 3.0, (1.0, 2.0)), cond)  # lo < t <= hi
    assert torch.equal(denoise(net, x, t, labels, 3.0, (0.5, 1.0)), guided)
    counting = Counting(net)
    rng = SeedGenerators([0])
    lat = rng.randn([1, 4, 4])
    multistep_edm_sampler(counting, lat, None, labels, num_steps=10, cfg_scale=2.0, guidance_interval=(0.3, 3.0))
    guided_levels = [s[0] for x, s, lab in counting.inputs if x.shape[0] == 2]  # cond + uncond in one 2N call
    assert 0 < len(guided_levels) < 10 and all(0.3 < float(s) <= 3.0 for s in guided_levels)
    # interval covering every level: bit-identical to plain guidance, for the default samplers too
    a = edm_sampler(net, lat, SeedGenerators([0]), labels, num_steps=6, cfg_scale=2.0)
    b = edm_sampler(net, lat, SeedGenerators([0]), labels, num_steps=6, cfg_scale=2.0, guidance_interval=(0, 1e9))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_nfe_and_bad_names():
    assert nfe_first("heun", 18) == 35 and nfe_first("multistep", 18) == 18
    assert nfe_second("reference", 18) == 13 and nfe_second("multistep", 18) == 7
    with pytest.raises(ValueError, match="solver_first"):
        nfe_first("euler", 18)
    with pytest.raises(ValueError, match="solver_second"):
        nfe_second("heun", 18)
    with pytest.raises(ValueError, match="order"):
        multistep_edm_sampler(NET1, LAT1, None, num_steps=4, order=3)
