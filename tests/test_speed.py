"""Speed options: the automatic network batch, guidance in one call, channels-last, bf16 on the
CPU (sampling and training), the fp16 gradient handling (loss scaling, non-finite clamp), the EMA update, and
torch.compile (slow suite)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from relay_diffusion.cli import main as rdm
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.core.samplers import denoise, edm_sampler
from relay_diffusion.generation import EDMStage, EDMStageConfig, RelayPipeline, RelayStage, RelayStageConfig
from relay_diffusion.generation import batching as batching_mod
from relay_diffusion.generation.batching import CPU_NET_BATCH, FixedBatchDenoiser, auto_net_batch
from relay_diffusion.networks.precond import build_network
from relay_diffusion.training import TrainingConfig, plan_training
from relay_diffusion.training.loop import Trainer
from relay_diffusion.utils import accel
from relay_diffusion.utils.distributed import init
from test_stage_unit import snapshot
from test_training import TINY, write_dataset

#: bf16 against fp32 on the CPU: one network call (relative to the output's largest entry), and whole
#: samplings (absolute, images in [-1, 1]); bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%).
BF16_NET_RTOL = 0.03
BF16_SAMPLE_ATOL = 0.1


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_net(res: int = 8, label_dim: int = 0, seed: int = 0, **kwargs) -> torch.nn.Module:
    """An ADM with two levels and attention (GEMMs and convolutions of several shapes), random weights."""
    net = build_network("EDMPrecond", img_resolution=res, img_channels=3, label_dim=label_dim,
                        model_type="DhariwalUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1,
                        attn_resolutions=[res // 2], **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval().requires_grad_(False)


def batch(n: int, res: int = 8, label_dim: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, res, res, generator=g)
    sigma = torch.exp(torch.randn(n, generator=g))
    labels = torch.eye(label_dim)[torch.arange(n) % label_dim] if label_dim else None
    return x, sigma, labels


class Spy(torch.nn.Module):
    """A denoiser that records the batch size of every call (and can run out of memory above a size)."""

    sigma_min, sigma_max, img_resolution, img_channels, label_dim = 0.0, math.inf, 8, 3, 4

    def __init__(self, oom_above: int | None = None) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.oom_above = oom_above

    def forward(self, x, sigma, class_labels=None):
        if self.oom_above is not None and x.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.sizes.append(x.shape[0])
        lab = 0 if class_labels is None else class_labels.sum(1).reshape(-1, 1, 1, 1)
        return x * 0.5 + sigma.reshape(-1, 1, 1, 1) * 0.1 + lab


# --- network batch ---------------------------------------------------------------------------------------
def test_net_batch_is_8_on_the_cpu_and_the_whole_batch_elsewhere():
    assert auto_net_batch(None, "cpu") == CPU_NET_BATCH == 8
    assert auto_net_batch(None, "cuda") is None and auto_net_batch(None, torch.device("cuda", 1)) is None
    assert auto_net_batch(4, "cuda") == 4 and auto_net_batch(1, "cpu") == 1
    spy = Spy()
    x, sigma, _ = batch(11)
    FixedBatchDenoiser(spy)(x, sigma)
    assert spy.sizes == [8, 8]  # padded chunks of 8 on the CPU
    spy.sizes.clear()
    FixedBatchDenoiser(spy, 16)(x, sigma)
    assert spy.sizes == [16]


def test_whole_batch_calls_and_guidance_in_one_call(monkeypatch):
    """With the accelerators' default (the whole batch), every denoiser evaluation is one network call, also
    with guidance (a 2N batch), and the result equals the separate conditional / unconditional calls."""
    monkeypatch.setattr(batching_mod, "auto_net_batch", lambda net_batch, device: net_batch)
    spy = Spy()
    n, steps = 5, 4
    rng = SeedGenerators(range(n))
    labels = torch.eye(4)[torch.arange(n) % 4]
    edm_sampler(FixedBatchDenoiser(spy), rng.randn([3, 8, 8]), rng, labels, num_steps=steps, cfg_scale=2.0)
    assert spy.sizes == [2 * n] * (2 * steps - 1)
    x, sigma, _ = batch(n)
    t = torch.tensor(0.7, dtype=torch.float64)
    expected = 2.0 * spy(x, t.float().expand(n), labels).double() - 1.0 * spy(x, t.float().expand(n), None).double()
    assert torch.equal(denoise(FixedBatchDenoiser(spy), x.double(), t, labels, 2.0), expected)


def test_out_of_memory_splits_the_batch_and_remembers():
    spy = Spy(oom_above=4)
    x, sigma, _ = batch(16)
    denoiser = FixedBatchDenoiser(spy)
    out = denoiser._unpadded(x, sigma, None)
    assert denoiser.max_chunk == 4 and spy.sizes == [4, 4, 4, 4]
    assert torch.equal(out, Spy()(x, sigma))
    spy.sizes.clear()
    denoiser._unpadded(x, sigma, None)
    assert spy.sizes == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="boom"):
        FixedBatchDenoiser(lambda *a: (_ for _ in ()).throw(ValueError("boom")))._unpadded(x, sigma, None)


@pytest.mark.parametrize("n", [3, 8, 13])
def test_guidance_in_one_call_is_bit_identical_on_the_cpu(n):
    """The CPU's padded chunks of 8 make a sample's result independent of its neighbours, so one 2N call
    gives exactly the two separate calls' results (the reference fixtures' CFG cases pass unchanged too)."""
    net = FixedBatchDenoiser(small_net(label_dim=4))
    x, _, labels = batch(n, label_dim=4)
    t = torch.tensor(1.3, dtype=torch.float64)
    sigma = t.float().expand(n)
    with torch.no_grad():
        expected = 3.0 * net(x, sigma, labels).double() - 2.0 * net(x, sigma, None).double()
        assert torch.equal(denoise(net, x.double(), t, labels, 3.0), expected)


def test_pipeline_files_record_the_automatic_net_batch(tmp_path):
    from relay_diffusion.generation.pretrained import _net_batch

    assert _net_batch(None, tmp_path) is None and _net_batch(4, tmp_path) == 4
    for bad in (0, 2.5, True, "8"):
        with pytest.raises(ValueError, match="net_batch"):
            _net_batch(bad, tmp_path)
    bundled = RelayPipeline.from_bundled()
    assert bundled.net_batch is None and bundled.resolved_net_batch == 8


# --- channels-last, compile (lazy part) -----------------------------------------------------------------
def test_channels_last_gives_the_same_outputs():
    net = small_net(label_dim=4)
    fast = accel.use_channels_last(copy.deepcopy(net))
    assert fast.model.enc["8x8_conv"].weight.is_contiguous(memory_format=torch.channels_last)
    assert list(fast.state_dict()) == list(net.state_dict())
    x, sigma, labels = batch(4, label_dim=4)
    with torch.no_grad():
        ref, out = net(x, sigma, labels), fast(x, sigma, labels)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


def test_compile_is_in_place_and_keeps_parameter_names():
    net = small_net()
    names = list(net.state_dict())
    assert not accel.is_compiled(net)
    assert accel.compile_network(net) is net and accel.is_compiled(net)  # lazy: compiles on the first call
    assert list(net.state_dict()) == names and accel.backbone(net) is net.model


# --- bf16 on the CPU -------------------------------------------------------------------------------------
def test_bf16_on_the_cpu_only_when_asked():
    ref = small_net(label_dim=4)
    net = small_net(label_dim=4, precision="bf16")
    seen = []
    net.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x, sigma, labels = batch(4, label_dim=4)
    with torch.no_grad():
        exact = ref(x, sigma, labels)
        assert torch.equal(net(x, sigma, labels), exact) and seen == [torch.float32]  # recorded, not asked
        accel.allow_cpu_bf16(net)
        out = net(x, sigma, labels)
        assert seen[-1] == torch.bfloat16 and out.dtype == torch.float32
        assert torch.equal(net(x, sigma, labels, force_fp32=True), exact)
    err = float((out - exact).abs().max() / exact.abs().max())
    assert 0 < err < BF16_NET_RTOL
    with pytest.raises(ValueError, match="bf16 only"):
        accel.allow_cpu_bf16(small_net(precision="fp16"))


def test_fp16_path_of_the_layers_runs_forward_and_backward_on_the_cpu():
    """The code ``--precision fp16`` runs on CUDA (activations in float16, float32 weights cast per layer,
    gradients back in float32), executed on the CPU: forward and weight gradients close to fp32."""
    net = small_net(label_dim=4).requires_grad_(True)
    x, sigma, labels = batch(4, label_dim=4)
    grads = {}
    for dtype in (torch.float32, torch.float16):
        net.zero_grad(set_to_none=True)
        out = net.model(x.to(dtype), sigma.log() / 4, labels)
        assert out.dtype == dtype
        out.float().square().sum().backward()
        grads[dtype] = [p.grad.clone() for p in net.parameters()]
        if dtype == torch.float32:
            ref = out.detach()
    assert float((out.detach().float() - ref).abs().max() / ref.abs().max()) < 0.01
    for g32, g16 in zip(grads[torch.float32], grads[torch.float16]):
        assert g16.dtype == torch.float32 and torch.isfinite(g16).all()
        assert float((g16 - g32).abs().max()) <= 0.05 * float(g32.abs().max()) + 1e-6


def relay_pair(precision: str | None = None) -> RelayPipeline:
    first, second = small_net(4, seed=1, precision=precision), small_net(8, seed=2, precision=precision)
    if precision == "bf16":
        accel.allow_cpu_bf16(first), accel.allow_cpu_bf16(second)
    return RelayPipeline([EDMStage(first, EDMStageConfig(num_steps=6)),
                          RelayStage(second, RelayStageConfig(num_steps=12), BlurProcess(up_scale=2))])


def test_bf16_sampling_on_the_cpu_is_close_to_fp32():
    ref = relay_pair().run(range(4))
    out = relay_pair("bf16").run(range(4))
    for a, b in zip(ref, out):
        assert a.dtype == b.dtype == torch.float64 and torch.isfinite(b).all()
        diff = (a - b).abs()
        assert 0 < float(diff.max()) < BF16_SAMPLE_ATOL and float(diff.mean()) < BF16_SAMPLE_ATOL / 5


def trainer(root: Path, **overrides) -> Trainer:
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data-8.zip"
    if not data.exists():
        write_dataset(data, 16, 8)
    cfg = dict(TINY, outdir=str(root / "runs"), data=str(data), batch=8, duration=1.0, seed=5, tick=1e9,
               device="cpu", attn=[4])
    t = Trainer(plan_training(TrainingConfig(**{**cfg, **overrides}), world_size=1), init("cpu"))
    t._setup()
    return t


def test_bf16_training_steps_on_the_cpu(tmp_path, capsys):
    ref, low = trainer(tmp_path), trainer(tmp_path, precision="bf16")
    low.net.load_state_dict(ref.net.state_dict())
    low.ema.load_state_dict(ref.ema.state_dict())
    seen = []
    low.net.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    losses = [(ref._train_step(), low._train_step()) for _ in range(3)]
    assert seen == [torch.bfloat16] * 3 and low.ema.reduced_on_cpu
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in low.net.parameters())
    for a, b in losses:  # same images, noise and dropout: the loss differs by the bf16 rounding only
        assert math.isfinite(b) and abs(a - b) / a < 0.05
    assert losses[-1][0] != losses[-1][1]  # (not at the first step: EDM's zero-initialised output layer)
    drift = max(float((p - q).detach().abs().max()) for p, q in zip(ref.net.parameters(), low.net.parameters()))
    assert drift < 10 * ref.cfg.lr * 3  # Adam moves every weight by about lr per step in both runs


# --- fp16 gradient handling (EDM's loss scaling) and the EMA -----------------------------------------------
def fake_params(*grads: torch.Tensor) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


@pytest.mark.parametrize("multi_tensor", [False, True])  # the CPU's per-tensor maxima, the accelerators' foreach
def test_clamp_gradients_replaces_non_finite_entries_like_edm(multi_tensor):
    finite = fake_params(torch.randn(5, 3), torch.randn(7))
    before = [p.grad.clone() for p in finite]
    assert not accel.clamp_gradients(finite, multi_tensor)
    assert all(torch.equal(p.grad, b) for p, b in zip(finite, before))
    huge = fake_params(torch.full((4,), 3e38), torch.full((3,), -3e38))  # finite, but their sums overflow
    assert not accel.clamp_gradients(huge, multi_tensor) and all(torch.isfinite(p.grad).all() for p in huge)
    assert torch.equal(huge[0].grad, torch.full((4,), 3e38))
    bad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 65504.0, -2.0])
    for one_bad in (torch.tensor([0.0, float("nan")]), torch.tensor([-float("inf")])):  # each kind alone
        alone = fake_params(torch.ones(3), one_bad)
        flag = accel.clamp_gradients(alone, multi_tensor)
        assert flag.shape == () and flag.dtype == torch.bool and flag and torch.isfinite(alone[1].grad).all()
    params = fake_params(bad, torch.ones(3), bad.reshape(2, 3))
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: skipped
    assert accel.clamp_gradients(params, multi_tensor)
    expected = torch.tensor([1.0, 0.0, 1e5, -1e5, 65504.0, -2.0])
    assert torch.equal(params[0].grad, expected) and torch.equal(params[2].grad, expected.reshape(2, 3))
    assert torch.equal(params[1].grad, torch.ones(3)) and params[3].grad is None
    # the same as the loop's former per-tensor nan_to_num
    assert torch.equal(torch.nan_to_num(bad, nan=0, posinf=1e5, neginf=-1e5), expected)


def test_an_overflowing_step_is_clamped_and_applied_not_skipped(tmp_path):
    t = trainer(tmp_path)
    param = t.net.model.enc["8x8_conv"].weight
    param.register_hook(lambda g: torch.full_like(g, float("inf")))  # an fp16-style overflow in one tensor
    before = param.detach().clone()
    loss = t._train_step()
    assert math.isfinite(loss) and t.step == 1
    assert all(torch.isfinite(p).all() for p in t.net.parameters())
    moved = (param.detach() - before).abs()
    assert torch.allclose(moved, torch.full_like(moved, t.cfg.lr), rtol=1e-3)  # Adam's first step: lr * sign


def test_loss_scaling_leaves_the_adam_step_unchanged(tmp_path):
    """``--ls`` multiplies the gradients (it keeps fp16 gradients away from underflow); Adam divides it out."""
    a, b = trainer(tmp_path / "a"), trainer(tmp_path / "b", ls=1024.0)
    b.net.load_state_dict(a.net.state_dict())
    before = [p.detach().clone() for p in a.net.parameters()]
    grads = {}
    for t in (a, b):
        t._train_step()
        grads[t.cfg.ls] = [p.grad.clone() for p in t.net.parameters()]
    for g1, g2 in zip(grads[1.0], grads[1024.0]):
        assert torch.allclose(g2, 1024 * g1, rtol=1e-4, atol=1e-6)
    lr = a.cfg.lr
    steps = [(p.detach() - w, q.detach() - w) for p, q, w in zip(a.net.parameters(), b.net.parameters(), before)]
    assert max(float(da.abs().max()) for da, _ in steps) > 0.5 * lr
    # equal up to Adam's eps (1e-8), which matters only for gradients of that size
    assert max(float((da - db).abs().max()) for da, db in steps) < 0.2 * lr
    assert sum(float((da - db).abs().sum()) for da, db in steps) < 1e-3 * sum(float(da.abs().sum()) for da, _ in steps)


@pytest.mark.parametrize("multi_tensor", [False, True])
@pytest.mark.parametrize("beta", [0.9993, 0.3])  # lerp computes differently for weights below and above 0.5
def test_fused_ema_update_is_bit_identical(multi_tensor, beta):
    g = torch.Generator().manual_seed(0)
    net = [torch.randn(s, generator=g) for s in ((64, 3, 3, 3), (64,), (7, 5))]
    ema = [torch.randn(t.shape, generator=g) for t in net]
    expected = [e.clone().copy_(p.lerp(e, beta)) for p, e in zip(net, ema)]  # EDM's ema.copy_(net.lerp(ema, beta))
    ema_ids = [id(e) for e in ema]
    accel.ema_update(ema, net, beta, multi_tensor)
    assert [id(e) for e in ema] == ema_ids  # in place
    assert all(torch.equal(e, x) for e, x in zip(ema, expected))
    assert not any(torch.equal(e, p) for e, p in zip(ema, net))


# --- the command line ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("nets")
    return [f"--network_first={snapshot(root / 'a.safetensors', 4, 'edm', seed=1)}",
            f"--network_second={snapshot(root / 'b.safetensors', 8, 'relay', seed=2, process=BlurProcess(up_scale=2))}"]


def generate(outdir: Path, nets: list[str], *extra: str) -> list:
    import numpy as np
    from PIL import Image

    args = ["generate", f"--outdir={outdir}", "--seeds=0-2", "--device=cpu", "--num_steps_first=4",
            "--num_steps_second=10", *nets, *extra]
    res = CliRunner().invoke(rdm, args)
    assert res.exit_code == 0, res.output
    return res.output, [np.asarray(Image.open(outdir / f"{s:06d}.png"), dtype=np.int16) for s in range(3)]


def test_generate_speed_options(tmp_path, nets):
    out, ref = generate(tmp_path / "ref", nets)
    assert "network batch 8" in out
    assert json.loads((tmp_path / "ref" / "generation.json").read_text())["net_batch"] == 8
    _, cl = generate(tmp_path / "cl", nets, "--channels_last")
    _, low = generate(tmp_path / "bf16", nets, "--precision=bf16")
    for a, b, c in zip(ref, cl, low):
        assert abs(a - b).max() <= 1  # channels-last: float rounding, at most one grey level
        assert 0 < abs(a - c).max() <= 32 and abs(a - c).mean() < 4  # bf16: close, not equal


def test_train_speed_options_are_recorded(tmp_path):
    from relay_diffusion.cli.train import train as train_cli

    data = write_dataset(tmp_path / "d.zip", 8, 8)
    res = CliRunner().invoke(train_cli, [f"--outdir={tmp_path}", f"--data={data}", "--compile=1",
                                         "--channels-last=1", "--precision=bf16", "--dry-run"])
    assert res.exit_code == 0, res.output
    config = json.loads(res.output)["config"]
    assert config["compile"] is True and config["channels_last"] is True and config["precision"] == "bf16"


# --- torch.compile (minutes on a small CPU) ----------------------------------------------------------------
@pytest.mark.slow
def test_compiled_network_matches_eager():
    net = small_net(label_dim=4)
    fast = accel.compile_network(copy.deepcopy(net))
    x, sigma, labels = batch(8, label_dim=4)
    with torch.no_grad():
        ref, out = net(x, sigma, labels), fast(x, sigma, labels)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.slow
def test_compiled_training_and_generation(tmp_path, nets):
    t = trainer(tmp_path, compile=True, channels_last=True)
    assert accel.is_compiled(t.net) and not accel.is_compiled(t.ema)
    losses = [t._train_step() for _ in range(2)]
    assert all(math.isfinite(v) for v in losses)
    t._snapshot()  # the EMA (eager, contiguous) is written as safetensors
    _, ref = generate(tmp_path / "ref", nets)
    _, comp = generate(tmp_path / "compiled", nets, "--compile")
    for a, b in zip(ref, comp):
        assert abs(a - b).max() <= 1
