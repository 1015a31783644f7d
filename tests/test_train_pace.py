"""The start-up warning of ``rdm train``: once the first steps are timed, options that cannot give a useful
snapshot in the first hour on this machine are named, with values that would."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from click.testing import CliRunner

from relay_diffusion.cli.train import train as train_cli
from relay_diffusion.training import pace
from relay_diffusion.training.config import TrainingConfig
from relay_diffusion.training.pace import PaceMeter, first_hour_warning
from test_training import TINY_ARGS, write_dataset

pytestmark = pytest.mark.usefixtures("single_thread")

#: recipes/emoji.sh's stage 1, which trained the bundled model (~31 s/kimg on one core)
RECIPE = dict(duration=0.2, lr_rampup=0.01, tick=5, snap=4, dump=2, batch=64)


def cfg(**kw) -> TrainingConfig:
    return TrainingConfig(outdir="o", data="d", **kw)


def test_the_defaults_on_a_laptop_name_each_option_with_a_value():
    line = first_hour_warning(cfg(), sec_per_kimg=31.0)  # EDM's defaults: 10 Mimg warm-up, 200 Mimg, 50 kimg ticks
    assert line is not None and line.startswith("Warning: ") and "\n" not in line
    assert "~116 kimg an hour" in line
    assert "--lr-rampup 10 Mimg" in line and "use --lr-rampup 0.01 or less" in line
    assert "--tick 50 kimg" in line and "use --tick 9" in line
    assert "--duration 200 Mimg needs ~71d" in line and "--duration 2 trains about a day" in line
    assert "snapshot" not in line  # --checkpoint-minutes 20 writes one within the hour


def test_sane_options_give_no_warning():
    assert first_hour_warning(cfg(**RECIPE), sec_per_kimg=31.0) is None
    assert first_hour_warning(cfg(**{**RECIPE, "duration": 0.064, "tick": 2}), sec_per_kimg=125.0) is None
    assert first_hour_warning(cfg(), sec_per_kimg=0.3) is None  # a fast GPU: the defaults suit it


def test_the_first_snapshot_and_a_resumed_warm_up():
    line = first_hour_warning(cfg(**{**RECIPE, "checkpoint_minutes": 0, "snap": 50}), sec_per_kimg=31.0)
    assert "the first snapshot comes after ~2h 09m" in line and "--checkpoint-minutes 20, or --snap 11" in line
    line = first_hour_warning(cfg(**{**RECIPE, "checkpoint_minutes": 0, "snap": None}), sec_per_kimg=31.0)
    assert "the first snapshot comes only at the end" in line
    assert first_hour_warning(cfg(**{**RECIPE, "lr_rampup": 1.0}), 31.0) is not None
    # resumed after most of the warm-up: only what is left of it counts
    assert first_hour_warning(cfg(**{**RECIPE, "lr_rampup": 1.0}), 31.0, nimg=950_000) is None


def fake_clock(monkeypatch, seconds_per_call: float) -> None:
    ticks = itertools.count(0.0, seconds_per_call)
    monkeypatch.setattr(pace, "clock", lambda: next(ticks))


def test_the_meter_times_steps_only_after_the_first(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(pace, "clock", lambda: now[0])

    def step(seconds):
        def run():
            now[0] += seconds
        return run

    meter = PaceMeter(seconds=30.0, steps=3)
    assert meter.time_step(step(100.0), 8) is None  # the first step (one-time costs) is not timed
    speeds = []
    for _ in range(3):
        now[0] += 50.0  # a snapshot between steps: not timed
        speeds.append(meter.time_step(step(2.0), 8))
    assert speeds[:2] == [None, None] and speeds[2] == pytest.approx(2.0 / 0.008)
    assert meter.time_step(step(2.0), 8) is None  # once


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "plain-8x8.zip", 16, 8)


def run(tmp_path: Path, data: Path, *extra: str) -> str:
    args = ["--outdir", str(tmp_path / "runs"), "--data", str(data), "--batch=8", "--seed=1", "--tick=0.008",
            "--snap=1000", "--dump=1000", "--grid=0", "--workers=0", "--duration=0.00004", *TINY_ARGS, *extra]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_rdm_train_prints_the_warning_after_the_first_steps(tmp_path, data, monkeypatch):
    fake_clock(monkeypatch, 100.0)  # every step seems to take 200 s: 25,000 s/kimg
    output = run(tmp_path, data, "--lr-rampup=0.01")
    warnings = [line for line in output.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1, output
    assert "--lr-rampup 0.01 Mimg" in warnings[0] and "use --lr-rampup 0.001 or less" in warnings[0]
    assert output.index("Training for") < output.index("Warning:")
    run_dir = next((tmp_path / "runs").iterdir())
    assert warnings[0] in (run_dir / "log.txt").read_text().splitlines()


def test_rdm_train_with_sane_options_prints_no_warning(tmp_path, data, monkeypatch):
    fake_clock(monkeypatch, 100.0)
    assert "Warning" not in run(tmp_path, data, "--lr-rampup=0")
