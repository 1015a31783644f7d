"""End-to-end ``rdm train`` and ``rdm generate`` throughput against the network's own time at the same batch.

    .venv/bin/python benchmarks/bench_e2e.py [--what train,generate,compile,compile-train,compile-generate]
        [--batch 16] [--repeats 5]
        [--threads 1] [--device cpu] [--precision fp32|bf16] [--compile] [--channels-last] [--json FILE]

The networks are the bundled emoji stages (stage 1: ADM cbase 64, channel_mult 1,2,2, 2 blocks, attention at
8x8, 16x16, 7.7 M parameters; stage 2: ADM cbase 32, channel_mult 1,2,2,4, 1 block, 64x64, 3.7 M), and the
figures are medians of ``--repeats`` alternated blocks (end-to-end, network only, end-to-end, ...), so that a
change of machine load hits both alike.

- train: the training loop's own step (``Trainer._train_step``: data loading, per-sample generators, loss,
  forward, backward, gradient clamp, Adam, EMA) against the network only (forward + backward of the same
  network in training mode on fixed tensors of the same batch, plus the same Adam step): the physical limit.
  The part outside forward, backward and Adam is broken down by timing each piece on its own.
- generate: ``generate_images`` (the call ``rdm generate`` makes: per-seed generators, both samplers, PNG files)
  of the bundled pipeline against ``calls x`` the time of one network forward at the same batch.
- compile: 10 forwards of the bundled stage-1 network (eval mode, the given batch), eager against
  ``torch.compile`` (after its warm-up; compile time reported separately).
- compile-train: the training step of an eager and a compiled trainer of the same stage in one process,
  alternated block by block (and their forward + backward alone), after the compiled one's warm-up;
  ``--fallback-random`` compiles with inductor's ``fallback_random`` (dropout draws from eager's generator).
- compile-generate: ``generate_images`` of an eager and a compiled bundled pipeline (both stages compiled, as
  ``rdm generate --compile``) in one process, alternated run by run after the compiled one's warm-up, with
  the largest difference between their images (uint8 grey levels, same seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.training import TrainingConfig, plan_training
from relay_diffusion.training.loop import Trainer, seeded_global_rng
from relay_diffusion.training.order import dropout_seed, sample_seeds
from relay_diffusion.utils import accel
from relay_diffusion.utils.distributed import init

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TimedNet, make_dataset  # noqa: E402

#: The bundled stages' training settings (src/relay_diffusion/assets/emoji/*.json).
STAGES = {
    "stage1": dict(res=16, precond="edm", cbase=64, cres=[1, 2, 2], num_blocks=2, attn=[8]),
    "stage2": dict(res=64, precond="blur", cbase=32, cres=[1, 2, 2, 4], num_blocks=1, attn=[8]),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn, device: torch.device, n: int = 1) -> float:
    """Seconds per call of ``fn`` over ``n`` calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


# --- training --------------------------------------------------------------------------------------------
def make_trainer(root: Path, stage: dict, args) -> Trainer:
    root.mkdir(parents=True, exist_ok=True)
    data = make_dataset(root / f"data-{stage['res']}.zip", 64, stage["res"])
    cfg = TrainingConfig(
        outdir=str(root / "runs"), data=str(data), precond=stage["precond"], arch="adm", batch=args.batch,
        duration=1.0, cbase=stage["cbase"], cres=stage["cres"], num_blocks=stage["num_blocks"], attn=stage["attn"],
        dropout=args.dropout, lr_rampup=0.0, grid=0, workers=0, seed=0, up_scale=4, tick=1e9, precision=args.precision,
        compile=args.compile, channels_last=args.channels_last, device=args.device,
    )
    trainer = Trainer(plan_training(cfg, world_size=1), init(args.device))
    with contextlib.redirect_stdout(io.StringIO()):
        trainer._setup()
    for _ in range(3 if args.compile else 1):  # warm-up (and compilation)
        trainer._train_step()
    return trainer


def network_only(trainer: Trainer):
    """Forward + backward of the trained network on fixed tensors of the step's batch, and the Adam step."""
    dev, b = trainer.device, trainer.plan.batch_gpu
    g = torch.Generator().manual_seed(0)
    shape = (b, *trainer.dataset.image_shape)
    x, y = torch.randn(shape, generator=g).to(dev), torch.rand(shape, generator=g).to(dev) * 2 - 1
    sigma = (torch.randn(b, generator=g) * 1.2 - 1.2).exp().to(dev)

    def fwd_bwd():
        trainer.optimizer.zero_grad(set_to_none=True)
        with seeded_global_rng(0, dev):  # as in the loop (dropout), and it costs the same there
            (trainer.ddp(x, sigma) - y).square().sum().backward()

    return fwd_bwd, trainer.optimizer.step


def _enter_exit(context) -> None:
    with context:
        pass


def overhead_parts(trainer: Trainer, reps: int) -> dict[str, float]:
    """Median seconds of each piece of a step outside forward, backward and Adam, timed on its own."""
    dev, cfg = trainer.device, trainer.cfg
    positions = list(range(cfg.batch))
    images = torch.rand(trainer.plan.batch_gpu, *trainer.dataset.image_shape, device=dev) * 2 - 1

    class Free(torch.nn.Module):  # a free denoiser: the loss's own arithmetic and draws
        def forward(self, x, sigma, class_labels=None, augment_labels=None):
            return x * 1.0

    free = Free()
    for p in trainer.net.parameters():
        p.grad = torch.zeros_like(p)
    parts = {
        "data loading": lambda: next(trainer.loader)[0].to(dev, torch.float32) / 127.5 - 1,
        "per-sample generators": lambda: SeedGenerators(sample_seeds(trainer.seed, positions), dev),
        "loss outside the network": lambda: trainer.loss_fn(free, images, SeedGenerators(positions, dev)),
        "dropout generator (fork_rng)": lambda: _enter_exit(seeded_global_rng(dropout_seed(0, 0, 0, 0), dev)),
        "gradient clamp": lambda: accel.clamp_gradients(trainer.net.parameters()),
        "EMA update": lambda: accel.ema_update(trainer.ema.parameters(), trainer.net.parameters(), 0.999),
    }
    out = {}
    for name, fn in parts.items():
        with torch.no_grad() if name != "data loading" else contextlib.nullcontext():
            out[name] = statistics.median(clock(fn, dev) for _ in range(reps))
    return out


def bench_train(args, root: Path) -> list[dict]:
    rows = []
    for name, stage in STAGES.items():
        if name not in args.stages.split(","):
            continue
        trainer = make_trainer(root / name, stage, args)
        fwd_bwd, adam = network_only(trainer)
        fwd_bwd()
        steps, nets, adams = [], [], []
        for _ in range(args.repeats):
            steps.append(clock(trainer._train_step, trainer.device, args.steps))
            nets.append(clock(fwd_bwd, trainer.device, args.steps))
            adams.append(clock(adam, trainer.device, args.steps))
        step, net, opt = (statistics.median(v) for v in (steps, nets, adams))
        ratio = statistics.median(s / (n + a) for s, n, a in zip(steps, nets, adams))  # per block: robust to drift
        parts = overhead_parts(trainer, 21)
        rows.append(dict(kind="train", stage=name, batch=args.batch, step_s=step, fwd_bwd_s=net, adam_s=opt,
                         img_s=args.batch / step, fwd_bwd_img_s=args.batch / net, limit_img_s=args.batch / (net + opt),
                         vs_limit=ratio, outside_pct=100 * (1 - 1 / ratio),
                         vs_fwd_bwd=statistics.median(s / n for s, n in zip(steps, nets)),
                         parts_ms={k: 1000 * v for k, v in parts.items()},
                         parts_pct=100 * sum(parts.values()) / step))
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --- generation ------------------------------------------------------------------------------------------
def bundled_pipeline(args, dev: torch.device, compile: bool):
    """The bundled relay pipeline with the reference's samplers (``--preset default``: 35 + 13 NFE, no guides, as
    in the recorded results) and the run's network batch, precision and speed options."""
    from relay_diffusion.generation import GenerationOptions, load

    pipe = load(GenerationOptions(preset="default", net_batch=None), dev).pipeline
    if args.net_batch is not None:
        pipe.net_batch = args.net_batch
    for stage in pipe.stages:
        stage.net.precision = args.precision if args.precision != "fp32" else stage.net.precision
        accel.prepare_network(stage.net, compile=compile, channels_last=args.channels_last,
                              cpu_bf16=args.precision == "bf16" and dev.type == "cpu")
    return pipe


def bench_generate(args) -> list[dict]:
    from relay_diffusion.generation import generate_images

    dev = torch.device(args.device)
    pipe = bundled_pipeline(args, dev, args.compile)
    nets = []
    for stage in pipe.stages:
        stage.net = TimedNet(stage.net)
        nets.append(stage.net)
    seeds = list(range(args.batch * args.gen_batches))
    b = args.batch
    probes = [(torch.randn(b, net.img_channels, net.img_resolution, net.img_resolution, device=dev),
               torch.full((b,), 0.5, device=dev)) for net in nets]

    @torch.no_grad()
    def forwards() -> list[float]:
        return [clock(lambda: net.net(x, s), dev, 3) for net, (x, s) in zip(nets, probes)]

    def run(n_seeds):
        with tempfile.TemporaryDirectory() as outdir:
            for net in nets:
                net.samples, net.seconds = 0, 0.0
            t = clock(lambda: generate_images(pipe, seeds[:n_seeds], outdir, max_batch_size=b, progress=False), dev)
        return t, sum(net.seconds for net in nets), [net.samples / b for net in nets]  # calls, in batches of b

    k = pipe.resolved_net_batch or b

    @torch.no_grad()
    def chunked() -> list[float]:  # the pipeline's calls (chunks of k) for one batch of b
        return [clock(lambda: [net.net(x[i:i + k], s[i:i + k]) for i in range(0, b, k)], dev, 3)
                for net, (x, s) in zip(nets, probes)]

    run(b)  # warm-up (and compilation)
    forwards(), chunked()
    totals, inside, limits, chunk_ratios = [], [], [], []
    for _ in range(args.repeats):
        total, in_net, calls = run(len(seeds))
        fwd, fwd_k = forwards(), chunked()
        totals.append(total)
        inside.append(in_net)
        limits.append(sum(c * f for c, f in zip(calls, fwd)))
        chunk_ratios.append(sum(c * f for c, f in zip(calls, fwd_k)) / limits[-1])
    total, limit = statistics.median(totals), statistics.median(limits)
    if dev.type == "cuda":  # the wrapper's wall times are launch times there: use the synchronised limit
        outside = statistics.median((t - lim) / t for t, lim in zip(totals, limits))
    else:  # measured within each run
        outside = statistics.median((t - i) / t for t, i in zip(totals, inside))
    chunk = statistics.median(chunk_ratios)
    row = dict(kind="generate", batch=b, images=len(seeds), net_batch=pipe.resolved_net_batch, total_s=total,
               img_s=len(seeds) / total, limit_s=limit, limit_img_s=len(seeds) / limit,
               outside_pct=100 * outside, chunking_ratio=chunk, vs_limit=chunk / (1 - outside),
               vs_limit_direct=statistics.median(t / lim for t, lim in zip(totals, limits)), calls=calls)
    print(json.dumps(row), flush=True)
    return [row]


# --- compile ---------------------------------------------------------------------------------------------
def bench_compile(args) -> list[dict]:
    from relay_diffusion.generation import RelayPipeline

    dev = torch.device(args.device)
    net = RelayPipeline.from_bundled(dev).stages[0].net.eval()
    if args.precision == "bf16":
        net.precision = "bf16"
        if dev.type == "cpu":
            accel.allow_cpu_bf16(net)
    compiled = accel.compile_network(copy.deepcopy(net))
    x, s = torch.randn(args.batch, 3, 16, 16, device=dev), torch.full((args.batch,), 0.5, device=dev)
    with torch.no_grad():
        t_compile = clock(lambda: compiled(x, s), dev)
        err = float((compiled(x, s) - net(x, s)).abs().max() / net(x, s).abs().max())
        eager, comp = [], []
        for _ in range(args.repeats):
            eager.append(clock(lambda: net(x, s), dev, 10) * 10)
            comp.append(clock(lambda: compiled(x, s), dev, 10) * 10)
    row = dict(kind="compile", batch=args.batch, first_call_s=t_compile, eager_10_s=statistics.median(eager),
               compiled_10_s=statistics.median(comp), speedup=statistics.median(e / c for e, c in zip(eager, comp)),
               max_rel_err=err, eager_runs=eager, compiled_runs=comp)
    print(json.dumps(row), flush=True)
    return [row]


def bench_compile_train(args, root: Path) -> list[dict]:
    """Eager against compiled training steps, alternated in one process (a load change hits both alike)."""
    if args.fallback_random:
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
    rows = []
    for name, stage in STAGES.items():
        if name not in args.stages.split(","):
            continue
        eager = make_trainer(root / f"{name}-eager", stage, argparse.Namespace(**{**vars(args), "compile": False}))
        t0 = time.perf_counter()
        compiled = make_trainer(root / f"{name}-compiled", stage, argparse.Namespace(**{**vars(args), "compile": True}))
        warm_up = time.perf_counter() - t0
        dev = eager.device
        (fb_eager, _), (fb_comp, _) = network_only(eager), network_only(compiled)
        fb_eager(), fb_comp()
        se, sc, fe, fc = [], [], [], []
        for _ in range(args.repeats):
            se.append(clock(eager._train_step, dev, args.steps))
            sc.append(clock(compiled._train_step, dev, args.steps))
            fe.append(clock(fb_eager, dev, args.steps))
            fc.append(clock(fb_comp, dev, args.steps))
        med = statistics.median
        rows.append(dict(kind="compile-train", stage=name, batch=args.batch, fallback_random=args.fallback_random,
                         warm_up_s=warm_up, step_eager_s=med(se), step_compiled_s=med(sc),
                         step_speedup=med(e / c for e, c in zip(se, sc)), fwd_bwd_eager_s=med(fe),
                         fwd_bwd_compiled_s=med(fc), fwd_bwd_speedup=med(e / c for e, c in zip(fe, fc)),
                         step_pairs=[e / c for e, c in zip(se, sc)]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_compile_generate(args) -> list[dict]:
    """``rdm generate`` end to end, eager against ``--compile``, alternated in one process."""
    from relay_diffusion.generation import generate_images
    from relay_diffusion.generation.files import load_images

    dev = torch.device(args.device)
    pipes = {name: bundled_pipeline(args, dev, compile=name == "compiled") for name in ("eager", "compiled")}
    seeds = list(range(args.batch * args.gen_batches))
    with tempfile.TemporaryDirectory() as tmp:
        outs = {name: Path(tmp) / name for name in pipes}

        def run(name: str) -> float:  # into an empty folder: generate_images skips the images already there
            shutil.rmtree(outs[name], ignore_errors=True)
            return clock(lambda: generate_images(pipes[name], seeds, str(outs[name]), max_batch_size=args.batch,
                                                 progress=False), dev)

        run("eager")
        warm_up = run("compiled")  # compilation of both stages
        times = {"eager": [], "compiled": []}
        for _ in range(args.repeats):
            for name in pipes:
                times[name].append(run(name))
        eager_px, compiled_px = ((load_images(outs[n], seeds) + 1) * 127.5 for n in ("eager", "compiled"))
        diff = int((eager_px - compiled_px).abs().max().round())
    med = statistics.median
    pairs = [e / c for e, c in zip(times["eager"], times["compiled"])]
    row = dict(kind="compile-generate", batch=args.batch, images=len(seeds), warm_up_s=warm_up,
               eager_s=med(times["eager"]), compiled_s=med(times["compiled"]), speedup=med(pairs),
               pairs=pairs, max_uint8_diff=diff)
    print(json.dumps(row), flush=True)
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", default="train,generate")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--stages", default="stage1,stage2", help="training: which bundled stage sizes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="training steps per timed block")
    ap.add_argument("--gen_batches", type=int, default=1, help="batches per generation run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--channels-last", dest="channels_last", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.1, help="training: the networks' dropout (the bundled 0.1)")
    ap.add_argument("--fallback-random", dest="fallback_random", action="store_true",
                    help="compile-train: inductor draws random numbers (dropout) with eager's generator")
    ap.add_argument("--net_batch", type=int)
    ap.add_argument("--json", help="append the rows (with the settings) to this JSON-lines file")
    ap.add_argument("--tag", default="", help="a name for these settings, written into the rows")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = dict(config=args.tag, device=args.device, precision=args.precision, compile=args.compile,
                    channels_last=args.channels_last, threads=torch.get_num_threads(), torch=torch.__version__)
    print(json.dumps({**settings, "load_average": os.getloadavg()}), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for what in args.what.split(","):
            if what == "train":
                rows += bench_train(args, Path(tmp))
            elif what == "generate":
                rows += bench_generate(args)
            elif what == "compile":
                rows += bench_compile(args)
            elif what == "compile-train":
                rows += bench_compile_train(args, Path(tmp))
            elif what == "compile-generate":
                rows += bench_compile_generate(args)
            else:
                raise SystemExit(f"unknown --what {what!r}")
    print(json.dumps({"load_average_end": os.getloadavg()}))
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({**settings, **row}) + "\n")


if __name__ == "__main__":
    main()
