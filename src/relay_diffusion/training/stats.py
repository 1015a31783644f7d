"""What a run reports: the log, per-tick statistics, the loss curve and optional TensorBoard scalars.

Files are rewritten whole through a temporary name and a rename at every tick (they are small: one line per
tick), so a killed run never leaves a torn file behind. TensorBoard scalars are written only when the
``tensorboard`` package is installed.
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
        self._tb = _tensorboard_writer(run_dir)

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("tick", "step", "kimg", "timestamp"):
                    self._tb.add_scalar(key, value, global_step=int(round(record["kimg"] * 1000)))
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


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir))


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
    """One line per tick: kimg, loss, sec/kimg, ETA, memory."""
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
    return " ".join(parts)


def plot_loss(points: list[tuple[float, float]], path: Path, size: tuple[int, int] = (720, 420)) -> None:
    """Loss against kimg as a PNG, drawn with Pillow (no plotting dependency): raw values and a running mean."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    left, right, top, bottom = 70, 20, 30, 45
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
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
        draw.text((4, yy - 6), f"{fy:.4g}", fill="black", font=font)
        fx = x0 + (x1 - x0) * i / 4
        xx, _ = px(fx, y0)
        draw.line([xx, height - bottom, xx, height - bottom + 4], fill="black")
        draw.text((xx - 15, height - bottom + 8), f"{fx:.4g}", fill="black", font=font)
    draw.text((width // 2 - 15, height - 18), "kimg", fill="black", font=font)
    draw.text((left, 8), "training loss", fill="black", font=font)
    draw.line([px(x, y) for x, y in points], fill=(170, 170, 220), width=1)
    k = max(1, len(points) // 20)
    smooth = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
    draw.line([px(x, y) for x, y in zip(xs, smooth)], fill=(20, 60, 200), width=2)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
