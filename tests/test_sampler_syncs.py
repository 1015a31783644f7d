"""No host sync inside a sampler step: a dispatch-mode count of scalar reads (``aten._local_scalar_dense``:
``.item()``, ``float(t)``, ``bool(t)``) and ``aten.nonzero``, plus every ``Tensor.cpu/tolist/numpy/item`` call,
is the same for a generation with 8 and with 16 steps per stage, for every solver of both stages.

On an accelerator each of these makes the host wait for the device; on the CPU they are free, so they are
counted instead of timed."""

from __future__ import annotations

import collections
import dataclasses
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_adm
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.generation import EDMStage, EDMStageConfig, RelayPipeline, RelayStage, RelayStageConfig
from relay_diffusion.core.registry import SOLVERS_FIRST, SOLVERS_SECOND, solver

pytestmark = pytest.mark.usefixtures("single_thread")

SYNC_OPS = ("_local_scalar_dense", "nonzero")
SYNC_METHODS = ("cpu", "tolist", "numpy", "item")


class _SyncOps(TorchDispatchMode):
    def __init__(self, counts: collections.Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.counts[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_syncs() -> Iterator[collections.Counter]:
    """Count host syncs in the block: the aten ops of :data:`SYNC_OPS` and the tensor methods of
    :data:`SYNC_METHODS` (patched for the block)."""
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def counting(name):
        def method(self, *args, **kwargs):
            counts[f"Tensor.{name}"] += 1
            return originals[name](self, *args, **kwargs)
        return method

    for name in SYNC_METHODS:
        setattr(torch.Tensor, name, counting(name))
    try:
        with _SyncOps(counts):
            yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def allowed(kind: str, name: str) -> dict:
    """The settings a solver refuses other values of, at the value it takes (e.g. s_noise 0)."""
    return dict(solver(kind, name).refuses)


def with_steps(pipeline: RelayPipeline, steps: int, first: str, second: str) -> RelayPipeline:
    for stage, kind, name in zip(pipeline.stages, ("edm", "relay"), (first, second)):
        stage.config = dataclasses.replace(stage.config, num_steps=steps, solver=name, **allowed(kind, name))
    return pipeline


def syncs(pipeline: RelayPipeline, seeds=(0,)) -> collections.Counter:
    with count_syncs() as counts:
        pipeline.run(list(seeds))
    return counts


@pytest.fixture(scope="module")
def bundled():
    pipeline = RelayPipeline.from_bundled("cpu")
    pipeline.net_batch = 1  # one seed: no padding to the CPU's default of 8
    return pipeline


@pytest.mark.parametrize("second", SOLVERS_SECOND)
@pytest.mark.parametrize("first", SOLVERS_FIRST)
def test_no_host_sync_per_step_in_the_bundled_pipeline(bundled, first, second):
    short = syncs(with_steps(bundled, 8, first, second))
    long = syncs(with_steps(bundled, 16, first, second))
    assert long == short, f"host syncs grow with the steps: 8 steps {dict(short)}, 16 steps {dict(long)}"
    assert sum(short.values()) <= 4  # one read of each schedule per sampling, not one per step


def guided_pipeline(steps: int, first: str, second: str) -> RelayPipeline:
    """Class-conditional tiny networks with guidance inside an interval, and churn where the solver has it:
    every noise-level decision a step can take."""
    churn = dict(S_churn=20.0, S_min=0.05, S_max=50.0) if first == "heun" else {}
    stage1 = EDMStage(tiny_adm(8, 3, seed=1), EDMStageConfig(num_steps=steps, solver=first, cfg_scale=2.0,
                                                             guidance_interval=(0.3, 3.0), **churn))
    relay_churn = dict(churn=True, S_churn=20.0, S_min=0.1, S_max=0.6) if second == "reference" else {}
    relay_churn.update({k: v for k, v in allowed("relay", second).items() if k != "churn"})
    stage2 = RelayStage(tiny_adm(16, 3, seed=2),
                        RelayStageConfig(num_steps=2 * steps, solver=second, cfg_scale=2.0,
                                         guidance_interval=(0.1, 0.5), **relay_churn), BlurProcess(up_scale=2))
    return RelayPipeline([stage1, stage2], net_batch=2)


@pytest.mark.parametrize("first,second", [("heun", "reference"), ("multistep", "multistep"),
                                          ("multistep3", "multistep3")])
def test_no_host_sync_per_step_with_guidance_interval_and_churn(first, second):
    short = syncs(guided_pipeline(8, first, second), seeds=(0, 1))
    long = syncs(guided_pipeline(16, first, second), seeds=(0, 1))
    assert long == short, f"host syncs grow with the steps: 8 steps {dict(short)}, 16 steps {dict(long)}"


def test_the_audit_sees_a_per_step_sync(bundled):
    """The negative control: a network that reads its noise level back once per call is caught."""
    pipeline = with_steps(bundled, 8, "multistep", "multistep")
    net = pipeline.stages[0].net
    forward = net.forward

    def reading(x, sigma, *args, **kwargs):
        float(sigma.reshape(-1)[0])
        return forward(x, sigma, *args, **kwargs)

    net.forward = reading
    try:
        short = syncs(pipeline)
        long = syncs(with_steps(pipeline, 16, "multistep", "multistep"))
    finally:
        del net.forward
    assert long["aten._local_scalar_dense"] - short["aten._local_scalar_dense"] == 8
    with count_syncs() as counts:
        torch.arange(3).tolist(), torch.ones(2).nonzero(), torch.ones(1).cpu(), torch.ones(1).item()
    assert counts == {"Tensor.tolist": 1, "aten.nonzero": 1, "Tensor.cpu": 1, "Tensor.item": 1,
                      "aten._local_scalar_dense": 1}
