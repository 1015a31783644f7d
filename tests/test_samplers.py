"""Sampler behaviour beyond the fixtures: batch invariance, the exact Gaussian statistics, callbacks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.utils.intlist import parse_int_list
from relay_diffusion.core.samplers import edm_sampler, relay_sampler, relay_time_steps, time_steps
from relay_diffusion.core.toy import GaussianToyDenoiser


def test_time_steps_endpoints_and_order():
    t = time_steps(18, 0.002, 80, 7)
    assert t.dtype == torch.float64 and len(t) == 19
    assert t[0].item() == pytest.approx(80) and t[-2].item() == pytest.approx(0.002) and t[-1] == 0
    assert (t[1:] < t[:-1]).all()
    r = relay_time_steps(40, 0.008, 80, 7, truncation_sigma=0.9)
    assert r[0] < 0.9 and r[-1] == 0
    with pytest.raises(ValueError, match="truncation_sigma"):
        relay_time_steps(2, 0.008, 80, 7, truncation_sigma=1e-3)


PROCESS = {f.name for f in dataclasses.fields(BlurProcess)}


def test_parse_int_list():
    assert parse_int_list("0-3,10, 12-12") == [0, 1, 2, 3, 10, 12]
    with pytest.raises(ValueError):
        parse_int_list("5-2")


def _relay(seeds, low, net, **kw):
    rng = SeedGenerators(seeds)
    lat = F.interpolate(low, scale_factor=4, mode="nearest")
    return relay_sampler(net, lat, rng, None, process=BlurProcess(**{k: kw.pop(k) for k in list(kw) if k in PROCESS}),
                         num_steps=12, **kw)


def test_samples_depend_on_their_seed_only():
    net = GaussianToyDenoiser(3, 8, label_dim=0)
    seeds = [5, 9, 11, 2**33 + 5]  # seeds are taken modulo 2**32
    rng = SeedGenerators(seeds)
    full = edm_sampler(net, rng.randn([3, 8, 8]), rng, num_steps=6, S_churn=10)
    for i, s in enumerate(seeds):
        one = SeedGenerators([s])
        alone = edm_sampler(net, one.randn([3, 8, 8]), one, num_steps=6, S_churn=10)
        torch.testing.assert_close(alone[0], full[i], rtol=0, atol=0)
    torch.testing.assert_close(full[0], full[3], rtol=0, atol=0)
    low = torch.linspace(-1, 1, 4 * 3 * 2 * 2, dtype=torch.float64).reshape(4, 3, 2, 2)
    big = GaussianToyDenoiser(3, 8)
    batched = _relay([1, 2, 3, 4], low, big)
    torch.testing.assert_close(_relay([3], low[2:3], big)[0], batched[2], rtol=0, atol=0)


def test_callback_sees_every_step():
    net = GaussianToyDenoiser(1, 4)
    seen = []
    rng = SeedGenerators([0])
    edm_sampler(net, rng.randn([1, 4, 4]), rng, num_steps=5, callback=lambda info: seen.append(info["i"]))
    assert seen == list(range(5))
    seen.clear()
    low = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    _relay([0], low, net, callback=lambda info: seen.append(info["i"]))
    assert seen == list(range(len(relay_time_steps(12, 0.008, 80, 7, 0.9)) - 1))


def test_edm_sampler_reproduces_gaussian_statistics():
    """With the exact denoiser of N(m, 0.25 I), 2400 samples must have mean m and variance 0.25.

    Tolerances are 5 standard errors of the estimators: per pixel sd(mean) = sqrt(0.25 / n);
    the pixel-averaged variance has sd ~ 0.25 sqrt(2 / (n - 1)) / sqrt(pixels) (pixels are independent).
    """
    n, c, r = 2400, 1, 4
    net = GaussianToyDenoiser(c, r, label_dim=3)
    seeds = list(range(n))
    labels = F.one_hot(torch.tensor(seeds) % 3, 3).float()
    rng = SeedGenerators(seeds)
    x = edm_sampler(net, rng.randn([c, r, r]), rng, labels, num_steps=128)  # 128 Heun steps: bias < 0.2%
    target = net.mean(labels).to(torch.float64)
    resid = x - target  # N(0, 0.25) if the sampler is exact
    pixels = c * r * r
    assert resid.mean(0).abs().max().item() < 5 * math.sqrt(0.25 / n)
    var_sd = 0.25 * math.sqrt(2 / (n - 1)) / math.sqrt(pixels)
    assert abs(resid.var(0).mean().item() - 0.25) < 5 * var_sd
    # and it is a real test: a sampler that stops at the wrong noise level fails it
    rng = SeedGenerators(seeds)
    wrong = edm_sampler(net, rng.randn([c, r, r]), rng, labels, num_steps=128, sigma_min=0.3)
    assert abs((wrong - target).var(0).mean().item() - 0.25) > 5 * var_sd
