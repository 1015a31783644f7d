"""Training throughput (images/s) of a small ADM, stage 1 (precond edm) against stage 2 (precond blur).

    .venv/bin/python benchmarks/bench_train.py [--resolutions 32,64] [--batch 16] [--blocks 7] [--steps 4]
                                               [--threads 1]

Both runs use the same network, batch and data (a generated EDM-format zip); they differ only in the loss.
Timed blocks of ``--steps`` optimizer steps alternate between the two (edm, blur, edm, blur, ...) so that a
change in machine load hits both alike; the figures are medians over the blocks. One warm-up step each is
not timed. The timed step is the training loop's own (data loading, per-sample generators, loss, backward,
Adam and EMA).

Two rates are reported: images per second of wall time, and images per second of CPU time of this process.
On a shared machine the wall-time rate follows the other jobs' load; with one thread (the default) the
CPU-time rate measures the work itself and is the figure to compare. The loss is also timed on its own (one
batch, a free denoiser in place of the network): the difference between the two losses, as a fraction of
the edm step time, is the blur loss's extra cost free of the run-to-run noise of whole steps.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.training import TrainingConfig, plan_training
from relay_diffusion.utils.distributed import init
from relay_diffusion.training.loop import Trainer
from common import make_dataset


def make_trainer(root: Path, data: Path, precond: str, batch: int, args) -> Trainer:
    cfg = TrainingConfig(
        outdir=str(root / precond), data=str(data), precond=precond, arch="adm", batch=batch, duration=1.0,
        cbase=args.cbase, cres=[int(v) for v in args.cres.split(",")], num_blocks=1, attn=[16], dropout=0.1,
        lr_rampup=0.0, grid=0, workers=0, seed=0, up_scale=4, tick=1e9,
    )
    trainer = Trainer(plan_training(cfg, world_size=1), init("cpu"))
    with contextlib.redirect_stdout(io.StringIO()):
        trainer._setup()
    trainer._train_step()  # warm-up
    return trainer


def time_block(trainer: Trainer, steps: int) -> tuple[float, float]:
    """``(images per wall second, images per CPU second)`` over ``steps`` training steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer._train_step()
    images = steps * trainer.cfg.batch
    return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)


class _Identity(torch.nn.Module):
    """A free denoiser, to time a loss on its own."""

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        return x * 1.0


def loss_alone_ms(trainer: Trainer, repeats: int = 21) -> float:
    """Median time (ms) of the trainer's loss on one batch with a free denoiser: the loss's own cost."""
    images = torch.rand(trainer.plan.batch_gpu, *trainer.dataset.image_shape) * 2 - 1
    times = []
    for i in range(repeats):
        rng = SeedGenerators(range(i * len(images), (i + 1) * len(images)))
        start = time.perf_counter()
        trainer.loss_fn(_Identity(), images, rng)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolutions", default="32,64")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cbase", type=int, default=32)
    ap.add_argument("--cres", default="1,2,2")
    ap.add_argument("--blocks", type=int, default=7, help="timed blocks per precond")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per block")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for res in [int(r) for r in args.resolutions.split(",")]:
            data = make_dataset(root / f"data-{res}.zip", 64, res)
            trainers = {p: make_trainer(root / str(res), data, p, args.batch, args) for p in ("edm", "blur")}
            params = sum(p.numel() for p in trainers["edm"].net.parameters())
            wall: dict[str, list[float]] = {"edm": [], "blur": []}
            cpu: dict[str, list[float]] = {"edm": [], "blur": []}
            for _ in range(args.blocks):
                for precond, trainer in trainers.items():
                    w, c = time_block(trainer, args.steps)
                    wall[precond].append(w)
                    cpu[precond].append(c)
            alone = {k: loss_alone_ms(t) for k, t in trainers.items()}
            med = {k: statistics.median(v) for k, v in wall.items()}
            med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
            row = dict(resolution=res, batch=args.batch, params_m=round(params / 1e6, 2),
                       edm_img_s=round(med["edm"], 2), blur_img_s=round(med["blur"], 2),
                       edm_img_cpu_s=round(med_cpu["edm"], 2), blur_img_cpu_s=round(med_cpu["blur"], 2),
                       blur_overhead_cpu_pct=round(100 * (med_cpu["edm"] / med_cpu["blur"] - 1), 1),
                       blur_overhead_wall_pct=round(100 * (med["edm"] / med["blur"] - 1), 1),
                       edm_loss_ms=round(alone["edm"], 2), blur_loss_ms=round(alone["blur"], 2),
                       blur_loss_extra_pct=round(100 * (alone["blur"] - alone["edm"]) / 1000
                                                 * med_cpu["edm"] / args.batch, 2))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"load average at the end {os.getloadavg()}")
    print()
    print("| resolution | params | batch | edm img/s (wall) | blur img/s (wall) | edm img/CPU-s | blur img/CPU-s "
          "| blur overhead (CPU time) | blur overhead (wall) | loss alone edm / blur | blur loss extra / step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['resolution']}x{r['resolution']} | {r['params_m']} M | {r['batch']} | {r['edm_img_s']} | "
              f"{r['blur_img_s']} | {r['edm_img_cpu_s']} | {r['blur_img_cpu_s']} | "
              f"{r['blur_overhead_cpu_pct']:+.1f}% | {r['blur_overhead_wall_pct']:+.1f}% | "
              f"{r['edm_loss_ms']} / {r['blur_loss_ms']} ms | {r['blur_loss_extra_pct']:+.2f}% |")


if __name__ == "__main__":
    main()
