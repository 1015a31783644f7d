"""What a run reports: the log, per-tick statistics, the loss curve and optional TensorBoard scalars.

Files are rewritten whole through a temporary name and a rename at every tick (they are small: one line per
tick), so a killed run never leaves a torn file behind. TensorBoard scalars are written only when the
``tensorboard`` package is installed; on a resume in place they are rewritten from the kept records (see
:func:`open_tensorboard`), so every curve has each step once.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from relay_diffusion.utils.fileio import atomic_path, atomic_write_text
from relay_diffusion.utils.jsonio import dumps_strict, loads_strict

LOG_FILE = "log.txt"
STATS_FILE = "stats.jsonl"
LOSS_PLOT = "loss.png"


class RunLog:
    """Prints lines and keeps them for ``log.txt`` (flushed by :meth:`flush`); silent on non-main ranks."""

    def __init__(self, run_dir: Optional[Path], enabled: bool = True) -> None:
        self.path = run_dir / LOG_FILE if run_dir is not None else None
        self.enabled = enabled
        self.lines: list[str] = []
        if self.path is not None and self.path.is_file():  # resuming in place: keep what was logged
            self.lines = self.path.read_text().splitlines()

    def __call__(self, line: str = "") -> None:
        if not self.enabled:
            return
        print(line, flush=True)
        self.lines.append(line)

    def record(self, line: str) -> None:
        """Keep ``line`` for ``log.txt`` without printing it (the caller reports it otherwise)."""
        if self.enabled:
            self.lines.append(line)

    def flush(self) -> None:
        if self.enabled and self.path is not None:
            atomic_write_text(self.path, "\n".join(self.lines) + "\n")


class StatsLog:
    """Per-tick records in ``stats.jsonl``, the loss curve ``loss.png`` and TensorBoard scalars."""

    def __init__(self, run_dir: Path, resume_step: Optional[int] = None) -> None:
        self.run_dir = run_dir
        self.records: list[dict[str, Any]] = []
        path = run_dir / STATS_FILE
        if resume_step is not None and path.is_file():  # keep the records up to the resumed step
            for line in path.read_text().splitlines():
                try:
                    rec = loads_strict(line)  # every value is a number: "nan" / "inf" are floats
                except json.JSONDecodeError:
                    continue
                if rec.get("step", math.inf) <= resume_step:
                    self.records.append(rec)
        self._tb = open_tensorboard(run_dir, self.records if resume_step is not None else None)

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self._tb is not None:
            write_scalars(self._tb, record)
            self._tb.flush()

    def flush(self) -> None:
        text = "".join(dumps_strict(r) + "\n" for r in self.records)
        atomic_write_text(self.run_dir / STATS_FILE, text)
        points = [(r["kimg"], r["loss"]) for r in self.records if math.isfinite(r.get("loss", math.nan))]
        if len(points) >= 2:
            plot_loss(points, self.run_dir / LOSS_PLOT)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


TB_PATTERN = "events.out.tfevents.*"


def tb_step(record: dict[str, Any]) -> int:
    """TensorBoard's global step of a record: the images seen."""
    return int(round(record["kimg"] * 1000))


def write_scalars(writer, record: dict[str, Any]) -> None:
    for key, value in record.items():
        if isinstance(value, (int, float)) and key not in ("tick", "step", "kimg", "timestamp"):
            writer.add_scalar(key, value, global_step=tb_step(record), walltime=record.get("timestamp"))


def open_tensorboard(run_dir: Path, kept: Optional[list[dict[str, Any]]] = None):
    """A ``SummaryWriter`` on ``run_dir``, or None without the ``tensorboard`` package.

    ``kept`` (a resume in place): the records up to the resumed state. A killed run's event files also hold
    the points written after that state, which the resumed run writes again; so the kept records are
    written into a fresh event file and the old files are removed afterwards (a kill in between leaves
    duplicates that the next resume removes). ``purge_step`` tells a TensorBoard that already read the old
    files to drop its points from the first step after the state on.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    if kept is None:
        return SummaryWriter(str(run_dir))
    old = sorted(run_dir.glob(TB_PATTERN))
    purge_step = max((tb_step(r) for r in kept), default=-1) + 1
    writer = SummaryWriter(str(run_dir), purge_step=purge_step)
    for record in kept:
        write_scalars(writer, record)
    writer.flush()
    for path in old:
        path.unlink(missing_ok=True)
    return writer


def memory_gb(device: torch.device) -> dict[str, float]:
    """Resident CPU memory of this process and, on CUDA, peak allocated / reserved GPU memory since the last call."""
    out = {"cpu_mem_gb": _rss_bytes() / 2**30}
    if device.type == "cuda":
        out["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["gpu_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return out


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource  # not Linux: peak instead of current

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}d {h:02d}h {m:02d}m" if d else f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def progress_line(rec: dict[str, Any]) -> str:
    """One line per tick: kimg, loss, sec/kimg, ETA, memory; skipped and clamped steps when there were any."""
    parts = [
        f"tick {rec['tick']:<5d}",
        f"kimg {rec['kimg']:<10.3f}",
        f"loss {rec['loss']:<8.4f}",
        f"sec/tick {rec['sec_per_tick']:<7.2f}",
        f"sec/kimg {rec['sec_per_kimg']:<8.2f}",
        f"ETA {format_duration(rec['eta_sec']):<11s}",
        f"cpumem {rec['cpu_mem_gb']:<5.2f}",
    ]
    if "gpu_mem_gb" in rec:
        parts += [f"gpumem {rec['gpu_mem_gb']:<5.2f}", f"reserved {rec['gpu_reserved_gb']:<5.2f}"]
    parts += [f"{key} {rec[key]}" for key in ("skipped", "clamped") if rec.get(key)]
    return " ".join(parts)


def plot_loss(points: list[tuple[float, float]], path: Path, size: tuple[int, int] = (720, 420),
              xlabel: str = "kimg (thousands of training images)", title: str = "training loss", smooth: bool = True,
              markers: Optional[list[tuple[float, float]]] = None,
              ylabel: str = "loss (mean per pixel)") -> None:
    """Loss against kimg as a PNG, drawn with Pillow (no plotting dependency): raw values (faint) and a running
    mean (``smooth``, named in the legend), or one line through ``points``; ``markers`` are drawn as dots. Both
    axes are labelled."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    left, right, top, bottom = 70, 20, 30, 45
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    every = points + list(markers or [])
    x0, x1 = min(p[0] for p in every), max(p[0] for p in every)
    y0, y1 = min(p[1] for p in every), max(p[1] for p in every)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):
        fy = y0 + (y1 - y0) * i / 4
        _, yy = px(x0, fy)
        draw.line([left - 4, yy, left, yy], fill="black")
        draw.text((16, yy - 6), f"{fy:.4g}", fill="black", font=font)
        fx = x0 + (x1 - x0) * i / 4
        xx, _ = px(fx, y0)
        draw.line([xx, height - bottom, xx, height - bottom + 4], fill="black")
        draw.text((xx - 15, height - bottom + 8), f"{fx:.4g}", fill="black", font=font)
    draw.text((width // 2 - 3 * len(xlabel), height - 18), xlabel, fill="black", font=font)
    label = Image.new("RGB", (6 * len(ylabel) + 4, 12), "white")  # the y label, written then turned upright
    ImageDraw.Draw(label).text((2, 0), ylabel, fill="black", font=font)
    label = label.rotate(90, expand=True)
    img.paste(label, (0, max(top, (height - label.height) // 2)))
    draw.text((left, 8), title, fill="black", font=font)
    if smooth:
        draw.line([px(x, y) for x, y in points], fill=(170, 170, 220), width=1)
        k = max(1, len(points) // 20)
        ys = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
        legend = f"faint: each value; bold: running mean of {k}"
        draw.text((width - right - 6 * len(legend) - 4, 8), legend, fill=(20, 60, 200), font=font)
    draw.line([px(x, y) for x, y in zip(xs, ys)], fill=(20, 60, 200), width=2)
    for x, y in markers or []:
        cx, cy = px(x, y)
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=(200, 40, 40))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
