"""Host memory of the training data path: no decoded copy by default, one shared memory-mapped copy with
``--cache``, the refusal when it cannot fit, the uint8 transfer with conversion on the device, the default
worker count, and the PSS measuring helper of ``benchmarks/bench_hostmem.py``."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils._python_dispatch import TorchDispatchMode

from relay_diffusion.cli.train import train as train_cli
from relay_diffusion.data import cache as cache_module
from relay_diffusion.data.dataset import ImageFolderDataset
from relay_diffusion.training import ConfigError, TrainingConfig, plan_training, run_training
from relay_diffusion.training import loop as loop_module
from relay_diffusion.training.order import DataOrder, StepLayout, default_workers, device_batch, make_loader
from test_data import _images, make_dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_hostmem  # noqa: E402

LINUX_PROC = Path("/proc/self/maps").exists()
TINY_ARGS = ["--cbase=16", "--cres=1,2", "--num-blocks=1", "--attn=", "--dropout=0", "--lr-rampup=0"]


@pytest.fixture
def data(tmp_path) -> Path:
    return make_dataset(tmp_path, _images(12, 8, 8), labels=list(range(12)))


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


class _MapsOf(torch.utils.data.Dataset):
    """Item i: (the pid of the process reading it, whether that process maps ``path``, the image)."""

    def __init__(self, dataset: ImageFolderDataset, path: str) -> None:
        self.dataset, self.path = dataset, path

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image = self.dataset[i][0]  # maps the cache in this process on first use
        with open("/proc/self/maps") as f:
            mapped = any(line.rstrip().endswith(self.path) for line in f)
        return os.getpid(), mapped, image


@pytest.mark.skipif(not LINUX_PROC, reason="reads /proc/self/maps")
def test_cache_is_written_once_and_mapped_by_every_worker(tmp_path, data):
    ds = ImageFolderDataset(data, cache=True, cache_dir=tmp_path / "cache")
    assert ds.cache_status.startswith("built: ")
    path = ds.cache_status.split(": ", 1)[1]
    assert sorted(os.listdir(tmp_path / "cache")) == sorted([os.path.basename(path), os.path.basename(path) + ".lock"])
    before = _stat(path)
    again = ImageFolderDataset(data, cache=True, cache_dir=tmp_path / "cache")
    assert again.cache_status == f"reused: {path}" and _stat(path) == before  # not rewritten
    assert len(pickle.dumps(again)) < ds.decoded_bytes  # workers receive the file name, not the images

    loader = torch.utils.data.DataLoader(_MapsOf(again, path), batch_size=None, num_workers=2)
    items = list(loader)
    assert len({pid for pid, _, _ in items} - {os.getpid()}) == 2  # two worker processes ...
    assert all(mapped for _, mapped, _ in items)  # ... each mapping the one file
    plain = ImageFolderDataset(data)
    for i, (_, _, image) in enumerate(items):
        np.testing.assert_array_equal(np.asarray(image), plain[i][0])
    assert _stat(path) == before


def _open_in_child(data: str, folder: str, start, out) -> None:
    start.wait()
    out.put(ImageFolderDataset(data, cache=True, cache_dir=folder).cache_status.split(":")[0])


def test_concurrent_processes_build_the_cache_once(tmp_path, data, monkeypatch):
    decode = ImageFolderDataset._decode

    def slow(self, raw_idx):  # widen the race: a build takes ~0.25 s
        time.sleep(0.02)
        return decode(self, raw_idx)

    monkeypatch.setattr(ImageFolderDataset, "_decode", slow)
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_open_in_child, args=(str(data), str(tmp_path / "c"), start, out)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    statuses = sorted(out.get(timeout=5) for _ in procs)
    assert statuses == ["built", "reused", "reused"]
    assert [f for f in os.listdir(tmp_path / "c") if ".tmp-" in f] == []


def test_damaged_or_stale_cache_is_rebuilt(tmp_path):
    images = _images(6, 8, 8)
    data = make_dataset(tmp_path, images)
    folder = tmp_path / "cache"
    path = ImageFolderDataset(data, cache=True, cache_dir=folder).cache_status.split(": ", 1)[1]
    arr = np.load(path, mmap_mode="r+")
    arr[0] = 255 - arr[0]  # same length, wrong pixels
    arr.flush()
    del arr
    ds = ImageFolderDataset(data, cache=True, cache_dir=folder)
    assert ds.cache_status.startswith("rebuilt (image 0 differs")
    np.testing.assert_array_equal(ds[0][0], images[0].transpose(2, 0, 1))

    with open(path, "r+b") as f:  # a truncated file
        f.truncate(os.path.getsize(path) - 10)
    assert ImageFolderDataset(data, cache=True, cache_dir=folder).cache_status.startswith("rebuilt (unreadable")

    time.sleep(0.01)
    new = _images(7, 8, 8)[1:]
    make_dataset(tmp_path, new)  # the dataset changes under the same name
    ds = ImageFolderDataset(data, cache=True, cache_dir=folder)
    assert ds.cache_status.startswith("built: ") and ds.cache_status.split(": ", 1)[1] != path
    for i in range(6):
        np.testing.assert_array_equal(ds[i][0], new[i].transpose(2, 0, 1))


def test_cache_build_failure_leaves_no_file(tmp_path):
    data = make_dataset(tmp_path, _images(3, 4, 4) + _images(1, 5, 4))
    with pytest.raises(ValueError, match=r"img00000003.png' has shape \[3, 5, 4\]"):
        ImageFolderDataset(data, cache=True, cache_dir=tmp_path / "cache")
    assert [f for f in os.listdir(tmp_path / "cache") if not f.endswith(".lock")] == []


@pytest.mark.parametrize("workers", [0, 2])
def test_same_batches_with_and_without_cache(tmp_path, data, workers):
    def batches(cache: bool) -> list:
        ds = ImageFolderDataset(data, use_labels=True, xflip=True, cache=cache, cache_dir=tmp_path / "cache")
        it = make_loader(ds, DataOrder(len(ds), seed=3), StepLayout(8, 4, 2), 1, 16, workers, pin_memory=False)
        return [next(it) for _ in range(5)]  # 40 positions: more than an epoch of the 24 items

    for a, b in zip(batches(False), batches(True)):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_default_keeps_no_decoded_copy(tmp_path, data):
    assert TrainingConfig(outdir="x", data="y").cache is False
    ds = ImageFolderDataset(data)
    size = len(pickle.dumps(ds))
    for i in range(len(ds)):
        ds[i]
    assert ds.cache_status is None and len(pickle.dumps(ds)) == size  # nothing kept by reading
    assert not any(isinstance(v, dict) or (isinstance(v, np.ndarray) and v.dtype == np.uint8)
                   for v in vars(ds).values())


def test_cache_refused_when_larger_than_memory(tmp_path, data, monkeypatch):
    cfg = dict(outdir=str(tmp_path / "runs"), data=str(data), batch=4, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(cache_module, "available_memory", lambda: 1000)
    with pytest.raises(ConfigError) as info:
        plan_training(TrainingConfig(cache=True, **cfg), world_size=1)
    assert info.value.option == "--cache" and "needs 0.0 GiB but only 0.0 GiB" in info.value.message
    plan_training(TrainingConfig(cache=False, **cfg), world_size=1)  # no cache: nothing to refuse

    result = CliRunner().invoke(train_cli, ["--outdir", cfg["outdir"], "--data", str(data), "--batch=4",
                                            "--cache=1", f"--cache-dir={cfg['cache_dir']}", "--device=cpu"])
    assert result.exit_code != 0 and "--cache" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
    monkeypatch.setattr(cache_module, "available_memory", lambda: 10**6)
    plan_training(TrainingConfig(cache=True, **cfg), world_size=1)  # 12 x 3 x 8 x 8 bytes fit


class _Copies(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            self.ops.append((args[0].device.type, args[0].dtype, out.device.type, out.dtype,
                             (kwargs or {}).get("non_blocking", False)))
        return out


def test_uint8_batch_reaches_the_device_before_conversion():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    labels = torch.eye(4)
    with _Copies() as mode:
        device_batch(images, labels, torch.device("meta"))
    assert mode.ops[0] == ("cpu", torch.uint8, "meta", torch.uint8, True)  # the copy moves uint8 ...
    assert ("meta", torch.uint8, "meta", torch.float32, False) in mode.ops  # ... converted on the device
    assert not any(src == "cpu" and dtype == torch.float32 and dev == "cpu" for src, _, dev, dtype, _ in mode.ops)
    x, y = device_batch(images, labels, torch.device("cpu"))
    assert torch.equal(x, images.to(torch.float32) / 127.5 - 1) and torch.equal(y, labels)  # bit-identical


def test_training_step_hands_the_device_uint8(tmp_path, data, monkeypatch):
    seen = []

    def spy(images, labels, device):
        seen.append((images.dtype, images.is_pinned(), None if labels is None else labels.dtype))
        return device_batch(images, labels, device)

    monkeypatch.setattr(loop_module, "device_batch", spy)
    cfg = TrainingConfig(outdir=str(tmp_path / "runs"), data=str(data), cond=True, batch=4, duration=8e-6,
                         cbase=16, cres=[1, 2], num_blocks=1, attn=[], dropout=0.0, lr_rampup=0.0, grid=0,
                         workers=0, tick=1e9, snap=None, seed=1, device="cpu")
    run_training(plan_training(cfg, world_size=1))
    assert seen == [(torch.uint8, False, torch.float32)] * 2  # pinned only on CUDA


def test_default_workers():
    assert default_workers(1, cpus=16) == 2 and default_workers(8, cpus=64) == 2
    assert default_workers(1, cpus=2) == 1 and default_workers(8, cpus=16) == 1 and default_workers(2, cpus=2) == 0
    assert TrainingConfig(outdir="x", data="y").workers is None


def test_plan_resolves_and_records_workers(tmp_path, data, monkeypatch):
    cfg = TrainingConfig(outdir=str(tmp_path), data=str(data), batch=4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    plan = plan_training(cfg, world_size=1)
    assert plan.workers == 2 and plan.options()["workers"] == 2 and plan.options()["config"]["workers"] is None
    cfg.workers = 0
    assert plan_training(cfg, world_size=1).workers == 0
    result = CliRunner().invoke(train_cli, ["--outdir", str(tmp_path), "--data", str(data), "--workers=-1", "-n"])
    assert result.exit_code != 0 and "--workers" in result.output


@pytest.mark.skipif(not LINUX_PROC, reason="reads /proc")
def test_tree_pss_counts_a_child_that_touches_memory():
    code = ("import sys, time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
            "print('ready', flush=True); time.sleep(30)")
    idle = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(30)"],
                            stdout=subprocess.PIPE, text=True)
    busy = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert idle.stdout.readline() == "ready\n" and busy.stdout.readline() == "ready\n"
        me = os.getpid()
        assert {idle.pid, busy.pid} <= set(bench_hostmem.process_tree(me))
        grown = bench_hostmem.pss_bytes(busy.pid) - bench_hostmem.pss_bytes(idle.pid)
        assert 190 * 2**20 < grown < 230 * 2**20
        assert bench_hostmem.tree_pss(me) >= bench_hostmem.pss_bytes(me) + bench_hostmem.pss_bytes(busy.pid)
    finally:
        idle.kill()
        busy.kill()
        idle.wait()
        busy.wait()
