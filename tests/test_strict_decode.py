"""The one strict decoder of config files (utils/strict.py) and where it is used."""

from __future__ import annotations

import json
import math

import pytest

from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.sr import SRCondition
from relay_diffusion.generation.configs import EDMStageConfig, RelayStageConfig
from relay_diffusion.training.config import ConfigError, TrainingConfig, saved_config
from relay_diffusion.utils.strict import DecodeError, decode

BASE = {"outdir": "runs", "data": "data.zip"}


@pytest.mark.parametrize("change, message", [
    ({"cond": "no"}, "cond: expected true or false, got 'no'"),
    ({"cond": 1}, "cond: expected true or false, got 1"),
    ({"lr": math.inf}, "lr: expected a finite number, got inf"),
    ({"lr": "0.1"}, "lr: expected a number, got '0.1'"),
    ({"batch": 1.5}, "batch: expected a whole number, got 1.5"),
    ({"batch": True}, "batch: expected a whole number, got True"),
    ({"attn": [8, "16"]}, "attn: item 1: expected a whole number"),
    ({"cres": 2}, "cres: expected a list, got 2"),
    ({"desc": 5}, "desc: expected a string, got 5"),
    ({"bogus": 1, "cnod": True}, "unknown training options ['bogus', 'cnod']"),
])
def test_training_options_of_the_wrong_kind_name_the_field(change, message):
    with pytest.raises(DecodeError) as info:
        TrainingConfig.from_dict({**BASE, **change}, where="opts.json")
    assert str(info.value) == f"opts.json: {message}" or str(info.value).startswith(f"opts.json: {message}")


def test_values_of_the_right_kind_decode_as_before():
    cfg = TrainingConfig.from_dict({**BASE, "cond": True, "lr": 2e-3, "attn": [8], "seed": None, "batch_gpu": None})
    assert (cfg.cond, cfg.lr, cfg.attn, cfg.seed) == (True, 2e-3, [8], None)
    assert TrainingConfig.from_dict(cfg.to_dict()) == cfg


def test_forward_process_takes_the_reference_names_and_checks_ranges():
    assert BlurProcess.from_dict({"up_scale": 2, "truncation_t": 0.9}).prob_length == 0.9
    with pytest.raises(DecodeError, match="process: up_scale: expected a whole number, got 2.5"):
        BlurProcess.from_dict({"up_scale": 2.5}, where="process")
    with pytest.raises(DecodeError, match="process: "):
        BlurProcess.from_dict({"prob_length": -0.5}, where="process")  # validate(): not > 0
    with pytest.raises(DecodeError, match="cond.json: noise_aug: expected a finite number"):
        SRCondition.from_dict({"noise_aug": "nan"}, where="cond.json")


def test_sampler_settings_may_hold_inf_but_not_the_wrong_type():
    cfg = decode(EDMStageConfig, {"S_max": "inf", "guidance_interval": [0.1, 2.0]}, "p", non_finite=["S_max"])
    assert cfg.S_max == math.inf and cfg.guidance_interval == (0.1, 2.0)
    with pytest.raises(DecodeError, match="p: churn: expected true or false"):
        decode(RelayStageConfig, {"churn": "yes"}, "p")
    with pytest.raises(DecodeError, match="p: expected a JSON object of settings, got list"):
        decode(RelayStageConfig, [], "p")


@pytest.mark.parametrize("content, message", [
    (json.dumps({"config": {**BASE, "cond": "no"}}), "cond: expected true or false"),
    ('{"config": {"outdir": "r", "data": "d", "lr": 1e999}}', "lr: expected a finite number"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (b"\xff\xfe{}", "is not JSON"),
])
def test_a_config_file_of_the_wrong_kind_is_one_error_naming_it(tmp_path, content, message):
    path = tmp_path / "training_options.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as info:
        saved_config(str(path))
    assert info.value.option == "--config" and str(path) in str(info.value) and message in str(info.value)
