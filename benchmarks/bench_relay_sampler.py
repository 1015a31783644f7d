"""Where the relay sampler spends its time: network calls vs everything else (DCTs, blur factors, noise).

    .venv/bin/python benchmarks/bench_relay_sampler.py [--repeats 5] [--batch 16] [--steps 40]

A small ADM (DhariwalUNet) at 64x64, relayed from 16x16 (up_scale 4), on the CPU. The network is wrapped
in a timer; "other" = total - network. Prints the median over repeats of each and the share of "other".
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import small_adm

from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.core.samplers import relay_sampler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    timed = small_adm(64, [1, 2, 2, 2])
    low = torch.rand(args.batch, 3, 16, 16, dtype=torch.float64) * 2 - 1
    up = F.interpolate(low, scale_factor=4, mode="nearest")
    totals, nets = [], []
    with torch.no_grad():
        for r in range(args.repeats + 1):
            timed.seconds = 0.0
            t0 = time.perf_counter()
            relay_sampler(timed, up, SeedGenerators(range(args.batch)), process=BlurProcess(up_scale=4), num_steps=args.steps)
            total = time.perf_counter() - t0
            if r:  # the first run warms up
                totals.append(total)
                nets.append(timed.seconds)
    others = [t - n for t, n in zip(totals, nets)]
    shares = [o / t for o, t in zip(others, totals)]
    print(f"relay sampler, ADM 64x64 from 16x16, batch {args.batch}, {args.steps}-step grid, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats (medians)")
    print(f"  total   {statistics.median(totals):8.3f} s")
    print(f"  network {statistics.median(nets):8.3f} s")
    print(f"  other   {statistics.median(others):8.3f} s  = {100 * statistics.median(shares):.2f}% of the total")


if __name__ == "__main__":
    main()
