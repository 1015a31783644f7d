"""Attention layout: q/k/v reach ``scaled_dot_product_attention`` with a contiguous last dimension (what the
fused CUDA kernels need), and the images stay those of the earlier layout bit for bit on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import relay_diffusion.networks.layers as layers
from relay_diffusion.generation import RelayPipeline, generate_images

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import strided_attention  # noqa: E402  (the earlier layout, shared with bench_adm256.py)

SEEDS = list(range(4))


def generate(folder) -> np.ndarray:
    pipe = RelayPipeline.from_bundled("cpu")
    generate_images(pipe, SEEDS, str(folder), max_batch_size=4, progress=False)
    return np.stack([np.asarray(Image.open(folder / f"{s:06d}.png")) for s in SEEDS])


def test_every_attention_call_of_the_bundled_pipeline_gets_a_contiguous_last_dimension(tmp_path, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append(tuple(t.stride(-1) for t in (q, k, v)))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    images = generate(tmp_path / "new")
    assert calls, "the bundled pipeline made no attention call"
    assert set(calls) == {(1, 1, 1)}, set(calls)

    monkeypatch.setattr(layers, "self_attention", strided_attention)
    calls.clear()
    earlier = generate(tmp_path / "earlier")
    assert calls and set(calls) != {(1, 1, 1)}  # the reference layout really was the strided one
    assert np.array_equal(images, earlier)


def test_attention_matches_the_strided_layout_bit_for_bit_on_the_cpu():
    g = torch.Generator().manual_seed(1)
    for n, c, heads, res, dtype in [(2, 192, 3, 8, torch.float32), (1, 256, 4, 16, torch.float32),
                                    (3, 128, 2, 16, torch.bfloat16), (2, 64, 1, 4, torch.float16)]:
        qkv = torch.randn(n, 3 * c, res, res, generator=g).to(dtype)
        for x in (qkv, qkv.to(memory_format=torch.channels_last)):
            assert torch.equal(layers.self_attention(x, heads), strided_attention(x, heads)), (n, c, heads, dtype)
