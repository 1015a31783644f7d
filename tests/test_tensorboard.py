"""TensorBoard scalars of a run: the values of stats.jsonl, and after a kill and resume every step
once (the points a killed run wrote after its last state are not kept twice)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402

from relay_diffusion.cli.train import train as train_cli  # noqa: E402
from relay_diffusion.training.state import latest_state, load_state  # noqa: E402

from test_training import TINY_ARGS, write_dataset  # noqa: E402

STEPS = 10


pytestmark = pytest.mark.usefixtures("single_thread")


def raw_scalar_steps(run_dir: Path, tag: str) -> list[int]:
    """Every (step) of ``tag`` in every event file, as written: no reader-side purging."""
    steps = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == tag:
                    steps.append(event.step)
    return steps


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_scalars_and_resume_keep_each_step_once(tmp_path):
    data = write_dataset(tmp_path / "plain-8x8.zip", 16, 8)
    args = ["--outdir", str(tmp_path / "runs"), "--data", str(data), "--batch=8", "--lr=1e-3", "--seed=2",
            "--tick=0.008", "--snap=1000", "--grid=0", "--workers=0", *TINY_ARGS]
    duration = [f"--duration={STEPS * 8 / 1e6}"]
    result = CliRunner().invoke(train_cli, [*args, f"--duration={6 * 8 / 1e6}"])
    assert result.exit_code == 0, result.output
    run_dir = next((tmp_path / "runs").iterdir())
    state_path = latest_state(run_dir)  # step 6
    result = CliRunner().invoke(train_cli, [*args, *duration, "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    expected = [(8 * (i + 1), r["loss"]) for i, r in enumerate(records)]
    assert len(expected) == STEPS
    got = scalars(run_dir, "loss")
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert {"loss", "loss_last", "lr", "sec_per_kimg", "cpu_mem_gb"} <= set(acc.Tags()["scalars"])

    # A kill after step 10 whose last state is the one of step 6: the event file holds points 7-10, which
    # the resumed run writes again.
    for newer in [p for p in run_dir.glob("training-state-*.pt") if p != state_path]:
        newer.unlink()
    assert latest_state(run_dir) == state_path and load_state(state_path)["step"] == 6
    result = CliRunner().invoke(train_cli, [*args, *duration, "--resume", str(run_dir)])
    assert result.exit_code == 0 and "Resumed from" in result.output, result.output
    steps = raw_scalar_steps(run_dir, "loss")
    assert sorted(steps) == [8 * (i + 1) for i in range(STEPS)], Counter(steps)
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    records = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    got = scalars(run_dir, "loss")
    assert [s for s, _ in got] == [8 * (i + 1) for i in range(STEPS)]
    assert [v for _, v in got] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
