"""Shared pieces of the benchmark scripts: a timing wrapper around a network, and the small ADM they use."""

from __future__ import annotations

import io
import math
import time
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from relay_diffusion.generation.batching import carry_denoiser_attributes
from relay_diffusion.networks.precond import build_network


class TimedNet(torch.nn.Module):
    """Forwards to ``net``, adds the seconds spent in it to ``seconds`` and the samples it saw to ``samples``
    (seconds are wall time: on an accelerator they mean little without synchronisation)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.seconds, self.samples = net, 0.0, 0
        carry_denoiser_attributes(net, self)

    def forward(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.net(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.samples += int(args[0].shape[0])
        return out


def small_adm(resolution: int, channel_mult: list[int]) -> TimedNet:
    """An inference-mode ADM (model_channels 32, one block per level, attention at 8x8), timed."""
    net = build_network("EDMPrecond", img_resolution=resolution, img_channels=3, label_dim=0,
                        model_type="DhariwalUNet", model_channels=32, channel_mult=channel_mult, num_blocks=1,
                        attn_resolutions=[8])
    return TimedNet(net.eval().requires_grad_(False))


def make_dataset(path: Path, count: int, res: int) -> Path:
    """An EDM-format zip of ``count`` random RGB images ``res x res`` (seeded), for timing the data path."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as z:
        for i in range(count):
            buf = io.BytesIO()
            PIL.Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(buf, format="PNG")
            z.writestr(f"00000/img{i:08d}.png", buf.getvalue())
    return path


def strided_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Self-attention in the earlier layout: ``[N * heads, HW, C']`` views whose last dimension has stride
    ``HW``, which the fused CUDA kernels refuse (the math kernel runs). The reference of the layout tests and of
    ``bench_adm256.py``'s comparison."""
    n, c3, h, w = qkv.shape
    c = c3 // 3
    q, k, v = qkv.reshape(n * num_heads, c // num_heads, 3, h * w).unbind(2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(n, c, h, w)


def plot(series: dict[str, list[tuple[float, float, float]]], path: Path, xlabel: str, ylabel: str,
         size: tuple[int, int] = (760, 460), log_x: bool = True,
         xticks: tuple[float, ...] = (8, 12, 16, 24, 32, 48, 64, 96), y_from_zero: bool = True) -> None:
    """Lines with markers and +-err bars of ``(x, y, err)`` points, log-x (or linear), linear y, drawn with Pillow
    (as training.stats.plot_loss: no plotting dependency)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    pts = [p for s in series.values() for p in s]
    if not pts:
        return
    fx = math.log if log_x else (lambda v: v)
    lo, hi = min(p[0] for p in pts), max(p[0] for p in pts)
    x0, x1 = (fx(lo * 0.9), fx(hi * 1.1)) if log_x else (lo - 0.05 * (hi - lo or 1), hi + 0.05 * (hi - lo or 1))
    top_y = max(p[1] + p[2] for p in pts)
    y0 = 0.0 if y_from_zero else min(p[1] - p[2] for p in pts) - 0.08 * (top_y - min(p[1] - p[2] for p in pts))
    y1 = top_y + 0.08 * (top_y - y0)
    if y1 - y0 < 1e-9:  # a single point (or a flat line): a range around it
        y0, y1 = y0 - max(1.0, abs(y0) * 0.05), y1 + max(1.0, abs(y1) * 0.05)

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (fx(x) - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for tick in xticks:
        if x0 <= fx(tick) <= x1:
            xx, _ = px(tick, y0)
            draw.line([xx, height - bottom, xx, height - bottom + 4], fill="black")
            draw.text((xx - 6, height - bottom + 8), f"{tick:g}", fill="black", font=font)
    for i in range(6):
        fy = y0 + (y1 - y0) * i / 5
        yy = height - bottom - (fy - y0) / (y1 - y0) * (height - top - bottom)
        draw.line([left - 4, yy, left, yy], fill="black")
        draw.text((6, yy - 6), f"{fy:.3g}", fill="black", font=font)
    draw.text((width // 2 - 120, height - 20), xlabel, fill="black", font=font)
    draw.text((left, 10), ylabel, fill="black", font=font)
    colours = [(200, 60, 30), (20, 80, 200), (30, 150, 60), (140, 40, 160), (200, 140, 0), (90, 90, 90)]
    for k, (label, s) in enumerate(series.items()):
        s = sorted(s)
        col = colours[k % len(colours)]
        if len(s) > 1:
            draw.line([px(x, y) for x, y, _ in s], fill=col, width=2)
        for x, y, err in s:
            cx, cy = px(x, y)
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=col)
            (bx, lo_y), (_, hi_y) = px(x, y - err), px(x, y + err)
            draw.line([bx, lo_y, bx, hi_y], fill=col, width=1)
            for cap in (lo_y, hi_y):  # a bar shorter than the marker still shows its caps
                draw.line([bx - 4, cap, bx + 4, cap], fill=col, width=1)
        draw.text((width - right - 200, top + 10 + 14 * k), label, fill=col, font=font)
    img.save(path)
