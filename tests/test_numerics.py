"""Explicit numerics and device-cached constants: TF32 set in one place and recorded with every run; the
block-DCT matrix and the blur frequencies built once per (size, dtype, device)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from relay_diffusion.cli import main as rdm
from relay_diffusion.core import blur
from relay_diffusion.utils import accel
from test_training import write_dataset


@pytest.fixture
def tf32_flags():
    """Restore torch's TF32 flags after a test that sets them."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("precision,given,expected", [
    ("fp32", None, False), ("fp16", None, True), ("bf16", None, True), (None, None, False),
    ("fp32", True, True), ("bf16", False, False),
])
def test_tf32_default_follows_the_precision(precision, given, expected):
    assert accel.resolve_tf32(precision, given) is expected


@pytest.mark.parametrize("value", [True, False])
def test_set_numerics_sets_cublas_and_cudnn_together_on_cuda(tf32_flags, value):
    # Both flags start opposite to the requested value, so the test fails unless both are set.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not value
    assert accel.set_numerics("cuda", "fp32", value) is value
    assert torch.backends.cuda.matmul.allow_tf32 is value and torch.backends.cudnn.allow_tf32 is value
    # fp32 without an explicit choice is IEEE float32: cuDNN's TF32 (on in torch's default) goes off too.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    assert accel.set_numerics("cuda:0", "fp32") is False
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_set_numerics_is_a_no_op_on_the_cpu_but_resolves(tf32_flags):
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    assert accel.set_numerics("cpu", "bf16") is True
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, True)


def test_network_precision_is_the_reduced_one_of_any_network():
    nets = [torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)]
    assert accel.network_precision(nets) == "fp32"
    nets[1].precision = "fp16"
    assert accel.network_precision(nets) == "fp16"


def test_train_records_tf32(tmp_path):
    data = write_dataset(tmp_path / "d.zip", 8, 8)

    def config(*extra):
        res = CliRunner().invoke(rdm, ["train", f"--outdir={tmp_path}", f"--data={data}", "--dry-run", *extra])
        assert res.exit_code == 0, res.output
        return json.loads(res.output)["config"]

    assert config()["tf32"] is False
    assert config("--precision=bf16")["tf32"] is True
    assert config("--fp16=1", "--no-tf32")["tf32"] is False
    assert config("--tf32")["tf32"] is True


def test_generate_records_tf32(tmp_path, tf32_flags):
    args = ["generate", "--seeds=0", "--device=cpu", "--num_steps_first=2", "--num_steps_second=3"]
    for name, extra, expected in (("default", [], False), ("on", ["--tf32"], True)):
        res = CliRunner().invoke(rdm, [*args, f"--outdir={tmp_path / name}", *extra])
        assert res.exit_code == 0, res.output
        assert json.loads((tmp_path / name / "generation.json").read_text())["tf32"] is expected


# --- device-cached constants ---------------------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dct_matrix_is_cached_and_bit_identical(p, dtype):
    k = torch.arange(p, dtype=torch.float64)[:, None]
    n = torch.arange(p, dtype=torch.float64)[None, :]
    want = torch.cos(math.pi * (2 * n + 1) * k / (2 * p)) * math.sqrt(2.0 / p)
    want[0] /= math.sqrt(2.0)
    first = blur.dct_matrix(p, dtype, "cpu")
    assert first.dtype == dtype and torch.equal(first, want.to(dtype))
    assert blur.dct_matrix(p, dtype, torch.device("cpu")) is first  # not rebuilt, not copied again


def test_dct_and_blur_do_not_rebuild_their_constants(monkeypatch):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    b = torch.full([2, 1, 1, 1], 0.7)
    reference = blur.blur(x, b, 4)
    calls = []
    for name in ("arange", "cos"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    again = [blur.blur(x, b, 4) for _ in range(3)]
    assert calls == []  # neither the DCT matrix nor the frequency grid is built again
    assert all(torch.equal(y, reference) for y in again)
