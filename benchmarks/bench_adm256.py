"""The reference's ImageNet-256 stage-2 network (ADM, cbase 256, channel_mult 1,1,2,2,4,4, 2 blocks, attention at
32x32, 16x16 and 8x8; 550 M parameters) trained by ``rdm train``'s own step on one GPU, as one Markdown table:

    python benchmarks/bench_adm256.py [--device cuda] [--batches 8,16,32] [--precision bf16] [--compile-batch 16]
        [--steps 5] [--repeats 3] [--budget SECONDS] [--out benchmarks/adm256.md]

For each per-GPU batch: images/s of the training step (``Trainer._train_step``: data, loss, forward, backward,
gradient clamp, Adam, EMA), the step's time against forward + backward alone on fixed tensors of the same batch,
the peak GPU memory of the step, and which ``scaled_dot_product_attention`` kernel ran (from the profiler's op
names). Then forward + backward at one batch with the earlier attention layout (q/k/v with a strided last
dimension, which the fused kernels refuse) against the current one: time and peak memory. Then, if the budget
allows, the same step under ``torch.compile``. The table is rewritten after each row, so a run stopped early
keeps what it measured; rows not run are named. Unconditional (no labels), dropout as the reference (0.1).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import relay_diffusion.networks.layers as layers
from relay_diffusion.training import TrainingConfig, plan_training
from relay_diffusion.training.loop import Trainer
from relay_diffusion.utils.distributed import init

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import clock, network_only, sync  # noqa: E402
from common import make_dataset, strided_attention  # noqa: E402

#: The reference's ImageNet-256 stage-2 network (its ``--arch adm`` at 256x256).
ADM256 = dict(precond="blur", arch="adm", cbase=256, cres=[1, 1, 2, 2, 4, 4], num_blocks=2, attn=[32, 16, 8],
              dropout=0.1, up_scale=4)

#: Profiler op name -> the SDPA kernel it stands for.
SDPA_OPS = {"aten::_scaled_dot_product_flash_attention": "flash",
            "aten::_scaled_dot_product_efficient_attention": "efficient",
            "aten::_scaled_dot_product_cudnn_attention": "cudnn",
            "aten::_scaled_dot_product_attention_math": "math"}


def peak_gb(dev: torch.device, fn) -> float:
    if dev.type != "cuda":
        return float("nan")
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    sync(dev)
    return torch.cuda.max_memory_allocated(dev) / 2**30


def sdpa_kernels(fn) -> str:
    """The SDPA kernels that ``fn`` ran, from the profiler's op names."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    found = {SDPA_OPS[e.key] for e in prof.key_averages() if e.key in SDPA_OPS}
    return "+".join(sorted(found)) or "none"


def make_trainer(root: Path, data: Path, batch: int, args, compile: bool) -> Trainer:
    cfg = TrainingConfig(outdir=str(root / f"runs-{batch}-{int(compile)}"), data=str(data), batch=batch,
                         duration=1.0, lr_rampup=0.0, grid=0, workers=args.workers, seed=0, tick=1e9, snap=None,
                         precision=args.precision, compile=compile, device=args.device,
                         **dict(ADM256, cbase=args.cbase))
    trainer = Trainer(plan_training(cfg, world_size=1), init(args.device))
    with contextlib.redirect_stdout(io.StringIO()):
        trainer._setup()
    return trainer


def fwd_bwd_fn(trainer: Trainer):
    """Forward + backward of the trained network on fixed tensors of the step's batch (bench_e2e's)."""
    return network_only(trainer)[0]


def bench_step(trainer: Trainer, args, warmup: int) -> dict:
    dev, b = trainer.device, trainer.plan.batch_gpu
    fwd_bwd = fwd_bwd_fn(trainer)
    for _ in range(warmup):
        trainer._train_step()
        fwd_bwd()
    steps, nets = [], []
    for _ in range(args.repeats):
        steps.append(clock(trainer._train_step, dev, args.steps))
        nets.append(clock(fwd_bwd, dev, args.steps))
    step, net = statistics.median(steps), statistics.median(nets)
    return dict(batch=b, step_s=step, fwd_bwd_s=net, img_s=b / step, fwd_bwd_img_s=b / net,
                vs_fwd_bwd=statistics.median(s / n for s, n in zip(steps, nets)),
                peak_gb=peak_gb(dev, trainer._train_step), sdpa=sdpa_kernels(fwd_bwd))


def bench_layout(trainer: Trainer, args) -> dict:
    """Forward + backward with the earlier (strided) attention layout against the current one, alternated."""
    dev, b = trainer.device, trainer.plan.batch_gpu
    fwd_bwd = fwd_bwd_fn(trainer)
    current = layers.self_attention
    out = {"batch": b}
    times = {"strided": [], "contiguous": []}
    for _ in range(args.repeats):
        for name, fn in (("strided", strided_attention), ("contiguous", current)):
            layers.self_attention = fn
            try:
                fwd_bwd()
                times[name].append(clock(fwd_bwd, dev, args.steps))
                out[f"{name}_peak_gb"] = peak_gb(dev, fwd_bwd)
                out[f"{name}_sdpa"] = sdpa_kernels(fwd_bwd)
            finally:
                layers.self_attention = current
    for name, v in times.items():
        out[f"{name}_s"] = statistics.median(v)
    out["speedup"] = out["strided_s"] / out["contiguous_s"]
    return out


def table(rows: list[dict], notes: list[str], args) -> str:
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    lines = [f"Device: {name}, torch {torch.__version__}, {args.precision}, ADM-256 stage 2 "
             f"({args.cbase} x {ADM256['cres']}, {ADM256['num_blocks']} blocks, attention at {ADM256['attn']}).",
             "", "| config | batch/GPU | step img/s | step ms | fwd+bwd ms | step / fwd+bwd | peak GB | SDPA kernel |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "step":
            lines.append(f"| {r['config']} | {r['batch']} | {r['img_s']:.1f} | {1000 * r['step_s']:.0f} | "
                         f"{1000 * r['fwd_bwd_s']:.0f} | {r['vs_fwd_bwd']:.3f} | {r['peak_gb']:.1f} | {r['sdpa']} |")
    for r in rows:
        if r["kind"] == "layout":
            lines += ["", f"Attention layout, forward + backward at batch {r['batch']}: strided q/k/v "
                          f"({r['strided_sdpa']}) {1000 * r['strided_s']:.0f} ms, {r['strided_peak_gb']:.1f} GB peak; "
                          f"contiguous ({r['contiguous_sdpa']}) {1000 * r['contiguous_s']:.0f} ms, "
                          f"{r['contiguous_peak_gb']:.1f} GB peak: **{r['speedup']:.2f}x**."]
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batches", default="8,16,32")
    p.add_argument("--layout-batch", type=int, default=16, help="batch of the attention-layout comparison (0: none)")
    p.add_argument("--compile-batch", type=int, default=16, help="batch of the compiled step (0: none)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--budget", type=float, default=300.0, help="seconds; no row is started past it")
    p.add_argument("--cbase", type=int, default=ADM256["cbase"], help="narrower network for a dry run")
    p.add_argument("--out", default="benchmarks/adm256.md")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    start = time.time()
    out = Path(args.out)
    rows: list[dict] = []
    notes: list[str] = []
    plan = [("step", b, False) for b in map(int, args.batches.split(","))]
    if args.layout_batch:
        plan.append(("layout", args.layout_batch, False))
    if args.compile_batch:
        plan.append(("step", args.compile_batch, True))
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data-256.zip", 64, 256)
        for kind, batch, compile in plan:
            label = f"{args.precision}{'-compile' if compile else ''}" if kind == "step" else "layout"
            left = args.budget - (time.time() - start)
            if left < (150 if compile else 30):
                notes.append(f"not run ({left:.0f} s of the budget left): {label} at batch {batch}")
                continue
            t0 = time.time()
            trainer = None
            try:
                trainer = make_trainer(Path(tmp), data, batch, args, compile)
                row = (bench_step(trainer, args, warmup=3 if compile else 1) if kind == "step"
                       else bench_layout(trainer, args))
                row.update(kind=kind, config=label, seconds=time.time() - t0)
                rows.append(row)
                print(json.dumps(row), flush=True)
            except Exception as exc:  # noqa: BLE001 - the table names it and the others still run
                failed = True
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                notes.append(f"failed: {label} at batch {batch}: {type(exc).__name__}: {msg}")
                print(notes[-1], flush=True)
            finally:
                del trainer
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            out.write_text(table(rows, notes, args))
            out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out.write_text(table(rows, notes, args))
    print(table(rows, notes, args))
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
