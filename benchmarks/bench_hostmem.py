"""Peak host memory of training's data path against ranks x loader workers, with and without ``--cache``.

    .venv/bin/python benchmarks/bench_hostmem.py [--images 12000] [--resolution 256] [--workers 1,2,4]
        [--ranks 1,2] [--write benchmarks/RESULTS.md]

Generates a zip of ``--images`` uncompressed BMP images (``images x 3 x res^2`` bytes decoded: 2.4 GB by
default), then for every mode (default: decode as read; ``--cache=1``: one shared memory-mapped copy) and
every ranks x workers launches ``torchrun --nproc_per_node=RANKS`` (gloo, CPU) on this script's ``--child``,
which opens the dataset and loader exactly as ``rdm train`` does (``plan_training``, ``open_dataset``,
``make_loader``) and reads one epoch: every image is decoded or mapped once. The ranks read the uint8 batches
and convert nothing: in a GPU run the conversion to float happens on the device, not in host memory. Meanwhile the
parent samples the PSS of the whole process tree (torchrun's agent, ranks, loader workers: the sum of
``/proc/PID/smaps_rollup`` Pss, so a page shared by N processes counts once) every 0.2 s and reports the peak.
The cache file is built once, before the timed runs (its build time is reported separately).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import PIL.Image

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Host memory: data loading against ranks x workers"


# ---------------------------------------------------------------------------------------------- measuring
def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants alive now (from the parent ids in ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (0 if it is gone)."""
    for name in ("smaps_rollup", "smaps"):
        try:
            with open(f"/proc/{pid}/{name}") as f:
                return sum(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
        except FileNotFoundError:
            continue
        except (OSError, ValueError, IndexError):
            return 0
    return 0


def tree_pss(root: int) -> int:
    """PSS of ``root`` and its descendants together: shared pages count once in the sum."""
    return sum(pss_bytes(pid) for pid in process_tree(root))


def peak_tree_pss(cmd: list[str], interval: float = 0.2, env: Optional[dict] = None,
                  timeout: float = 600) -> tuple[int, float, subprocess.CompletedProcess]:
    """Run ``cmd``; (peak PSS of its process tree in bytes, seconds, the finished process)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    with tempfile.TemporaryFile("w+") as out:
        drain = threading.Thread(target=lambda: out.write(proc.stdout.read()), daemon=True)
        drain.start()
        try:
            while proc.poll() is None:
                peak = max(peak, tree_pss(proc.pid))
                if time.perf_counter() - t0 > timeout:
                    proc.kill()
                time.sleep(interval)
        finally:
            if proc.poll() is None:  # interrupted: take the run down with us
                proc.terminate()
                proc.wait(30)
        drain.join()
        out.seek(0)
        text = out.read()
    return peak, time.perf_counter() - t0, subprocess.CompletedProcess(cmd, proc.returncode, text)


# ---------------------------------------------------------------------------------------------- the data set
def write_dataset(path: Path, images: int, resolution: int) -> int:
    """A zip of ``images`` RGB BMPs (stored, not compressed: quick to write and decode); returns decoded bytes."""
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (16, resolution, resolution, 3), dtype=np.uint8)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for i in range(images):
            img = np.roll(tiles[i % 16], i // 16, axis=1)  # distinct images, no RNG per image
            buf = io.BytesIO()
            PIL.Image.fromarray(img).save(buf, format="BMP")
            z.writestr(f"{i // 1000:05d}/img{i:08d}.bmp", buf.getvalue())
    return images * 3 * resolution * resolution


# ---------------------------------------------------------------------------------------------- one run
def child(args: argparse.Namespace) -> None:
    """One rank: the training data path for one epoch of the dataset."""
    import torch

    from relay_diffusion.training import TrainingConfig, plan_training
    from relay_diffusion.training.order import DataOrder, StepLayout, make_loader
    from relay_diffusion.training.plan import open_dataset
    from relay_diffusion.utils import distributed

    torch.set_num_threads(1)
    ctx = distributed.init("cpu")
    world = ctx.world_size
    cfg = TrainingConfig(outdir=args.outdir, data=args.data, batch=args.batch_gpu * world, cache=args.cache,
                         cache_dir=args.cache_dir, workers=args.workers_child)
    plan = plan_training(cfg, world_size=world)
    dataset = open_dataset(cfg, workers=plan.workers)
    layout = StepLayout(cfg.batch, plan.batch_gpu, world)
    loader = make_loader(dataset, DataOrder(len(dataset), seed=0), layout, ctx.rank, 0, plan.workers,
                         pin_memory=False)
    total = 0
    for _ in range(math.ceil(len(dataset) / cfg.batch)):
        images, labels, _ = next(loader)
        total += int(images[:, :, 0, 0].sum())
    distributed.barrier()
    if ctx.is_main:
        print(f"ok {total}")
    distributed.shutdown()


def run_config(args: argparse.Namespace, data: Path, cache_dir: Path, ranks: int, workers: int,
               cache: bool) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(Path(__file__).resolve()), "--child", f"--data={data}", f"--outdir={data.parent}",
           f"--cache-dir={cache_dir}", f"--cache={int(cache)}", f"--workers-child={workers}",
           f"--batch-gpu={args.batch_gpu}"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    peak, seconds, proc = peak_tree_pss(cmd, env=env)
    if proc.returncode != 0 or "ok " not in proc.stdout:
        raise SystemExit(f"ranks {ranks} workers {workers} cache {cache} failed:\n{proc.stdout[-3000:]}")
    return peak, seconds


def table(rows: list[dict], decoded: int) -> str:
    lines = ["| mode | ranks x workers | peak PSS (MB) | ratio to 1 x 1 | added over 1 x 1, in decoded data sets "
             "| seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['ranks']} x {r['workers']} | {r['peak'] / 1e6:.0f} | {r['ratio']:.2f} | "
                     f"{r['added'] / decoded:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def write_section(results: Path, text: str) -> None:
    """Put ``text`` (starting with :data:`SECTION`) in ``results``, replacing an earlier copy of the section."""
    old = results.read_text() if results.exists() else ""
    start = old.find(SECTION)
    if start >= 0:
        end = old.find("\n## ", start + len(SECTION))
        old = old[:start].rstrip("\n") + ("\n\n" + old[end + 1:] if end >= 0 else "")
    results.write_text(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=12000)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--batch-gpu", type=int, default=32)
    ap.add_argument("--modes", default="default,cache")
    ap.add_argument("--write", type=Path, help="put the table in this Markdown file (replacing its section)")
    ap.add_argument("--tmp", type=Path, help="folder for the data set and cache [default: a temporary one]")
    # --child: one rank, launched by torchrun
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--outdir", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--workers-child", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.cache = bool(args.cache)
        return child(args)

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        data, cache_dir = Path(tmp) / "noise.zip", Path(tmp) / "cache"
        t0 = time.perf_counter()
        decoded = write_dataset(data, args.images, args.resolution)
        print(f"data set: {args.images} images {args.resolution}x{args.resolution}, {decoded / 1e9:.2f} GB "
              f"decoded, {data.stat().st_size / 1e9:.2f} GB zip, written in {time.perf_counter() - t0:.1f} s",
              flush=True)
        modes = args.modes.split(",")
        build_s = None
        if "cache" in modes:  # build the shared copy once (1 rank, 1 worker); every cached run maps it
            _, build_s = run_config(args, data, cache_dir, 1, 1, True)
            print(f"cache built (and read once) in {build_s:.1f} s", flush=True)
        rows = []
        for mode in modes:
            base = None
            for ranks in map(int, args.ranks.split(",")):
                for workers in map(int, args.workers.split(",")):
                    peak, seconds = run_config(args, data, cache_dir, ranks, workers, mode == "cache")
                    base = base or peak
                    rows.append(dict(mode="--cache=1" if mode == "cache" else "default", ranks=ranks,
                                     workers=workers, peak=peak, ratio=peak / base, added=peak - base,
                                     seconds=seconds))
                    print(table(rows[-1:], decoded).splitlines()[-1], flush=True)
    out = table(rows, decoded)
    print(out)
    if args.write:
        text = (f"{SECTION}\n\n`python benchmarks/bench_hostmem.py --write benchmarks/RESULTS.md` "
                f"({os.cpu_count()} CPUs): {args.images} images {args.resolution}x{args.resolution} "
                f"({decoded / 1e9:.2f} GB decoded) in a zip of BMPs, one epoch per run through the training "
                f"data path (torchrun, gloo, CPU; batch {args.batch_gpu} per rank). Peak PSS of the whole process "
                f"tree (torchrun agent, ranks, loader workers), sampled every 0.2 s"
                + (f"; the shared cache was built once beforehand ({build_s:.0f} s)" if build_s else "")
                + ".\n\n" + out + "\n")
        write_section(args.write, text)


if __name__ == "__main__":
    main()
