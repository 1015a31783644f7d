"""The third-order predictor-corrector solvers (core.predictor_corrector, ``multistep3``): their weights, the
empirical order on the exact Gaussian toys of both stages, low-NFE behaviour on the bundled models, the shared
start, and the wiring through the registry and ``rdm generate``.

Exact references as in tests/test_solvers.py (the toys' probability-flow solutions, then the exact denoiser at
the last level). Measured values are quoted in each test's docstring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from relay_diffusion.checkpoints.bundled import bundled_network_paths
from relay_diffusion.checkpoints.loading import load_network
from relay_diffusion.cli import main as rdm
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.predictor_corrector import multistep3_edm_sampler, multistep3_relay_sampler, step_weights
from relay_diffusion.core.registry import nfe_first, nfe_second, solver
from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.core.samplers import relay_time_steps
from relay_diffusion.core.solvers import multistep_edm_sampler, multistep_relay_sampler
from relay_diffusion.generation import RelayStageConfig
from relay_diffusion.generation.stages import FixedBatchDenoiser
from test_solvers import LAT1, LAT2, NET1, NET2, PROC0, Counting, _err_first, _exact_first, _exact_second, _order, _rms
from test_stage_unit import snapshot, tiny

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64


def _err3_first(num_steps: int, **kw) -> float:
    return _rms(multistep3_edm_sampler(NET1, LAT1, None, num_steps=num_steps, **kw), _exact_first(num_steps))


def _err3_second(num_steps: int, **kw) -> float:
    x = multistep3_relay_sampler(NET2, LAT2, SeedGenerators([1, 2]), process=PROC0, num_steps=num_steps, **kw)
    return _rms(x, _exact_second(num_steps))


# ---------------------------------------------------------------------------------------------------------
# Weights


def test_weights_are_the_exact_integrals_of_the_interpolant():
    """Stage 1 (a = 1): closed forms (DDIM's 1 - e^-h; the linear interpolant adds (h - 1 + e^-h) times the
    slope). Relay stage: one point gives the reference's first-order step a' - e^-h a per frequency; three points
    integrate a quadratic in tau exactly, checked against t' int rho'(s) P(tau(s)) ds by a fine midpoint rule
    with rho' from central differences (an independent route: no integration by parts)."""
    h = 1.3
    assert step_weights([0.0], h)[0].item() == pytest.approx(-math.expm1(-h), rel=1e-14)
    w0, w1 = (w.item() for w in step_weights([0.0, -0.7], h))
    phi = h - 1 + math.exp(-h)
    assert (w0, w1) == (pytest.approx(-math.expm1(-h) + phi / 0.7, rel=1e-13), pytest.approx(-phi / 0.7, rel=1e-13))
    proc, t = BlurProcess(), 0.6
    a = lambda s: proc.factors(torch.tensor(s, dtype=F64))  # noqa: E731
    t_next = t * math.exp(-h)
    torch.testing.assert_close(step_weights([0.0], h, t, proc.factors)[0], a(t_next) - math.exp(-h) * a(t),
                               rtol=1e-13, atol=1e-15)
    taus = [0.0, -0.4, -0.9]
    poly = lambda tau: 0.3 + 1.7 * tau - 0.8 * tau**2  # noqa: E731
    got = sum(w * poly(tau) for w, tau in zip(step_weights(taus, h, t, proc.factors), taus))
    n = 20000
    s = t + (t_next - t) * (torch.arange(n, dtype=F64) + 0.5) / n  # midpoints from t to t'
    eps = 1e-6
    col = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    rho_dot = (proc.factors(s + eps) / col(s + eps) - proc.factors(s - eps) / col(s - eps)) / (2 * eps)
    tau = col(torch.log(t / s))
    want = t_next * (rho_dot * poly(tau)).sum(0) * (t_next - t) / n
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    assert (got - (a(t_next) - math.exp(-h) * a(t)) * 0.3).abs().max() > 0.1  # the higher terms matter


# ---------------------------------------------------------------------------------------------------------
# Order on the exact toys


def test_first_stage_order_three_and_controls():
    """Measured (32 -> 64 steps): multistep3 5.02e-4 -> 3.25e-5 (order 3.95: the corrector lifts the third-order
    predictor by one where it applies; the corrected first-order last step bounds the asymptotic order at 3
    with a constant that is tiny on this toy); with order=1 (DDIM + corrector) 1.98; 2M 2.16."""
    e32, e64 = _err3_first(32), _err3_first(64)
    assert _order(e32, e64, 32, 64) > 3.0, (e32, e64)
    assert e64 < _err_first("multistep", 64) / 20  # 3.3e-5 vs 1.9e-3
    control = _order(_err3_first(32, order=1), _err3_first(64, order=1), 32, 64)
    assert 1.6 < control < 2.5, control  # the same measurement sees a second-order method as one


def test_second_stage_order_three_and_the_corrector_control():
    """Blur toy (block noise off), grids 130 -> 258 (N' 46 -> 91): multistep3 1.74e-5 -> 1.55e-6 (order 3.54);
    without the corrector (and its re-basing) 2.11e-4 -> 4.16e-5 (2.38; the uncorrected first-order last step
    makes it second order); the 2M solver 2.91e-4 -> 8.27e-5 (1.84)."""
    n1, n2 = (len(relay_time_steps(n, 0.008, 80, 7, 0.9)) - 1 for n in (130, 258))
    e1, e2 = _err3_second(130), _err3_second(258)
    assert _order(e1, e2, n1, n2) > 3.0, (e1, e2)
    control = _order(_err3_second(130, corrector=False), _err3_second(258, corrector=False), n1, n2)
    assert control < 2.8, control


def test_low_nfe_on_the_toys_is_finite_and_bounded():
    """At 5..9 NFE both toys are far from asymptotic (errors change sign, 2M's too: 0.066 at 5 NFE, 0.0076 at 6,
    0.072 at 7): multistep3 stays finite and within 3x of 2M (stage 1 at 5 NFE: 0.154 vs 0.066; at 7: 0.0046
    vs 0.072); relay toy at the default grid (7 NFE): 0.013 vs 0.0079, at 10 NFE 0.0026 vs 0.0032."""
    for n in (5, 6, 7, 8, 9):
        e3, e2 = _err3_first(n), _err_first("multistep", n)
        assert math.isfinite(e3) and e3 < 3 * max(e2, 0.05), (n, e3, e2)
    assert _err3_second(28) < 0.0032 and _err3_second(18) < 0.02


# ---------------------------------------------------------------------------------------------------------
# The bundled models at low NFE


@pytest.fixture(scope="module")
def bundled():
    paths = bundled_network_paths()
    assert paths is not None, "the bundled networks are not installed"
    config = json.loads(Path(paths["second"]).with_suffix(".json").read_text())
    return load_network(paths["first"]), load_network(paths["second"]), BlurProcess.from_dict(config["blur"])


def test_bundled_first_stage_at_5_nfe_is_closer_than_2m(bundled):
    """Seeds 0, 1 against multistep3 with 32 steps: 5 NFE multistep3 0.120 vs 2M 0.125, 9 NFE 0.047 vs 0.059
    (16 seeds against Heun-512: benchmarks/RESULTS.md)."""
    net = bundled[0]
    lat = SeedGenerators([0, 1]).randn([3, 16, 16])
    with torch.inference_mode():
        fine = multistep3_edm_sampler(net, lat, None, num_steps=32)
        for n in (5, 9):
            e3 = _rms(multistep3_edm_sampler(net, lat, None, num_steps=n), fine)
            e2 = _rms(multistep_edm_sampler(net, lat, None, num_steps=n), fine)
            assert math.isfinite(e3) and e3 < e2, (n, e3, e2)


def test_bundled_relay_stage_at_8_nfe_is_closer_than_2m(bundled):
    """Seed 0, 8 rho-spaced levels from t_0 = 0.898 against multistep3 with 24 from the same start:
    measured 0.0051 vs 2M 0.0077."""
    net1, net2, proc = bundled
    t0 = float(relay_time_steps(18, 0.008, 80, 7, 0.9)[0])
    grid = dict(sigma_max=t0, truncation_sigma=t0 * (1 + 1e-9), process=proc)
    with torch.inference_mode():
        low = multistep3_edm_sampler(net1, SeedGenerators([0]).randn([3, 16, 16]), None, num_steps=9)
        up = F.interpolate(low, scale_factor=4, mode="nearest")
        fine = multistep3_relay_sampler(net2, up, SeedGenerators([0]), num_steps=24, **grid)
        e3 = _rms(multistep3_relay_sampler(net2, up, SeedGenerators([0]), num_steps=8, **grid), fine)
        e2 = _rms(multistep_relay_sampler(net2, up, SeedGenerators([0]), num_steps=8, s_noise=0.0, **grid), fine)
    assert math.isfinite(e3) and e3 < 0.85 * e2, (e3, e2)


# ---------------------------------------------------------------------------------------------------------
# Calls, draws, start


def test_one_call_per_step_deterministic_and_the_shared_relay_start():
    net = Counting(NET1)
    a = multistep3_edm_sampler(net, LAT1, None, num_steps=9)
    assert net.calls == 9 == nfe_first("multistep3", 9)
    torch.testing.assert_close(a, multistep3_edm_sampler(NET1, LAT1, None, num_steps=9), rtol=0, atol=0)
    proc = BlurProcess()  # block noise on: eps and eps' at the start
    ms, ms3 = Counting(NET2), Counting(NET2)
    multistep_relay_sampler(ms, LAT2, SeedGenerators([1, 2]), process=proc, num_steps=18, s_noise=0.0)
    rng = SeedGenerators([1, 2])
    multistep3_relay_sampler(ms3, LAT2, rng, process=proc, num_steps=18)
    torch.testing.assert_close(ms3.inputs[0][0], ms.inputs[0][0], rtol=0, atol=0)  # same start, same draws
    assert ms3.calls == nfe_second("multistep3", 18) == 7
    probe = SeedGenerators([1, 2])
    probe.randn_like(LAT2), probe.randn_like(LAT2)  # the start's eps, eps' and nothing after
    assert all(torch.equal(x, y) for x, y in zip(rng.get_state(), probe.get_state()))
    with pytest.raises(ValueError, match="s_noise must be 0"):
        multistep3_relay_sampler(NET2, LAT2, SeedGenerators([1, 2]), process=PROC0, s_noise=0.2)
    with pytest.raises(ValueError, match="order"):
        multistep3_edm_sampler(NET1, LAT1, None, order=4)


# ---------------------------------------------------------------------------------------------------------
# Registry and rdm generate


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("nets")
    return [f"--network_first={snapshot(root / 'a.safetensors', 4, 'edm', seed=1)}",
            "--network_second=" + str(snapshot(root / 'b.safetensors', 8, 'relay', seed=2,
                                                process=BlurProcess(up_scale=2)))]


def gen(outdir, *args):
    return CliRunner().invoke(rdm, ["generate", f"--outdir={outdir}", "--seeds=0-3", "--device=cpu",
                                    "--num_steps_first=6", "--num_steps_second=12", *map(str, args)])


def test_generate_with_multistep3_matches_the_library_and_counts_nfe(nets, tmp_path):
    result = gen(tmp_path / "m3", *nets, "--solver_first=multistep3", "--solver_second=multistep3",
                 "--s_noise_second=0")
    assert result.exit_code == 0, result.output
    assert "NFE per image (denoiser evaluations): 6 + 4 = 10" in result.output
    assert json.loads((tmp_path / "m3" / "generation.json").read_text())["nfe"] == [6, 4]
    first, second = tiny(4, seed=1), tiny(8, seed=2)
    rng = SeedGenerators(range(4))
    low = multistep3_edm_sampler(FixedBatchDenoiser(first), rng.randn([3, 4, 4]), rng, num_steps=6)
    up = low.repeat_interleave(2, 2).repeat_interleave(2, 3)
    high = multistep3_relay_sampler(FixedBatchDenoiser(second), up, rng, process=BlurProcess(up_scale=2),
                                    num_steps=12)
    expected = np.clip(high.numpy() * 127.5 + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    got = np.stack([np.asarray(Image.open(tmp_path / "m3" / f"{s:06d}.png")) for s in range(4)])
    np.testing.assert_array_equal(got, expected)
    # one stage at a time: the other stage's default solver (heun 11 NFE, reference 7)
    mixed = gen(tmp_path / "mix", *nets, "--solver_first=multistep3")
    assert mixed.exit_code == 0 and "NFE per image (denoiser evaluations): 6 + 7 = 13" in mixed.output, mixed.output
    assert json.loads((tmp_path / "mix" / "generation.json").read_text())["nfe"] == [6, 7]


@pytest.mark.parametrize("args, needle", [
    (["--solver_second=multistep3"], "s_noise_second"),  # the default s_noise 0.2 is refused
    (["--solver_second=multistep3", "--s_noise_second=0", "--churn_second"], "churn_second"),
    (["--solver_first=multistep3", "--sde_scale_first=0.05"], "sde_scale_first"),
])
def test_multistep3_refuses_what_it_cannot_do(nets, tmp_path, args, needle):
    result = gen(tmp_path / "x", *nets, *args)
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, result.output


def test_registry_entries():
    assert solver("edm", "multistep3").sampler is multistep3_edm_sampler
    assert solver("relay", "multistep3").sampler is multistep3_relay_sampler
    config = RelayStageConfig(solver="multistep3", s_noise=0.0).validate()
    assert config.nfe() == 7 and "churn" not in config.sampler_kwargs()
    with pytest.raises(ValueError, match="takes no s_noise"):
        RelayStageConfig(solver="multistep3").validate()
