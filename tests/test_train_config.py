"""The training options: the stage-2 options are the forward process's (BlurProcess) and the super-resolution
condition's (SRCondition), with their defaults and ranges; Adam's settings are written once; the file
``training_options.json`` keeps its format (tests/data/training-options/*.json, with the temporary folder as
``<tmp>``), so run folders written before are read as they were."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from relay_diffusion.cli.train import train as train_cli
from relay_diffusion.core.process import BlurProcess, SettingError
from relay_diffusion.core.sr import SRCondition
from relay_diffusion.training import ConfigError, TrainingConfig, plan_training
from relay_diffusion.training.config import CONDITION_FIELDS, PROCESS_FIELDS, saved_config
from relay_diffusion.training.loop import Trainer
from relay_diffusion.utils.distributed import init
from test_training import write_dataset

GOLDEN = Path(__file__).parent / "data" / "training-options"
ARGS = {
    "blur": ["--precond=blur", "--prob-length=0.9", "--block-scale=0.1", "--cbase=16", "--cres=1,2", "--attn=", "--batch=8",
             "--seed=3"],
    "sr": ["--precond=sr", "--noise-aug=0.25", "--up-scale=2", "--cbase=16", "--cres=1,2", "--attn=", "--batch=8", "--seed=3"],
    "edm": ["--cbase=16", "--cres=1,2", "--attn=", "--batch=8", "--lr=3e-4"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "plain-16x16.zip", 8, 16)


@pytest.mark.parametrize("case", sorted(ARGS))
def test_the_options_file_keeps_its_format(tmp_path, data, case):
    tmp = str(data.parent)
    result = CliRunner().invoke(train_cli, ["--dry-run", "--outdir", f"{tmp}/runs", "--data", str(data), "--device=cpu",
                                            "--workers=0", *ARGS[case]])
    assert result.exit_code == 0, result.output
    assert result.output.replace(tmp, "<tmp>") == (GOLDEN / f"{case}.json").read_text()


@pytest.mark.parametrize("case", sorted(ARGS))
def test_a_recorded_options_file_reads_back_unchanged(tmp_path, case):
    path = tmp_path / "training_options.json"
    recorded = json.loads((GOLDEN / f"{case}.json").read_text())
    path.write_text(json.dumps(recorded))
    assert json.dumps(saved_config(str(path))) == json.dumps({**recorded["config"], "resume": None})


def test_the_stage2_options_are_the_forward_process():
    cfg = TrainingConfig(outdir="o", data="d", precond="blur")
    process, fields = BlurProcess(), {f.name: f for f in dataclasses.fields(TrainingConfig)}
    assert set(PROCESS_FIELDS) < {f.name for f in dataclasses.fields(BlurProcess)}
    assert all(fields[k].default == getattr(process, k) for k in PROCESS_FIELDS)
    assert fields["noise_aug"].default == SRCondition().noise_aug and set(CONDITION_FIELDS) == {"up_scale", "noise_aug"}
    assert cfg.process() == process
    custom = dataclasses.replace(cfg, up_scale=2, prob_length=0.8, block_scale=0.0, blur_sigma_max=2.0)
    assert custom.process() == BlurProcess(up_scale=2, prob_length=0.8, block_scale=0.0, blur_sigma_max=2.0)


@pytest.mark.parametrize("precond, field, value, option", [
    ("blur", "prob_length", 1.5, "--prob-length"),  # training's bound; sampling may extrapolate past 1 (below)
    ("blur", "prob_length", 0.0, "--prob-length"),
    ("blur", "prob_length", math.nan, "--prob-length"),
    ("blur", "block_scale", -1.0, "--block-scale"),
    ("blur", "blur_sigma_max", math.inf, "--blur-sigma-max"),
    ("blur", "up_scale", 0, "--up-scale"),
    ("sr", "up_scale", 0, "--up-scale"),
    ("sr", "noise_aug", 11.0, "--noise-aug"),
    ("edm", "noise_aug", 0.5, "--noise-aug"),
])
def test_bad_stage2_options_are_named_by_their_flag(precond, field, value, option):
    cfg = TrainingConfig(outdir="o", data="d", precond=precond, **{field: value})
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert info.value.option == option, info.value


def test_the_training_bound_is_the_process_s():
    BlurProcess(prob_length=1.05).validate()  # CelebA-HQ's sampling setting (truncation_t)
    with pytest.raises(SettingError, match="prob_length must be in \\(0, 1\\] for training"):
        BlurProcess(prob_length=1.05).validate(training=True)
    TrainingConfig(outdir="o", data="d", precond="edm", prob_length=5.0).validate()  # not a stage-2 run: unused
    TrainingConfig(outdir="o", data="d", precond="blur", prob_length=1.0).validate()


def test_adam_s_settings_are_written_once(tmp_path, data):
    plan = plan_training(TrainingConfig(outdir=str(tmp_path / "runs"), data=str(data), cbase=16, cres=[1, 2], attn=[],
                                        batch=8, lr=3e-4, device="cpu", workers=0, grid=0), world_size=1)
    assert plan.options()["optimizer"] == {"name": "Adam", "lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8}
    trainer = Trainer(plan, init("cpu"))
    trainer._setup()
    defaults = trainer.optimizer.defaults
    assert type(trainer.optimizer).__name__ == plan.optimizer.name
    assert (defaults["lr"], defaults["betas"], defaults["eps"]) == (3e-4, plan.optimizer.betas, plan.optimizer.eps)
