"""Generation laid out for the GPU: fixed network shapes for a compiled pipeline (a short last batch and the
guidance interval's N / 2N calls do not recompile) and PNG encoding on a background thread."""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest
import torch

from conftest import tiny_adm
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.generation import EDMStage, EDMStageConfig, RelayPipeline, RelayStage, RelayStageConfig
from relay_diffusion.generation import files as files_mod
from relay_diffusion.generation import pipeline as pipeline_mod
from relay_diffusion.generation import batching as batching_mod
from relay_diffusion.generation.run import generate_images
from relay_diffusion.utils import accel
from test_generate import read_pngs

pytestmark = pytest.mark.usefixtures("single_thread")


class CallSizes(torch.nn.Module):
    """Wraps a network and records the batch size of every call."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.sizes = net, []
        for name in ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max"):
            setattr(self, name, getattr(net, name))

    def round_sigma(self, sigma):
        return self.model.round_sigma(sigma)

    def forward(self, x, sigma, class_labels=None, **kwargs):
        self.sizes.append(x.shape[0])
        return self.model(x, sigma, class_labels, **kwargs)


def mark_compiled(net: CallSizes) -> None:
    """What ``nn.Module.compile`` leaves on the wrapped network (the wrapper's backbone), with an eager body:
    no compiler is needed in the test."""
    net.model._compiled_call_impl = net.model._call_impl


def guided_chain(compiled: bool) -> RelayPipeline:
    """Class-conditional tiny stages with guidance inside an interval (N calls outside it, 2N inside)."""
    first = CallSizes(tiny_adm(8, 3, seed=1))
    second = CallSizes(tiny_adm(16, 3, seed=2))
    if compiled:
        mark_compiled(first), mark_compiled(second)
    return RelayPipeline([
        EDMStage(first, EDMStageConfig(num_steps=4, cfg_scale=2.0, guidance_interval=(0.5, 5.0))),
        RelayStage(second, RelayStageConfig(num_steps=8, cfg_scale=2.0, guidance_interval=(0.1, 0.5)),
                   BlurProcess(up_scale=2)),
    ])


def sizes(pipeline: RelayPipeline) -> list[set[int]]:
    return [set(stage.net.sizes) for stage in pipeline.stages]


def test_compiled_pipeline_calls_its_networks_with_one_shape(tmp_path, monkeypatch):
    """Whole-batch calls (the accelerators' default, forced here on the CPU): with a compiled network every
    call of a stage has the same batch size, across a short last batch and the guidance interval."""
    whole_batch = lambda net_batch, device: net_batch  # noqa: E731 - what auto_net_batch does off the CPU
    monkeypatch.setattr(batching_mod, "auto_net_batch", whole_batch)
    monkeypatch.setattr(pipeline_mod, "auto_net_batch", whole_batch)
    eager, compiled = guided_chain(False), guided_chain(True)
    assert not eager.fixed_shapes and compiled.fixed_shapes
    generate_images(eager, range(7), tmp_path / "eager", max_batch_size=4, progress=False)
    generate_images(compiled, range(7), tmp_path / "compiled", max_batch_size=4, progress=False)
    assert all(len(s) > 1 for s in sizes(eager))  # the control: N, 2N and the short batch's sizes
    assert sizes(compiled) == [{8}, {8}]  # 2 x 4 seeds, guided or not, also for the last 3 seeds
    assert sorted(read_pngs(tmp_path / "compiled")) == [f"{s:06d}.png" for s in range(7)]
    assert read_pngs(tmp_path / "compiled") == read_pngs(tmp_path / "eager")


def test_padding_a_short_batch_leaves_the_images_unchanged(tmp_path, monkeypatch):
    """The dummy seeds of a short last batch change no real seed's image (bit for bit on the CPU)."""
    eager, compiled = guided_chain(False), guided_chain(True)
    monkeypatch.setattr(pipeline_mod.RelayPipeline, "fixed_shapes", property(lambda self: accel.is_compiled(
        self.stages[0].net)))  # pad seeds on the CPU too, where calls are padded chunks already
    batches = []
    run = compiled.run
    monkeypatch.setattr(compiled, "run", lambda seeds, *a, **k: (batches.append(list(seeds)), run(seeds, *a, **k))[1])
    generate_images(eager, range(7), tmp_path / "eager", max_batch_size=4, progress=False)
    generate_images(compiled, range(7), tmp_path / "compiled", max_batch_size=4, progress=False)
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 6]]  # the last batch padded with a dummy copy of seed 6
    assert read_pngs(tmp_path / "compiled") == read_pngs(tmp_path / "eager")


# --- PNG encoding on a background thread -----------------------------------------------------------------
def small_chain() -> RelayPipeline:
    return RelayPipeline([EDMStage(tiny_adm(8, 3, seed=1), EDMStageConfig(num_steps=3))])


def test_pngs_are_written_while_the_next_batch_samples(tmp_path, monkeypatch):
    """The first batch's PNG write waits until the second batch has started sampling: were the writes on
    the sampling thread, that would never happen (the wait times out and the test fails)."""
    second_batch = threading.Event()
    overlapped, threads = [], set()
    save_png = files_mod.save_png

    def slow_save(image, path):
        threads.add(threading.current_thread().name)
        if path.name == "000000.png":
            overlapped.append(second_batch.wait(timeout=10))
        save_png(image, path)

    pipeline = small_chain()
    run = pipeline.run
    monkeypatch.setattr(files_mod, "save_png", slow_save)
    monkeypatch.setattr(pipeline, "run", lambda seeds, *a, **k: (
        second_batch.set() if seeds[0] == 2 else None, run(seeds, *a, **k))[1])
    written = generate_images(pipeline, range(6), tmp_path / "out", max_batch_size=2, progress=False)
    assert overlapped == [True]
    assert threading.current_thread().name not in threads
    assert [p.name for p in written] == [f"{s:06d}.png" for s in range(6)]
    reference = tmp_path / "reference"
    monkeypatch.setattr(files_mod, "save_png", save_png)
    generate_images(small_chain(), range(6), reference, max_batch_size=6, progress=False)
    assert read_pngs(tmp_path / "out") == read_pngs(reference)  # every image present, the same bytes
    assert (tmp_path / "out" / "generation.json").is_file()


def test_a_write_error_is_raised_to_the_caller(tmp_path, monkeypatch):
    def full(image, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_mod, "save_png", full)
    with pytest.raises(OSError, match="No space left"):
        generate_images(small_chain(), range(3), tmp_path / "out", max_batch_size=1, progress=False)
    assert not list((tmp_path / "out").glob("*.png"))


def test_image_writer_keeps_at_most_max_pending_batches(tmp_path, monkeypatch):
    release, started = threading.Event(), []
    save_png = files_mod.save_png

    def blocked(image, path):
        started.append(path.name)
        release.wait(timeout=20)
        save_png(image, path)

    monkeypatch.setattr(files_mod, "save_png", blocked)
    image = np.zeros([1, 4, 4, 3], np.uint8)
    with files_mod.ImageWriter(tmp_path, max_pending=2) as writer:
        writer.submit(image, [0])
        writer.submit(image, [1])
        third = threading.Thread(target=writer.submit, args=(image, [2]))
        third.start()
        third.join(timeout=0.5)
        assert third.is_alive()  # waits: two batches are pending
        release.set()
        third.join(timeout=20)
        assert not third.is_alive()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert started == ["000000.png", "000001.png", "000002.png"]  # in submission order


def test_image_writer_raises_at_the_next_submit_or_flush(tmp_path, monkeypatch):
    def broken(image, path):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files_mod, "save_png", broken)
    writer = files_mod.ImageWriter(tmp_path, max_pending=1)
    writer.submit(np.zeros([1, 4, 4, 3], np.uint8), [0])
    with pytest.raises(OSError, match="Read-only"):
        writer.submit(np.zeros([1, 4, 4, 3], np.uint8), [1])  # waits for the first (max_pending 1): its error
    writer.close()
    with pytest.raises(OSError, match="Read-only"):
        with files_mod.ImageWriter(tmp_path) as other:
            other.submit(np.zeros([1, 4, 4, 3], np.uint8), [2])
