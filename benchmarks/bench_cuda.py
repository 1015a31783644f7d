"""The end-to-end benchmarks of ``bench_e2e.py`` on a CUDA machine: fp32 and bf16, torch.compile off and on,
against the previous defaults (network calls of 8 samples), written as one Markdown table.

    python benchmarks/bench_cuda.py [--device cuda] [--batch 64] [--repeats 5] [--out benchmarks/cuda.md]
        [--budget SECONDS]
    python benchmarks/bench_cuda.py --device cpu --batch 16 --configs fp32,bf16   # the same table on the CPU

Every configuration runs in its own process (``bench_e2e.py --json``), so compile caches and allocator state
do not carry over; the table is written from the JSON lines (kept beside it as ``<out>.jsonl``). The columns:
images/s of ``rdm train`` (the loop's own step) for the two bundled stage sizes and of ``rdm generate``
(the bundled 16 -> 64 relay, PNGs included), each with the network-only rate at the same batch (forward +
backward + Adam for training, the forward calls for generation) and the ratio to ``fp32``: eager fp32 with one
network call per batch, the reference implementation's path on CUDA (where ``fp32`` did not run, the first
configuration that did).

The configurations run in the order given (cheapest and most telling first), and the table is rewritten after
each one, so a run stopped early keeps what it measured. ``--budget`` bounds the whole run in seconds: a
configuration is not started with less than ``--reserve`` seconds left (default 60; the compiled ones need
more, see ``COST``), and one still running when the budget is spent is stopped (its rows are lost, the
table says so). ``benchmarks/cuda_session.sh`` is the one prepared script for a lent GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: name -> extra bench_e2e.py options, in the order they run. ``fp32`` is the baseline of the "x" columns.
CONFIGS = {
    "fp32-chunk8": ["--precision", "fp32", "--net_batch", "8"],   # the previous defaults
    "fp32": ["--precision", "fp32"],
    "bf16": ["--precision", "bf16"],
    "bf16-compile": ["--precision", "bf16", "--compile"],
    "fp32-compile": ["--precision", "fp32", "--compile"],
    "bf16-compile-cl": ["--precision", "bf16", "--compile", "--channels-last"],
}


#: Seconds a configuration needs at least before it is started (compilation dominates the compiled ones).
COST = {"fp32-compile": 150, "bf16-compile": 150, "bf16-compile-cl": 150}


def run(name: str, extra: list[str], args, jsonl: Path, timeout: float | None = None) -> str:
    """Run one configuration; returns ``'ok'``, ``'failed (exit N)'`` or ``'stopped at the budget'``."""
    cmd = [sys.executable, str(HERE / "bench_e2e.py"), "--what", args.what, "--device", args.device,
           "--batch", str(args.batch), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--json", str(jsonl), "--tag", name, *extra]
    if "--net_batch" in extra and "train" in args.what.split(","):  # net_batch is a generation setting only
        cmd[cmd.index("--what") + 1] = "generate"
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    try:
        rc = subprocess.run(cmd, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return "stopped at the budget"
    return "ok" if rc == 0 else f"failed (exit {rc})"


def table(rows: list[dict], device: str, notes: dict[str, str] | None = None) -> str:
    by = {}
    for r in rows:
        key = (r["kind"], r.get("stage", "relay"))
        by.setdefault(r["config"], {})[key] = r
    names = list(by)
    if not rows:
        return f"Device: {device}: no configuration finished.\n" + "".join(
            f"- {n}: {v}\n" for n, v in (notes or {}).items())
    cols = [("train", "stage1"), ("train", "stage2"), ("generate", "relay")]
    order = (["fp32"] if "fp32" in by else []) + names
    base = {c: next((by[n][c]["img_s"] for n in order if c in by[n]), None) for c in cols}
    head = ("| config | train 16x16 img/s (network only) | train 64x64 img/s (network only) "
            "| generate 16->64 img/s (network only) |")
    lines = [f"Device: {device}, batch {rows[0]['batch']}, torch {rows[0]['torch']}.", "", head, "|---|---|---|---|"]
    for n in names:
        cells = []
        for c in cols:
            r = by[n].get(c)
            if r is None:
                cells.append("-")
                continue
            limit = r["limit_img_s"]
            rel = f", {r['img_s'] / base[c]:.2f}x" if base[c] else ""
            cells.append(f"{r['img_s']:.3g} ({limit:.3g}){rel}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    missing = {n: v for n, v in (notes or {}).items() if v != "ok"}
    if missing:
        lines += [""] + [f"- {n}: {v}" for n, v in missing.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--what", default="train,generate")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--out", default=str(HERE / "cuda.md"))
    ap.add_argument("--budget", type=float, help="seconds for the whole run (default: no limit)")
    ap.add_argument("--reserve", type=float, default=60.0, help="seconds a configuration needs to be started")
    args = ap.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: --configs: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    out = Path(args.out)
    jsonl = out.with_suffix(".jsonl")
    jsonl.unlink(missing_ok=True)
    start, notes = time.monotonic(), {}
    for name in names:
        left = None if args.budget is None else args.budget - (time.monotonic() - start)
        if left is not None and left < max(args.reserve, COST.get(name, 0)):
            notes[name] = f"not started ({left:.0f} s of the budget left)"
        else:
            notes[name] = run(name, CONFIGS[name], args, jsonl, timeout=left)
        rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
        out.write_text(table(rows, args.device, notes))
    print(out.read_text())
    failed = [n for n, v in notes.items() if v.startswith("failed")]
    if failed:
        raise SystemExit(f"error: configuration(s) failed: {', '.join(failed)} (their output is above)")


if __name__ == "__main__":
    main()
