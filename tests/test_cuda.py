"""What the README states about CUDA, checked on a CUDA machine (skipped without one; the CPU suite covers the
same code paths on the CPU). Run by ``benchmarks/cuda_session.sh``:

- generation calls each network once per sampler step with the whole batch (no chunks of 8);
- an image depends on its seed, and on the batch it was computed in only in the last float bits: the largest
  difference between batch 8 and batches of 3 is reported and must stay within a few grey levels;
- training steps run in fp32, bf16 and fp16 (fused Adam on CUDA, loss scaling, the non-finite clamp) with
  finite losses close to each other from the same weights;
- attention runs on the fused kernels (flash and memory-efficient) in bf16 and fp16: each is forced alone, so a
  refused kernel fails the test instead of falling back to the math kernel.
- a training step never waits for the GPU (``torch.cuda.set_sync_debug_mode('error')``), with and without
  augmentation, also when an fp16 overflow makes it skip its update (fused Adam's ``found_inf``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from torch.nn.attention import SDPBackend, sdpa_kernel

from relay_diffusion.cli import main as rdm
from relay_diffusion.generation import RelayPipeline, generate_images
from relay_diffusion.networks.layers import UNetBlock, self_attention
from relay_diffusion.training import TrainingConfig, plan_training
from relay_diffusion.training.loop import Trainer
from relay_diffusion.utils.distributed import init
from test_attention import strided_attention
from test_training import TINY, write_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

#: Largest uint8 difference allowed between the same seed generated in batches of different sizes on CUDA.
BATCH_DEPENDENCE_MAX = 4


class CallSizes(torch.nn.Module):
    """Forwards to a stage's network and records the batch size of every call."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.sizes = net, []
        for name in ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max", "round_sigma"):
            setattr(self, name, getattr(net, name))

    def forward(self, x, *args, **kwargs):
        self.sizes.append(int(x.shape[0]))
        return self.net(x, *args, **kwargs)


def read(folder, seeds) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / f"{s:06d}.png"), dtype=np.int16) for s in seeds])


def test_one_network_call_per_step_with_the_whole_batch(tmp_path):
    pipe = RelayPipeline.from_bundled("cuda")
    assert pipe.resolved_net_batch is None
    spies = []
    for stage in pipe.stages:
        stage.net = CallSizes(stage.net)
        spies.append(stage.net)
    generate_images(pipe, list(range(16)), str(tmp_path), max_batch_size=16, progress=False)
    for spy in spies:
        assert spy.sizes and set(spy.sizes) == {16}, spy.sizes


def test_images_depend_on_the_batch_only_in_the_last_bits(tmp_path):
    seeds = list(range(8))
    pipe = RelayPipeline.from_bundled("cuda")
    generate_images(pipe, seeds, str(tmp_path / "b8"), max_batch_size=8, progress=False)
    generate_images(pipe, seeds, str(tmp_path / "b3"), max_batch_size=3, progress=False)
    diff = np.abs(read(tmp_path / "b8", seeds) - read(tmp_path / "b3", seeds))
    print(f"batch 8 against batches of 3 on CUDA: max {diff.max()} grey levels, mean {diff.mean():.4f}")
    assert diff.max() <= BATCH_DEPENDENCE_MAX


def test_generate_cli_on_cuda_with_speed_options(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(rdm, ["generate", f"--outdir={out}", "--seeds=0-3", "--device=cuda",
                                   "--precision=bf16", "--channels_last"])
    assert res.exit_code == 0, res.output
    images = read(out, range(4))
    assert images.shape == (4, 64, 64, 3) and images.std() > 1


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_steps_on_cuda(tmp_path, precision):
    data = write_dataset(tmp_path / "data-8.zip", 16, 8)
    cfg = TrainingConfig(**dict(TINY, outdir=str(tmp_path / "runs"), data=str(data), batch=8, duration=1.0,
                                seed=5, tick=1e9, device="cuda", attn=[4], precision=precision))
    t = Trainer(plan_training(cfg, world_size=1), init("cuda"))
    t._setup()
    assert all(p.device.type == "cuda" for p in t.net.parameters())
    losses = [float(t._train_step()) for _ in range(3)]
    assert all(np.isfinite(losses)), losses
    assert all(torch.isfinite(p).all() for p in t.ema.parameters())
    print(f"{precision}: losses {losses}")


@pytest.mark.parametrize("backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_runs_on_the_fused_kernels(backend, dtype):
    """ADM-256's attention shapes (64 channels per head at 32x32, 16x16, 8x8), forward and backward."""
    g = torch.Generator().manual_seed(0)
    for res, channels in [(32, 512), (16, 1024), (8, 1024)]:
        qkv = torch.randn(4, 3 * channels, res, res, generator=g).to("cuda", dtype).requires_grad_(True)
        with torch.no_grad():
            exact = self_attention(qkv.double(), channels // 64)
        with sdpa_kernel(backend):
            out = self_attention(qkv, channels // 64)
            out.float().square().sum().backward()
            with pytest.raises(RuntimeError):  # the earlier strided layout: refused by the fused kernels
                strided_attention(qkv.detach(), channels // 64)
        assert out.dtype == dtype and torch.isfinite(qkv.grad).all()
        assert (out.double() - exact).abs().max() < 0.05, (res, channels)


def test_unet_block_attention_takes_the_flash_kernel_in_bf16():
    block = UNetBlock(256, 256, 512, attention=True, channels_per_head=64).cuda()
    x, emb = torch.randn(2, 256, 16, 16, device="cuda"), torch.randn(2, 512, device="cuda")
    with torch.autocast("cuda", torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = block(x, emb)
    assert torch.isfinite(out).all()


class NoHostSync:
    """CUDA's own check: inside, an operation that makes the host wait for the GPU raises."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("augment", [0.0, 0.5])
def test_training_steps_with_their_data_transfer_make_the_host_wait_nowhere(tmp_path, augment):
    data = write_dataset(tmp_path / "data-8.zip", 32, 8)
    cfg = TrainingConfig(**dict(TINY, outdir=str(tmp_path / "runs"), data=str(data), batch=8, duration=1.0,
                                seed=5, tick=1e9, device="cuda", attn=[4], precision="bf16", augment=augment))
    t = Trainer(plan_training(cfg, world_size=1), init("cuda"))
    t._setup()
    t._train_step()  # first step: allocations, cuDNN autotuning, lazy initialisation
    with NoHostSync():
        for _ in range(3):
            t._train_step()


@pytest.mark.parametrize("solvers", [("heun", "reference"), ("multistep", "multistep")])
def test_sampler_steps_make_the_host_wait_nowhere(solvers):
    """From the end of each stage's first step to its last: the steps themselves. (A sampling reads its schedule
    once, before its loop, and a stage hands its output on after it; those are not steps.)"""
    import dataclasses

    pipe = RelayPipeline.from_bundled("cuda")
    for stage, name in zip(pipe.stages, solvers):
        stage.config = dataclasses.replace(stage.config, solver=name).validate()
    steps = []

    def watch(info):
        steps.append(info["i"])
        if info["i"] == 0:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        if info["i"] == info["num_steps"] - 1:
            torch.cuda.set_sync_debug_mode("default")

    pipe.run(list(range(4)))  # warm-up
    try:
        pipe.run(list(range(4)), callback=watch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert steps.count(0) == 2 and len(steps) > 10


@pytest.mark.parametrize("augment", [0.0, 0.5])
def test_a_training_step_never_waits_for_the_gpu(tmp_path, augment):
    """Every call that waits for the GPU (a value read back, a blocking copy) raises in sync debug mode "error".
    The batches are put on the GPU beforehand: their copy is the data path's (pinned memory, non_blocking)."""
    import math

    data = write_dataset(tmp_path / "data-8.zip", 16, 8)
    cfg = TrainingConfig(**dict(TINY, outdir=str(tmp_path / "runs"), data=str(data), batch=8, duration=1.0,
                                seed=5, tick=1e9, device="cuda", attn=[4], precision="fp16", augment=augment))
    t = Trainer(plan_training(cfg, world_size=1), init("cuda"))
    t._setup()
    staged = []
    for _ in range(4):
        images, labels, positions = next(t.loader)
        staged.append((images.to("cuda"), labels.to("cuda"), positions))
    t.loader = iter(staged)
    t._train_step()  # lazy initialisation (kernels, handles, cached constants) may wait once
    torch.cuda.synchronize()
    clean = t.loss_fn
    torch.cuda.set_sync_debug_mode("error")
    try:
        t._train_step()
        before = [p.detach().clone() for p in [*t.net.parameters(), *t.ema.parameters()]]
        t.loss_fn = lambda *args, **kwargs: clean(*args, **kwargs) * math.inf  # an fp16 overflow
        t._train_step()
        t.loss_fn = clean
        after = [p.detach().clone() for p in [*t.net.parameters(), *t.ema.parameters()]]
        t._train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        t.loss_fn = clean
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # the skipped step changed nothing
    summary = t.tally.read()
    assert (summary.steps, summary.applied, summary.skipped) == (4, 3, 1) and math.isfinite(summary.loss)
    assert all(torch.isfinite(p).all() for p in t.net.parameters())
