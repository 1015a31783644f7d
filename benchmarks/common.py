"""Shared pieces of the benchmark scripts: a timing wrapper around a network, and the small ADM they use."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from relay_diffusion.networks.precond import build_network


class TimedNet(torch.nn.Module):
    """Forwards to ``net``, adds the seconds spent in it to ``seconds`` and the samples it saw to ``samples``
    (seconds are wall time: on an accelerator they mean little without synchronisation)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.seconds, self.samples = net, 0.0, 0
        self.img_resolution, self.img_channels, self.label_dim = net.img_resolution, net.img_channels, net.label_dim
        self.sigma_min, self.sigma_max, self.round_sigma = net.sigma_min, net.sigma_max, net.round_sigma

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
