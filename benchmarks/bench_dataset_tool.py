"""Throughput of ``rdm dataset``: small PNGs (half RGB, half RGBA) upsampled to a 64x64 zip.

    .venv/bin/python benchmarks/bench_dataset_tool.py [--count 10000] [--size 32] [--resolution 64x64] [--workers 2]

The input images are generated into a temporary folder first (not timed); the timed part is the same library
call ``rdm dataset --source=DIR --dest=out.zip --transform=center-crop --resolution=64x64`` makes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

from relay_diffusion.data.tool import BuildOptions, build_datasets, parse_resolution


def make_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        channels = 4 if i % 2 else 3
        image = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        PIL.Image.fromarray(image).save(sub / f"{i:06d}.png")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=32, help="input width = height")
    ap.add_argument("--resolution", default="64x64")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        t0 = time.perf_counter()
        make_images(src, args.count, args.size)
        print(f"generated {args.count} {args.size}x{args.size} PNGs in {time.perf_counter() - t0:.1f} s")
        options = BuildOptions(transform="center-crop", workers=args.workers, progress=False)
        t0 = time.perf_counter()
        report = build_datasets(str(src), {parse_resolution(args.resolution): str(Path(tmp) / "out.zip")}, options)
        seconds = time.perf_counter() - t0
        size_mb = (Path(tmp) / "out.zip").stat().st_size / 2**20
    print(f"wrote {report.num_images} images ({args.resolution}, {size_mb:.1f} MiB zip) with {args.workers} workers: "
          f"{seconds:.2f} s, {report.num_images / seconds:.0f} images/s")


if __name__ == "__main__":
    main()
