"""End-to-end relay generation throughput on the CPU, and the share of time spent outside the networks.

    .venv/bin/python benchmarks/bench_generate.py [--images 32] [--batch 16] [--repeats 3] [--threads 0]

Two small ADMs (DhariwalUNet): stage 1 at 16x16, stage 2 at 64x64 (up_scale 4), the default preset's
samplers (18 + 18 grid steps; 7 stage-2 steps remain after truncation), through the same library call
``rdm generate`` makes (:func:`relay_diffusion.generation.run.generate_images`: per-seed generators, fixed-size
network batches, uint8 conversion, PNG files). Both networks are wrapped in a timer; "other" = total -
network, i.e. the samplers' float64 arithmetic, DCTs, noise draws, batching and file writing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import small_adm

from relay_diffusion.core.process import BlurProcess
from relay_diffusion.generation import EDMStage, RelayPipeline, RelayStage, generate_images


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    first, second = small_adm(16, [1, 2]), small_adm(64, [1, 2, 2, 2])
    pipeline = RelayPipeline([EDMStage(first), RelayStage(second, process=BlurProcess(up_scale=4))])
    seeds = list(range(args.images))
    totals, nets = [], []
    for r in range(args.repeats + 1):
        first.seconds = second.seconds = 0.0
        with tempfile.TemporaryDirectory() as outdir:
            t0 = time.perf_counter()
            generate_images(pipeline, seeds[: args.batch] if r == 0 else seeds, outdir,
                            max_batch_size=args.batch, progress=False)
            total = time.perf_counter() - t0
        if r:  # the first (shorter) run warms up
            totals.append(total)
            nets.append(first.seconds + second.seconds)
    others = [t - n for t, n in zip(totals, nets)]
    shares = [o / t for o, t in zip(others, totals)]
    total = statistics.median(totals)
    print(f"relay generation 16x16 -> 64x64 (ADM, 18 + 18 steps), {args.images} images, batch {args.batch}, "
          f"net_batch {pipeline.net_batch}, {torch.get_num_threads()} threads, {args.repeats} repeats (medians)")
    print(f"  total   {total:8.2f} s  = {args.images / total:.2f} images/s")
    print(f"  network {statistics.median(nets):8.2f} s")
    print(f"  other   {statistics.median(others):8.2f} s  = {100 * statistics.median(shares):.2f}% of the total")


if __name__ == "__main__":
    main()
