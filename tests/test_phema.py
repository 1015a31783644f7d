"""Post-hoc EMA (EDM2 section 3): the power-function maths, the profiles tracked during training
(kept across a resume), the reconstruction of another EMA length, ``rdm ema`` and its loss sweep, and
``rdm train --config``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import integrate

from relay_diffusion.cli import main as rdm
from relay_diffusion.checkpoints.loading import load_network
from relay_diffusion.training.phema import (
    PowerEMATracker, gamma_of_sigma_rel, posthoc_coefficients, power_ema_beta, profile_fit_error, profile_inner,
    sigma_rel_of_gamma,
)
from relay_diffusion.training.posthoc import profile_snapshot_path
from relay_diffusion.training.state import latest_state, load_state

from test_training import TINY_ARGS, write_dataset

PROFILES = "0.05,0.10,0.15"
# 24 steps of 8 images, one tick per step, profile snapshots every 2 ticks.
RUN_ARGS = ["--batch=8", "--lr=2e-3", "--ema=0.0001", "--seed=5", "--tick=0.008", "--snap=2", "--dump=6",
            "--grid=0", "--workers=0", f"--ema-profiles={PROFILES}", *TINY_ARGS]
STEPS = 24


pytestmark = pytest.mark.usefixtures("single_thread")


def invoke(*args) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(rdm, [str(a) for a in args])


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """An uninterrupted tiny stage-1 run tracking three EMA profiles."""
    root = tmp_path_factory.mktemp("phema")
    data = write_dataset(root / "plain-8x8.zip", 24, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = invoke("train", "--outdir", root / "runs", "--data", data, f"--duration={STEPS * 8 / 1e6}",
                        *RUN_ARGS)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return next((root / "runs").iterdir())


def flat(net_or_state) -> torch.Tensor:
    state = net_or_state.state_dict() if isinstance(net_or_state, torch.nn.Module) else net_or_state
    return torch.cat([v.flatten().double() for k, v in sorted(state.items()) if v.is_floating_point()])


# --- the maths --------------------------------------------------------------------------------------------
def test_sigma_rel_and_gamma():
    for gamma in (0.5, 3.0, 6.94, 16.97, 100.0):
        assert gamma_of_sigma_rel(sigma_rel_of_gamma(gamma)) == pytest.approx(gamma, rel=1e-10)
    # EDM2's two default profiles (paper, section 3.2): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    for bad in (0.0, -0.1, 0.29, math.nan):
        with pytest.raises(ValueError, match="sigma_rel"):
            gamma_of_sigma_rel(bad)


def test_inner_product_matches_numerical_integration():
    def profile(t, g):
        return lambda tau: (g + 1) * tau ** g / t ** (g + 1) if tau <= t else 0.0

    for (ta, ga, tb, gb) in [(100.0, 6.9, 250.0, 16.9), (300.0, 2.0, 120.0, 0.5), (50.0, 3.0, 50.0, 3.0)]:
        pa, pb = profile(ta, ga), profile(tb, gb)
        expected = integrate.quad(lambda x: pa(x) * pb(x), 0, min(ta, tb), epsabs=0, epsrel=1e-12)[0]
        assert float(profile_inner(ta, ga, tb, gb)) == pytest.approx(expected, rel=1e-9)
        assert float(profile_inner(ta, ga, tb, gb)) == pytest.approx(float(profile_inner(tb, gb, ta, ga)))


def test_tracked_weights_are_the_profile_integrated_over_each_step():
    """After steps ending at t_1 < ... < t_k, step j's network has weight (t_j^(g+1) - t_(j-1)^(g+1)) / t_k^(g+1)
    (module docstring), also when the batch changes."""
    net = torch.nn.Linear(1, 1, bias=False).double()
    tracker = PowerEMATracker(net, [0.1])
    gamma = tracker.gammas[0]
    batches = [8] * 5 + [16] * 4 + [4] * 3
    times = np.cumsum(batches)
    thetas = np.random.default_rng(0).normal(size=len(batches))
    for theta, t, b in zip(thetas, times, batches):
        net.weight.data.fill_(theta)
        tracker.update(net, int(t), b)
    prev = np.concatenate([[0], times[:-1]])
    weights = (times ** (gamma + 1) - prev ** (gamma + 1)) / times[-1] ** (gamma + 1)
    assert float(tracker.emas[0].weight) == pytest.approx(float(weights @ thetas), rel=1e-12)
    assert power_ema_beta(gamma, 8, 8) == 0  # the first step replaces the initial weights


def test_reconstruction_of_a_synthetic_trajectory():
    """Track 0.05, 0.10 and 0.15 on a random-walk trajectory; rebuild 0.10 from the 0.05 and 0.15 snapshots
    only. It matches the tracked 0.10 closely, while other lengths do not (so the check can fail)."""
    rng = np.random.default_rng(1)
    steps, batch, every = 400, 8, 10
    trajectory = np.cumsum(rng.normal(size=(steps, 20)), axis=0) * 0.05 + np.linspace(0, 2, steps)[:, None]
    net = torch.nn.Linear(20, 1, bias=False).double()
    tracker = PowerEMATracker(net, [0.05, 0.10, 0.15])
    snapshots = []  # (nimg, sigma_rel, weights)
    for k in range(steps):
        net.weight.data.copy_(torch.from_numpy(trajectory[k])[None])
        tracker.update(net, (k + 1) * batch, batch)
        if (k + 1) % every == 0:
            for s, ema in zip(tracker.sigma_rels, tracker.emas):
                snapshots.append(((k + 1) * batch, s, ema.weight.detach().numpy()[0].copy()))
    final = steps * batch
    tracked = {s: w for t, s, w in snapshots if t == final}
    inputs = [x for x in snapshots if x[1] != 0.10]

    def rebuild(sigma_rel):
        coefs = posthoc_coefficients([x[0] for x in inputs], [x[1] for x in inputs], final, sigma_rel)
        assert coefs.sum() == pytest.approx(1.0)
        return sum(c * x[2] for c, x in zip(coefs, inputs)), coefs

    rebuilt, coefs = rebuild(0.10)
    scale = np.abs(tracked[0.10] - tracked[0.05]).max()
    assert np.abs(rebuilt - tracked[0.10]).max() < 2e-3 * scale
    fit = profile_fit_error([x[0] for x in inputs], [x[1] for x in inputs], final, 0.10, coefs)
    assert fit < 1e-2
    for other in (0.07, 0.13):
        assert np.abs(rebuild(other)[0] - tracked[0.10]).max() > 0.1 * scale
    # A tracked length among the inputs is reproduced exactly.
    own = [x for x in snapshots if x[1] == 0.05]
    coefs = posthoc_coefficients([x[0] for x in own], [x[1] for x in own], final, 0.05)
    np.testing.assert_allclose(coefs, np.eye(len(own))[-1], atol=1e-8)


# --- a toy run --------------------------------------------------------------------------------------------
def test_profile_snapshots_written_at_every_snap(toy_run):
    names = sorted(p.name for p in (toy_run / "phema").glob("*.safetensors"))
    assert len(names) == 3 * 13  # ticks 0, 2, ..., 22 and the end (tick 23), three profiles each
    net = load_network(profile_snapshot_path(toy_run, STEPS * 8, 0.10))
    assert net(torch.zeros(1, 3, 8, 8), torch.ones(1)).shape == (1, 3, 8, 8)
    state = load_state(latest_state(toy_run))
    assert state["phema"]["sigma_rels"] == [0.05, 0.10, 0.15]
    for s, sd in zip(state["phema"]["sigma_rels"], state["phema"]["emas"]):
        snap = load_network(profile_snapshot_path(toy_run, STEPS * 8, s)).state_dict()
        assert all(torch.equal(snap[k], v) for k, v in sd.items())


def test_rdm_ema_reconstructs_a_tracked_length(toy_run, tmp_path):
    tracked = load_network(profile_snapshot_path(toy_run, STEPS * 8, 0.10))
    out = {}
    for name, length in (("r10", 0.10), ("r05", 0.05), ("r13", 0.13)):
        result = invoke("ema", "--run", toy_run, "--length", length, "--from-profiles", "0.05,0.15",
                        "--out", tmp_path / f"{name}.safetensors")
        assert result.exit_code == 0, result.output
        out[name] = load_network(tmp_path / f"{name}.safetensors")
    ref = flat(tracked)

    def rel(net):
        return float((flat(net) - ref).norm() / ref.norm())

    assert rel(out["r10"]) < 1e-4, rel(out["r10"])
    assert rel(out["r05"]) > 50 * rel(out["r10"]) and rel(out["r13"]) > 20 * rel(out["r10"])
    # With the 0.10 snapshots among the inputs, they alone are used: identical to float32 rounding.
    result = invoke("ema", "--run", toy_run, "--length", "0.1", "--out", tmp_path / "all.safetensors")
    assert result.exit_code == 0, result.output
    assert float((flat(load_network(tmp_path / "all.safetensors")) - ref).abs().max()) < 1e-6

    # The file carries the snapshots' config extras, loads like any snapshot and generates.
    from relay_diffusion.checkpoints.snapshot import read_config

    snapshot = sorted(toy_run.glob("network-snapshot-*.safetensors"))[-1]
    meta, snap_meta = read_config(tmp_path / "r10.safetensors"), read_config(snapshot)
    assert meta["stage"] == snap_meta["stage"] == 1 and meta["training"] == snap_meta["training"]
    assert meta["posthoc_ema"]["sigma_rel"] == 0.10 and meta["posthoc_ema"]["nimg"] == STEPS * 8
    assert len(meta["posthoc_ema"]["inputs"]) == 2 * 13
    result = invoke("generate", "--sampler_stages=first", "--network_first", tmp_path / "r10.safetensors",
                    "--seeds=0-1", "--num_steps_first=2", "--outdir", tmp_path / "gen")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "gen").rglob("*.png")) == ["000000.png", "000001.png"]


def test_rdm_ema_sweep_writes_a_plot(toy_run, tmp_path):
    import PIL.Image

    png = tmp_path / "sweep.png"
    result = invoke("ema", "--run", toy_run, "--sweep", "0.04,0.08,0.12,0.2", "--images=8", "--repeats=1",
                    "--device=cpu", "--out", png)
    assert result.exit_code == 0, result.output
    with PIL.Image.open(png) as im:
        assert im.size == (720, 420)
    values = json.loads(png.with_suffix(".json").read_text())
    assert [p["sigma_rel"] for p in values["points"]] == [0.04, 0.08, 0.12, 0.2]
    assert [p["sigma_rel"] for p in values["tracked"]] == [0.05, 0.10, 0.15]
    assert all(math.isfinite(p["loss"]) and p["loss"] > 0 for p in values["points"] + values["tracked"])
    assert "Best EMA length" in result.output


@pytest.mark.parametrize("args,message", [
    (["--run", "/no/such/run", "--length=0.1"], "--run: no such run folder"),
    (["--length=0.1"], "--run:"),
    (["--run", "{run}", "--length=0.4"], "--length: EMA length sigma_rel must be in"),
    (["--run", "{run}", "--length=abc"], "--length: expected comma-separated numbers"),
    (["--run", "{run}", "--length=0.1,0.2"], "--length: give one EMA length"),
    (["--run", "{run}"], "--length: give either --length or --sweep"),
    (["--run", "{run}", "--length=0.1", "--nimg=12345"], "--nimg: no snapshot at 12345 images"),
    (["--run", "{run}", "--length=0.1", "--from-profiles=0.2"], "--from-profiles: [0.2] not tracked"),
    (["--run", "{run}", "--length=0.1", "--out=x.pt"], "--out: expected a .safetensors"),
    (["--run", "{run}", "--sweep=0.1,0.3"], "--sweep: EMA length sigma_rel must be in"),
    (["--run", "{plain}", "--length=0.1"], "holds no post-hoc EMA snapshots"),
    (["--run", "{damaged}", "--length=0.1"], "is not a readable post-hoc EMA snapshot"),
])
def test_rdm_ema_bad_input_is_one_line(toy_run, tmp_path, args, message):
    plain = tmp_path / "plain-run"
    plain.mkdir()
    damaged = tmp_path / "damaged-run"
    (damaged / "phema").mkdir(parents=True)
    (damaged / "phema" / "phema-000000000008-0.0500.safetensors").write_bytes(b"\x10\x00not a safetensors file")
    args = [a.format(run=toy_run, plain=plain, damaged=damaged) for a in args]
    result = invoke("ema", *args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    assert result.exc_info is None or result.exc_info[0] is SystemExit


# --- resume, --config ------------------------------------------------------------------------------------
def test_resume_via_config_keeps_the_profiles_bit_identical(toy_run, tmp_path):
    """Half the toy run, then `rdm train --config <its options> --resume <its folder> --duration <full>`:
    the network, EMA, optimizer and all three tracked profiles end bit-identical to the uninterrupted run."""
    options = json.loads((toy_run / "training_options.json").read_text())
    data = options["config"]["data"]
    result = invoke("train", "--outdir", tmp_path, "--data", data, f"--duration={STEPS // 2 * 8 / 1e6}", *RUN_ARGS)
    assert result.exit_code == 0, result.output
    half = next(tmp_path.iterdir())
    assert load_state(latest_state(half))["step"] == STEPS // 2
    # --config restores every option (the seed included: drop it from the file to check it is the recorded one).
    saved = json.loads((half / "training_options.json").read_text())
    saved["config"]["seed"] = None
    (tmp_path / "options.json").write_text(json.dumps(saved))
    result = invoke("train", "--config", tmp_path / "options.json", "--resume", half,
                    f"--duration={STEPS * 8 / 1e6}")
    assert result.exit_code == 0, result.output
    assert "Resumed from" in result.output
    ref, resumed = load_state(latest_state(toy_run)), load_state(latest_state(half))
    assert resumed["step"] == ref["step"] == STEPS
    for key in ("net", "ema"):
        assert all(torch.equal(resumed[key][k], v) for k, v in ref[key].items()), key
    for a, b in zip(ref["phema"]["emas"], resumed["phema"]["emas"]):
        assert all(torch.equal(b[k], v) for k, v in a.items())
    rerun_options = json.loads((half / "training_options.json").read_text())["config"]
    assert rerun_options["ema_profiles"] == [0.05, 0.10, 0.15] and rerun_options["seed"] == 5

    # Other profiles than the state's cannot continue it.
    result = invoke("train", "--config", half / "training_options.json", "--resume", half,
                    "--ema-profiles=0.05", f"--duration={(STEPS + 2) * 8 / 1e6}")
    assert result.exit_code == 2 and "--ema-profiles" in result.output, result.output


def test_config_flags_override_and_errors(toy_run, tmp_path):
    options = toy_run / "training_options.json"
    result = invoke("train", "--config", options, "--lr=0.01", "--outdir", tmp_path / "o", "-n")
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.output)["config"]
    assert cfg["lr"] == 0.01 and cfg["outdir"] == str(tmp_path / "o")  # given here
    assert cfg["cbase"] == 16 and cfg["snap"] == 2 and cfg["seed"] == 5 and cfg["resume"] is None  # from the file
    assert cfg["ema_profiles"] == [0.05, 0.10, 0.15]
    result = invoke("train", "--config", options, "--fp16=1", "-n")
    assert json.loads(result.output)["config"]["precision"] == "fp16"
    (tmp_path / "bad.json").write_text("{}")
    for path, message in ((tmp_path / "missing.json", "cannot read"), (tmp_path / "bad.json", "no \"config\"")):
        result = invoke("train", "--config", path, "-n")
        assert result.exit_code == 2 and "'--config'" in result.output and message in result.output, result.output
    result = invoke("train", "--data", "x.zip", "-n")
    assert result.exit_code == 2 and "'--outdir'" in result.output, result.output
    result = invoke("train", "--config", options, "--ema-profiles=0.05,0.5", "-n")
    assert result.exit_code == 2 and "--ema-profiles" in result.output, result.output


@pytest.mark.parametrize("mode", ["length", "sweep"])
def test_rdm_ema_refuses_non_finite_snapshots_and_writes_nothing(toy_run, tmp_path, mode):
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    victim = profile_snapshot_path(run, STEPS * 8, 0.05)
    tensors = load_file(str(victim))
    first = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    from safetensors import safe_open

    with safe_open(str(victim), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(victim), metadata=metadata)
    before = sorted(p.name for p in run.rglob("*"))
    out = tmp_path / ("net.safetensors" if mode == "length" else "sweep.png")
    args = ["--length", "0.1", "--from-profiles", "0.05,0.15"] if mode == "length" else \
        ["--sweep", "0.04,0.08", "--images=4", "--repeats=1", "--device=cpu"]
    result = invoke("ema", "--run", run, *args, "--out", out)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and victim.name in lines[0] and "non-finite" in lines[0], result.output
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert sorted(p.name for p in run.rglob("*")) == before
