"""Solver error at equal NFE on the bundled emoji models: our solvers against k-diffusion's, and the relay stage.

    PYTHONPATH=src python benchmarks/bench_solver_error.py [--seeds 16] [--cache work-data/solver_error]
                                                           [--out docs/solvers/error3.json] [--only first|second]

Stage 1: RMS (images in [-1, 1], all pixels of all seeds) to Heun with 512 steps, at 5, 7, 9, 12, 16, 25 NFE on
the Karras grid (rho 7, sigma_min 0.002, sigma_max 80), from the same latents (seeds 0..15): our heun,
multistep (2M) and multistep3, and k-diffusion's deterministic samplers on the SAME network, latents and grid
(``time_steps``; float64 state, float32 network calls like ours): sample_euler, sample_heun, sample_dpmpp_2m,
sample_dpmpp_3m_sde (eta 0), sample_lms (order 4), sample_dpmpp_2s_ancestral (eta 0). NFE are counted by
wrapping the network; where a sampler cannot hit a budget exactly (2 NFE per step) the next budget above it
is used (it gets more evaluations, not fewer) and its NFE is shown.

k-diffusion is optional (``pip install --no-deps k-diffusion torchdiffeq``; it needs scipy, torchdiffeq and
tqdm). Its package ``__init__`` imports its training stack, so only ``k_diffusion/sampling.py`` is loaded, with
a stand-in for its ``utils`` (``append_dims``) and, when torchsde is missing, for ``torchsde`` (only its
stochastic noise samplers use it; every sampler here runs with eta 0 and a zero noise sampler). Without
k-diffusion its rows are left out.

Relay stage (deterministic, s_noise 0): its input is the Heun-512 stage-1 image; grids of N rho-spaced levels
from the default grid's truncation level t_0 = 0.898 down to 0.008 (N NFE for both 1-NFE solvers, the same
start draws for all N), N = 8, 10, 12, 16, 20, 24; reference: multistep (2M) with 512 levels, cross-checked
against multistep3 with 256. References are kept in ``--cache``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
import types
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from relay_diffusion.checkpoints.bundled import ASSETS, bundled_network_paths
from relay_diffusion.checkpoints.loading import load_network
from relay_diffusion.core.predictor_corrector import multistep3_edm_sampler, multistep3_relay_sampler
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.core.samplers import edm_sampler, relay_time_steps, time_steps
from relay_diffusion.core.solvers import multistep_edm_sampler, multistep_relay_sampler

BUDGETS = [5, 7, 9, 12, 16, 25]
RELAY_NFE = [8, 10, 12, 16, 20, 24]
F64 = torch.float64


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).square().mean().sqrt().item()


class Counted:
    """The network as k-diffusion calls it, ``model(x, sigma)``, counting evaluations."""

    def __init__(self, net: Callable) -> None:
        self.net, self.calls = net, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **unused) -> torch.Tensor:
        self.calls += 1
        return self.net(x.to(torch.float32), sigma.to(torch.float32), None).to(x.dtype)


def load_k_diffusion_sampling() -> types.ModuleType | None:
    """``k_diffusion/sampling.py`` alone (module docstring), or None when k-diffusion is not installed."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "sampling.py"
    package, utils = types.ModuleType("_kdiffusion"), types.ModuleType("_kdiffusion.utils")
    package.__path__ = []
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package.utils = utils
    sys.modules.update({"_kdiffusion": package, "_kdiffusion.utils": utils})
    if importlib.util.find_spec("torchsde") is None:
        sys.modules["torchsde"] = types.ModuleType("torchsde")
    module_spec = importlib.util.spec_from_file_location("_kdiffusion.sampling", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def k_samplers(k: types.ModuleType) -> dict[str, tuple[Callable, Callable[[int], int]]]:
    """name -> (run(model, x, sigmas), NFE of a grid of n levels)."""
    def zero(*_):
        return 0

    return {
        "k euler": (lambda m, x, s: k.sample_euler(m, x, s, disable=True), lambda n: n),
        "k heun": (lambda m, x, s: k.sample_heun(m, x, s, disable=True), lambda n: 2 * n - 1),
        "k dpmpp_2m": (lambda m, x, s: k.sample_dpmpp_2m(m, x, s, disable=True), lambda n: n),
        "k dpmpp_3m_sde eta 0": (lambda m, x, s: k.sample_dpmpp_3m_sde(m, x, s, disable=True, eta=0.0,
                                                                       noise_sampler=zero), lambda n: n),
        "k lms order 4": (lambda m, x, s: k.sample_lms(m, x, s, disable=True, order=4), lambda n: n),
        "k dpmpp_2s_ancestral eta 0": (lambda m, x, s: k.sample_dpmpp_2s_ancestral(m, x, s, disable=True, eta=0.0,
                                                                                   noise_sampler=zero),
                                       lambda n: 2 * n - 1),
    }


def steps_for(budget: int, nfe: Callable[[int], int]) -> int:
    """The fewest levels whose NFE reach ``budget``."""
    return next(n for n in range(1, 1000) if nfe(n) >= budget)


def cached(cache: Path, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    path = cache / f"{name}.pt"
    if path.exists():
        return torch.load(path)
    t0 = time.time()
    value = make()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(value, path)
    print(f"  reference {name}: {time.time() - t0:.0f} s", flush=True)
    return value


def first_stage_reference(net, latents, cache: Path, seeds: int) -> torch.Tensor:
    return cached(cache, f"first-heun512-{seeds}",
                  lambda: edm_sampler(net, latents, SeedGenerators(range(seeds)), num_steps=512))


def first_stage(net, latents, fine: torch.Tensor, seeds: int) -> dict:
    ours = {"heun": (lambda n: edm_sampler(net, latents, SeedGenerators(range(seeds)), num_steps=n),
                     lambda n: 2 * n - 1),
            "multistep": (lambda n: multistep_edm_sampler(net, latents, None, num_steps=n), lambda n: n),
            "multistep3": (lambda n: multistep3_edm_sampler(net, latents, None, num_steps=n), lambda n: n)}
    rows = {}
    for name, (run, nfe) in ours.items():
        rows[name] = []
        for budget in BUDGETS:
            n = steps_for(budget, nfe)
            rows[name].append(dict(nfe=nfe(n), num_steps=n, rms=rms(run(n), fine)))
        print(f"  {name:28s}", " ".join(f"{r['rms']:.4f}({r['nfe']})" for r in rows[name]), flush=True)
    k = load_k_diffusion_sampling()
    if k is None:
        print("  k-diffusion is not installed: its rows are left out")
    else:
        for name, (run, nfe) in k_samplers(k).items():
            rows[name] = []
            for budget in BUDGETS:
                n = steps_for(budget, nfe)
                sigmas = time_steps(n, 0.002, 80, 7, net)
                model = Counted(net)
                x = run(model, latents.to(F64) * sigmas[0], sigmas)
                rows[name].append(dict(nfe=model.calls, num_steps=n, rms=rms(x, fine)))
            print(f"  {name:28s}", " ".join(f"{r['rms']:.4f}({r['nfe']})" for r in rows[name]), flush=True)
    return dict(reference="heun 512 steps (1023 NFE)", budgets=BUDGETS, rows=rows)


def second_stage(net, process: BlurProcess, low: torch.Tensor, cache: Path, seeds: int) -> dict:
    latents = F.interpolate(low.to(F64), scale_factor=process.up_scale, mode="nearest")
    t0 = float(relay_time_steps(18, 0.008, 80, 7, 0.9)[0])
    grid = dict(process=process, sigma_max=t0, truncation_sigma=t0 * (1 + 1e-9))
    solvers = {"multistep": lambda n: multistep_relay_sampler(net, latents, SeedGenerators(range(seeds)), num_steps=n,
                                                              s_noise=0.0, **grid),
               "multistep3": lambda n: multistep3_relay_sampler(net, latents, SeedGenerators(range(seeds)),
                                                                num_steps=n, **grid)}
    fine = cached(cache, f"second-multistep512-{seeds}", lambda: solvers["multistep"](512))
    check = cached(cache, f"second-multistep3_256-{seeds}", lambda: solvers["multistep3"](256))
    print(f"  t0 {t0:.4f}; reference multistep 512 vs multistep3 256: {rms(fine, check):.2e}", flush=True)
    rows = {}
    for name, run in solvers.items():
        rows[name] = [dict(nfe=n, rms=rms(run(n), fine)) for n in RELAY_NFE]
        print(f"  {name:12s}", " ".join(f"{r['rms']:.3e}({r['nfe']})" for r in rows[name]), flush=True)
    return dict(t0=t0, reference="multistep 512 levels from t0", reference_vs_multistep3_256=rms(fine, check),
                rows=rows)


def markdown(first: dict | None, second: dict | None) -> str:
    lines = []
    if first:
        lines += ["Stage 1, RMS to Heun-512 (NFE in brackets where it differs from the column's):", "",
                  "| solver | " + " | ".join(f"{b} NFE" for b in BUDGETS) + " |",
                  "|---|" + "---|" * len(BUDGETS)]
        best_k = [min((r[i]["rms"] for name, r in first["rows"].items() if name.startswith("k ")), default=math.inf)
                  for i in range(len(BUDGETS))]
        for name, rows in first["rows"].items():
            cells = [f"{r['rms']:.4f}" + ("" if r["nfe"] == b else f" ({r['nfe']})") for r, b in zip(rows, BUDGETS)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        ours = [min(first["rows"][s][i]["rms"] for s in ("heun", "multistep", "multistep3"))
                for i in range(len(BUDGETS))]
        if all(math.isfinite(v) for v in best_k):
            lines.append("| best ours / best k-diffusion | " + " | ".join(f"{o / k:.2f}" for o, k in zip(ours, best_k))
                         + " |")
        lines.append("")
    if second:
        lines += [f"Relay stage (s_noise 0), RMS to multistep with 512 levels from t_0 = {second['t0']:.3f} "
                  f"(that reference vs multistep3 with 256: {second['reference_vs_multistep3_256']:.1e}):", "",
                  "| solver | " + " | ".join(f"{n} NFE" for n in RELAY_NFE) + " |",
                  "|---|" + "---|" * len(RELAY_NFE)]
        for name, rows in second["rows"].items():
            lines.append(f"| {name} | " + " | ".join(f"{r['rms']:.2e}" for r in rows) + " |")
        ratio = [a["rms"] / b["rms"] for a, b in zip(second["rows"]["multistep3"], second["rows"]["multistep"])]
        lines.append("| multistep3 / multistep | " + " | ".join(f"{v:.2f}" for v in ratio) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--cache", type=Path, default=Path("work-data/solver_error"), help="references are kept here")
    ap.add_argument("--out", type=Path, default=Path("docs/solvers/error3.json"))
    ap.add_argument("--only", choices=["first", "second"], default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = bundled_network_paths()
    if paths is None:
        raise SystemExit(f"the bundled networks are not installed in {ASSETS}")
    config = json.loads((ASSETS / "stage2-64x64.json").read_text())
    net1, net2 = load_network(paths["first"]), load_network(paths["second"])
    process = BlurProcess.from_dict(config["blur"])
    latents = SeedGenerators(range(args.seeds)).randn([net1.img_channels, net1.img_resolution, net1.img_resolution])
    t0 = time.time()
    out: dict = {"seeds": args.seeds, "pixel_scale": "images in [-1, 1]"}
    first = second = None
    with torch.inference_mode():
        fine = first_stage_reference(net1, latents, args.cache, args.seeds)
        if args.only in (None, "first"):
            print("stage 1", flush=True)
            first = first_stage(net1, latents, fine, args.seeds)
            out["first"] = first
        if args.only in (None, "second"):
            print("relay stage", flush=True)
            second = second_stage(net2, process, fine, args.cache, args.seeds)
            out["second"] = second
    out["seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists():  # keep the other stage's rows of an earlier run
        out = {**json.loads(args.out.read_text()), **out}
    args.out.write_text(json.dumps(out, indent=1))
    print(markdown(first, second))
    print(f"wrote {args.out} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
