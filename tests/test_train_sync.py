"""The training step on an accelerator's terms: no host reads inside a step, and fp16-style overflow.

- Host reads (``tests/sync_audit.py``) over two runs of 8 and 16 steps, with and without ``--augment``: the
  longer run makes not one more, so a step makes none; the per-tick reads are the same in both runs.
- A step whose loss is not finite is skipped (no optimizer, EMA or post-hoc EMA update) and counted in the tick
  line and ``stats.jsonl``; the run goes on, and a resumed run replays the same skips bit for bit. Only a tick
  in which every step was skipped stops the run with :class:`NonFiniteLossError`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from relay_diffusion.training import TrainingConfig, plan_training, run_training
from relay_diffusion.training import augment as augment_mod
from relay_diffusion.training.tally import DataOrderError
from relay_diffusion.training.loop import NonFiniteLossError, Trainer
from relay_diffusion.training.state import latest_state, load_state
from relay_diffusion.utils import accel
from relay_diffusion.utils.distributed import init
from sync_audit import HostSyncAudit
from test_training import TINY, write_dataset

pytestmark = pytest.mark.usefixtures("single_thread")
BATCH = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "plain-8x8.zip", 24, 8)


def config(outdir: Path, data: Path, steps: int, **overrides) -> TrainingConfig:
    kw = dict(TINY, outdir=str(outdir), data=str(data), batch=BATCH, lr=2e-3, ema=0.0001, seed=5, device="cpu",
              tick=1e9, snap=None, dump=1000, duration=steps * BATCH / 1e6)
    kw.update(overrides)
    return TrainingConfig(**kw)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


# --- host reads ------------------------------------------------------------------------------------------
def audited_run(root: Path, data: Path, steps: int, augment: float, monkeypatch) -> dict[str, int]:
    """Host reads of a whole run (setup, steps, the ticks, the final state); the data loader is left out, since
    it runs on the host by design (in worker processes in real runs)."""
    audit = HostSyncAudit()
    setup_data = Trainer._setup_data

    def audited_loader(self):
        setup_data(self)
        inner = self.loader

        class Paused:
            def __next__(self):
                with audit.paused():
                    return next(inner)

        self.loader = Paused()

    monkeypatch.setattr(Trainer, "_setup_data", audited_loader)
    augment_mod._sym6_on.cache_clear()  # a constant made once per process: made again in every run
    with audit:
        run_dir = run_training(plan_training(config(root / f"run-{steps}", data, steps, augment=augment)))
    assert records(run_dir)[-1]["step"] == steps
    return dict(audit.counts)


@pytest.mark.parametrize("augment", [0.0, 0.5])
def test_a_training_step_reads_nothing_back_to_the_host(tmp_path, dataset, monkeypatch, augment):
    short = audited_run(tmp_path, dataset, 8, augment, monkeypatch)
    long = audited_run(tmp_path, dataset, 16, augment, monkeypatch)
    assert long == short, f"8 steps: {short}, 16 steps: {long}"
    # The ticks (tick 0 and the last) read the tally and the positions: one .tolist() each.
    assert short.get("Tensor.tolist") == 4, short


def test_the_audit_sees_the_reads_it_counts():
    """The audit is not blind: each kind of read it looks for is counted."""
    x = torch.arange(6.0)
    with HostSyncAudit() as audit:
        bool(x.sum() > 0)
        x.tolist()
        x[x > 2]
        torch.tensor([1.0, 2.0])
        with audit.paused():
            x.tolist()
    assert audit.counts == {"aten.item": 1, "Tensor.tolist": 1, "aten.nonzero": 1, "aten.from_host": 1}


# --- skipped steps -------------------------------------------------------------------------------------------
def poison_steps(monkeypatch, steps: set[int]) -> None:
    """Make the loss infinite (NaN where it is 0) at the given steps: an fp16 overflow in the forward pass.
    Its gradients are then NaN and inf as well."""
    train_step = Trainer._train_step

    def poisoned(self):
        if self.step not in steps:
            return train_step(self)
        clean = self.loss_fn
        self.loss_fn = lambda *args, **kwargs: clean(*args, **kwargs) * math.inf
        try:
            return train_step(self)
        finally:
            self.loss_fn = clean

    monkeypatch.setattr(Trainer, "_train_step", poisoned)


def trainer(root: Path, data: Path, **overrides) -> Trainer:
    t = Trainer(plan_training(config(root, data, 100, **overrides), world_size=1), init("cpu"))
    t._setup()
    return t


def snapshot(t: Trainer) -> dict[str, torch.Tensor]:
    out = {f"net.{k}": v.clone() for k, v in t.net.state_dict().items()}
    out.update({f"ema.{k}": v.clone() for k, v in t.ema.state_dict().items()})
    for i, ema in enumerate(t.phema.emas if t.phema is not None else []):
        out.update({f"phema{i}.{k}": v.clone() for k, v in ema.state_dict().items()})
    for i, state in t.optimizer.state_dict()["state"].items():
        out.update({f"adam{i}.{k}": v.clone() for k, v in state.items()})
    return out


@pytest.mark.parametrize("fused", [True, False])  # fused Adam's found_inf, and the generic restore
def test_a_skipped_step_changes_nothing_but_the_counters(tmp_path, dataset, monkeypatch, fused):
    t = trainer(tmp_path, dataset, ema_profiles=[0.05])
    if not fused:
        t.optimizer = t.plan.optimizer.build(t.params)
    elif not t.optimizer.defaults.get("fused"):
        pytest.skip("this torch has no fused Adam on the CPU")
    poison_steps(monkeypatch, {0, 2})
    before = snapshot(t)
    assert not torch.isfinite(t._train_step())  # step 0: skipped, before Adam made any state
    after = snapshot(t)
    assert after.keys() - before.keys() <= {k for k in after if k.startswith("adam")}
    assert all(torch.equal(after[k], v) for k, v in before.items()) and t.step == 1 and t.nimg == BATCH
    assert all(float(v.abs().max()) == 0 for k, v in after.items() if k.startswith("adam") and "exp_avg" in k)
    assert torch.isfinite(t._train_step())  # step 1 applies
    moved = snapshot(t)
    for prefix in ("net.", "ema.", "phema0."):
        assert any(not torch.equal(moved[k], before[k]) for k in before if k.startswith(prefix)), prefix
    t._train_step()  # step 2: skipped again, with Adam's state in place
    assert all(torch.equal(snapshot(t)[k], v) for k, v in moved.items())
    summary = t.tally.read()
    assert (summary.steps, summary.applied, summary.skipped) == (3, 1, 2)
    assert math.isfinite(summary.loss) and summary.loss == summary.loss_last


def test_overflow_is_skipped_counted_and_replayed_on_resume(tmp_path, dataset, monkeypatch, capsys):
    poison_steps(monkeypatch, {3, 11, 12})
    tick = 4 * BATCH / 1000  # ticks: step 0, 1-4, 5-8, 9-12, 13-15
    ref = run_training(plan_training(config(tmp_path / "ref", dataset, 16, tick=tick, dump=1)))
    recs = records(ref)
    assert [r["step"] for r in recs] == [1, 5, 9, 13, 16]
    assert [r["skipped"] for r in recs] == [0, 1, 0, 2, 0]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["loss_last"]) for r in recs)
    assert sum(r["clamped"] for r in recs) == 0  # the poisoned steps' gradients were not applied, so not counted
    assert " skipped 2" in (ref / "log.txt").read_text() and " skipped 1" in capsys.readouterr().out
    reference = load_state(latest_state(ref))
    assert reference["step"] == 16 and reference["nimg"] == 16 * BATCH
    assert all(torch.isfinite(v).all() for v in reference["net"].values())

    # Stopped after 10 steps (the last state is at step 9, inside the tick with the skips), then resumed in place.
    part = run_training(plan_training(config(tmp_path / "part", dataset, 10, tick=tick, dump=1)))
    resumed_dir = run_training(plan_training(config(tmp_path / "part", dataset, 16, tick=tick, dump=1,
                                                    resume=str(part))))
    assert resumed_dir == part
    resumed = load_state(latest_state(part))
    for key in ("net", "ema"):
        for name, value in reference[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name}"
    for index, state in reference["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(resumed["optimizer"]["state"][index][field], value), f"{index}.{field}"
    assert sum(r["skipped"] for r in records(part)) == 3


def test_a_tick_with_every_step_skipped_stops_the_run(tmp_path, dataset, monkeypatch):
    poison_steps(monkeypatch, set(range(2, 100)))
    tick = 2 * BATCH / 1000  # ticks: step 0, 1-2 (one skip: goes on), 3-4 (all skipped: stops)
    with pytest.raises(NonFiniteLossError, match=r"every step of tick 2 \(steps 3-4, kimg 0.024-0.040\)") as err:
        run_training(plan_training(config(tmp_path, dataset, 16, tick=tick, dump=1)))
    run_dir = next(tmp_path.iterdir())
    assert "the last good training state is" in str(err.value)
    assert [(r["tick"], r["skipped"]) for r in records(run_dir)] == [(0, 0), (1, 1)]
    assert "non-finite loss at every step of tick 2" in (run_dir / "log.txt").read_text()
    state = load_state(latest_state(run_dir))
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["net"].values())


# --- the pieces ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("multi_tensor", [False, True])
@pytest.mark.parametrize("beta", [0.9993, 0.3])
def test_ema_update_with_a_device_weight_matches_the_number(multi_tensor, beta):
    g = torch.Generator().manual_seed(1)
    net = [torch.randn(s, generator=g) for s in ((16, 3, 3, 3), (16,))]
    ema = [torch.randn(t.shape, generator=g) for t in net]
    by_number = [e.clone() for e in ema]
    accel.ema_update(by_number, net, beta, multi_tensor)
    for skip, expected in ((False, by_number), (True, [e.clone() for e in ema])):
        got, flag = [e.clone() for e in ema], torch.tensor(skip)
        with HostSyncAudit() as audit:
            accel.ema_update(got, net, torch.where(flag, 1.0, beta), multi_tensor)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)) and not audit.counts


def test_the_data_order_is_checked_at_the_tick(tmp_path, dataset):
    t = trainer(tmp_path, dataset)
    t._train_step()
    t.tally.batches[0] = (*t.tally.batches[0][:3], t.tally.batches[0][3].flip(0))
    with pytest.raises(DataOrderError, match="out of order at step 0"):
        t.tally.read()
