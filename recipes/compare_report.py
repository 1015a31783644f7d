"""Helpers of recipes/compare.sh: the held-out stage inputs, and the report (tables, grids, budgets).

    python recipes/compare_report.py inputs HELDOUT_16.zip OUTDIR     # {i:06d}.png, i-th image by name
    python recipes/compare_report.py report --work WORK --out docs/compare
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

#: The arms: their runs (training budget) and their sample folders under WORK/eval.
ARMS = {
    "relay": dict(runs=["relay1", "relay2"], samples="relay",
                  label="relay: stage 1 (16x16) + relay stage (64x64)"),
    "single": dict(runs=["single"], samples="single", label="single-stage EDM at 64x64"),
    "sr": dict(runs=["relay1", "sr"], samples="sr", label="cascade: stage 1 + super-resolution stage"),
    "noblock": dict(runs=["relay1", "noblock"], samples="noblock", label="relay without block noise"),
}
#: The 64x64 stages fed the real 16x16 images of the held-out emoji.
SR_ARMS = {"relay2": "relay stage", "sr": "super-resolution stage", "noblock": "relay stage, no block noise"}


def zip_images(path: Path) -> list[np.ndarray]:
    """The images of a dataset zip, sorted by name, as ``[H, W, 3]`` uint8."""
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))
        out = []
        for name in names:
            with z.open(name) as f:
                out.append(np.asarray(Image.open(f).convert("RGB")))
    return out


def folder_images(folder: Path, count: int | None = None) -> list[np.ndarray]:
    files = sorted(folder.glob("*.png"))[:count]
    return [np.asarray(Image.open(p).convert("RGB")) for p in files]


def cmd_inputs(args) -> int:
    out = Path(args.outdir)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty", file=sys.stderr)
        return 1
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    images = zip_images(Path(args.zip))
    for i, a in enumerate(images):
        Image.fromarray(a).save(tmp / f"{i:06d}.png")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    print(f"{len(images)} input images in {out}")
    return 0


# ---------------------------------------------------------------------------------------------------------
def run_budget(run_root: Path) -> dict:
    """CPU seconds (this process's, all threads), wall seconds, kimg and steps of the latest run in ``run_root``."""
    runs = sorted(p for p in run_root.iterdir() if p.is_dir()) if run_root.is_dir() else []
    if not runs:
        return {}
    records = {}
    stats = runs[-1] / "stats.jsonl"
    for line in stats.read_text().splitlines() if stats.is_file() else []:
        if line.strip():
            r = json.loads(line)
            # keyed by step: a resumed run numbers its ticks from 0 again, and drops the records after its state
            records[r["step"]] = r
    if not records:
        return {}
    last = records[max(records)]
    cpu = sum(r.get("cpu_sec_per_tick", r["sec_per_tick"]) for r in records.values())
    wall = sum(r["sec_per_tick"] for r in records.values())
    done = (runs[-1] / "log.txt").is_file() and "Done:" in (runs[-1] / "log.txt").read_text()
    return {"run": str(runs[-1]), "cpu_sec": cpu, "wall_sec": wall, "kimg": last["kimg"], "steps": last["step"],
            "done": done}


def metrics(path: Path) -> dict:
    return json.loads(path.read_text())["metrics"] if path.is_file() else {}


def grid(images: list[np.ndarray], cols: int = 8) -> Image.Image:
    h, w, _ = images[0].shape
    rows = math.ceil(len(images) / cols)
    canvas = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, a in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = a
    return Image.fromarray(canvas)


def heldout_figure(work: Path, truth: list[np.ndarray], count: int = 10) -> Image.Image | None:
    """Rows: held-out emoji; columns: the 16x16 input (upsampled), each stage's output, the real 64x64 image."""
    e = work / "eval"
    if not (e / "heldout16").is_dir():
        return None
    step = max(1, len(truth) // count)
    picks = list(range(0, len(truth), step))[:count]
    columns = [[np.asarray(Image.open(e / "heldout16" / f"{i:06d}.png").convert("RGB").resize((64, 64),
                                                                                               Image.NEAREST))
                for i in picks]]
    for arm in SR_ARMS:
        folder = e / f"sr-heldout-{arm}"
        if not (folder / f"{picks[-1]:06d}.png").is_file():
            return None
        columns.append([np.asarray(Image.open(folder / f"{i:06d}.png").convert("RGB")) for i in picks])
    columns.append([truth[i] for i in picks])
    cells = [columns[c][r] for r in range(len(picks)) for c in range(len(columns))]
    return label_heldout(grid(cells, cols=len(columns)), every=step, total=len(truth))


#: The columns of :func:`heldout_figure`, two lines each (the 64x64 stages of SR_ARMS between input and truth).
HELDOUT_COLUMNS = [("input 16x16", "(upsampled)"), ("relay stage", "64x64"), ("super-resolution", "stage 64x64"),
                   ("relay stage, no", "block noise, 64x64"), ("real image", "64x64")]


def label_heldout(fig: Image.Image, every: int, total: int) -> Image.Image:
    """The held-out grid with a title, a label over each column (what it shows, in pixels) and the rows named."""
    return label_grid(fig, ["Held-out emoji (never seen in training, in any variant): the 64x64 stages",
                            "fed the real 16x16 image; each image 64x64 pixels, shown at 2x"],
                      HELDOUT_COLUMNS, f"held-out emoji, one per row (numbers 0, {every}, {2 * every}, ... of {total})")


def label_grid(fig: Image.Image, title: list[str], columns: list[tuple[str, ...]], ylabel: str,
               scale: int = 2) -> Image.Image:
    """An image grid enlarged ``scale`` times (nearest), with title lines above it, a label over each column and
    ``ylabel`` upright along the left: the style of the training loss plot (Pillow's default font, black on white)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    body = fig.resize((fig.width * scale, fig.height * scale), Image.NEAREST)
    left, top = 20, 14 * len(title) + 14 * max(len(c) for c in columns) + 14
    out = Image.new("RGB", (left + body.width + 6, top + body.height + 6), "white")
    out.paste(body, (left, top))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(title):
        draw.text((left, 4 + 14 * i), line, fill="black", font=font)
    width = body.width / len(columns)
    for c, lines in enumerate(columns):
        for k, line in enumerate(lines):
            x = left + width * c + (width - 6 * len(line)) / 2
            draw.text((x, 14 * len(title) + 10 + 14 * k), line, fill="black", font=font)
    label = Image.new("RGB", (6 * len(ylabel) + 4, 12), "white")  # written, then turned upright
    ImageDraw.Draw(label).text((2, 0), ylabel, fill="black", font=font)
    label = label.rotate(90, expand=True)
    out.paste(label, (4, top + max(0, (body.height - label.height) // 2)))
    return out


def sr_fidelity(work: Path, arm: str, truth: list[np.ndarray], inputs: list[np.ndarray]) -> dict:
    """Per-image agreement of a stage's outputs for the held-out inputs: PSNR against the real 64x64 images and
    the RMS difference between the box-downsampled output and its 16x16 input (consistency), in grey levels."""
    e = work / "eval"
    folder = e / f"sr-heldout-{arm}"
    if not (folder / f"{len(truth) - 1:06d}.png").is_file():
        return {}
    out = np.stack(folder_images(folder)).astype(np.float64)
    t, low = np.stack(truth).astype(np.float64), np.stack(inputs).astype(np.float64)
    mse = ((out - t) ** 2).reshape(len(t), -1).mean(1)
    psnr = float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))
    down = out.reshape(len(out), 16, 4, 16, 4, 3).mean((2, 4))
    return {"psnr_db": psnr, "consistency_rms": float(np.sqrt(((down - low) ** 2).mean()))}


def fid_sampling_error(sample: Path, ref: Path, boots: int = 10, seed: int = 0) -> dict:
    """FID of the two disjoint halves of the samples (even and odd seeds), and the standard deviation of FID
    over bootstrap resamples of all of them, both against ``ref``."""
    if not (sample.is_file() and ref.is_file()):
        return {}
    from relay_diffusion.metrics.scores import feature_statistics, frechet_distance

    f, r = np.load(sample)["feat"].astype(np.float64), np.load(ref)["feat"].astype(np.float64)
    mu_r, sig_r = feature_statistics(r)
    fid = lambda x: float(frechet_distance(*feature_statistics(x), mu_r, sig_r))  # noqa: E731
    rng = np.random.default_rng(seed)
    boot = [fid(f[rng.integers(0, len(f), len(f))]) for _ in range(boots)]
    return {"size": len(f), "half_size": len(f) // 2, "halves": [fid(f[0::2]), fid(f[1::2])],
            "boot_n": boots, "boot_sd": float(np.std(boot, ddof=1))}


def fmt(v, digits=1, scale=1.0) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def cmd_report(args) -> int:
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    e = work / "eval"
    budgets = {name: run_budget(work / "runs" / name) for name in ("relay1", "relay2", "single", "sr", "noblock")}
    results: dict = {"budgets": budgets, "arms": {}, "heldout_sr": {}}
    for arm, spec in ARMS.items():
        parts = [budgets.get(r, {}) for r in spec["runs"]]
        cpu = sum(p.get("cpu_sec", 0.0) for p in parts) if all(parts) else None
        results["arms"][arm] = {
            "label": spec["label"], "cpu_sec": cpu,
            "vs_train": metrics(e / f"fid-{spec['samples']}-vs-train.json"),
            "vs_heldout": metrics(e / f"fid-{spec['samples']}-vs-heldout.json"),
        }
    results["fid_sampling_error"] = {ref: fid_sampling_error(e / "act-relay.npz", e / f"act-{ref}.npz")
                                     for ref in ("train", "heldout")}
    results["stage1"] = {"vs_train": metrics(e / "fid-stage1-vs-train.json"),
                         "vs_heldout": metrics(e / "fid-stage1-vs-heldout.json")}
    results["heldout16"] = metrics(e / "fid-heldout16-vs-heldout.json")
    truth = zip_images(work / "heldout-64x64.zip")   # the held-out emoji: real 64x64 images and 16x16 inputs
    inputs = zip_images(work / "heldout-16x16.zip")
    for arm, label in SR_ARMS.items():
        results["heldout_sr"][arm] = {"label": label, "vs_heldout": metrics(e / f"fid-sr-heldout-{arm}-vs-heldout.json"),
                                      **sr_fidelity(work, arm, truth, inputs)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    lines = ["| arm | training CPU-hours | FID vs train | FID vs held-out | KID x1e3 vs held-out | precision | recall |",
             "|---|---|---|---|---|---|---|"]
    rows = [(a["label"], a["cpu_sec"], a["vs_train"], a["vs_heldout"]) for a in results["arms"].values()]
    rows.append(("stage 1 alone (16x16 samples)", (budgets.get("relay1") or {}).get("cpu_sec"),
                 results["stage1"]["vs_train"], results["stage1"]["vs_heldout"]))
    for label, cpu, tr, ho in rows:
        lines.append(f"| {label} | {fmt(cpu and cpu / 3600, 2)} | {fmt(tr.get('fid'))} | {fmt(ho.get('fid'))} | "
                     f"{fmt(ho.get('kid'), 1, 1e3)} | {fmt(ho.get('precision'), 3)} | {fmt(ho.get('recall'), 3)} |")
    err = results["fid_sampling_error"]
    if all(err.values()):
        lines += ["", "FID's sampling error at this size (relay arm): "
                  + "; ".join(f"against {ref}: halves of {v['half_size']} samples {v['halves'][0]:.1f} / "
                              f"{v['halves'][1]:.1f}, bootstrap sd over {v['boot_n']} resamples of "
                              f"{v['size']} {v['boot_sd']:.2f}" for ref, v in err.items())]
    lines += ["", "| 64x64 stage, fed the real 16x16 held-out images | FID vs held-out | KID x1e3 | PSNR (dB) | "
                  "consistency RMS (grey levels) |", "|---|---|---|---|---|"]
    for arm, r in results["heldout_sr"].items():
        m = r["vs_heldout"]
        lines.append(f"| {r['label']} | {fmt(m.get('fid'))} | {fmt(m.get('kid'), 1, 1e3)} | "
                     f"{fmt(r.get('psnr_db'), 2)} | {fmt(r.get('consistency_rms'), 2)} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    for arm, spec in ARMS.items():
        folder = e / spec["samples"]
        if (folder / "000063.png").is_file():
            grid(folder_images(folder, 64)).save(out / f"grid-{arm}.png")
    fig = heldout_figure(work, truth)
    if fig is not None:
        fig.save(out / "heldout-sr.png")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inputs")
    p.add_argument("zip")
    p.add_argument("outdir")
    p = sub.add_parser("report")
    p.add_argument("--work", default="work-data/compare/session")
    p.add_argument("--out", default="docs/compare")
    args = ap.parse_args()
    return cmd_inputs(args) if args.cmd == "inputs" else cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
