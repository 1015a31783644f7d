"""The JSON the project writes is strict: ``sigma_max`` = inf is ``"inf"``, never the non-JSON token ``Infinity``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from relay_diffusion.checkpoints.snapshot import META_KEY, load_safetensors_network, read_config, save_network
from relay_diffusion.networks.precond import FLOAT_KWARGS, build_network
from relay_diffusion.utils.jsonio import dumps_strict, loads_strict, restore_non_finite

ASSETS = Path(__file__).resolve().parents[1] / "src" / "relay_diffusion" / "assets" / "emoji"


def _refuse(token: str):
    raise ValueError(f"not JSON: {token}")


def strict_loads(text: str):
    """Python's json.loads without its extension: Infinity, -Infinity and NaN are errors."""
    return json.loads(text, parse_constant=_refuse)


def tiny(**kwargs) -> torch.nn.Module:
    return build_network("EDMPrecond", img_resolution=8, img_channels=3, model_type="DhariwalUNet",
                         model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[], **kwargs).eval()


def _metadata(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()[META_KEY]


def test_network_json_is_strict_and_round_trips(tmp_path):
    net = tiny()
    assert net.init_kwargs["sigma_max"] == math.inf
    path = save_network(net, tmp_path / "net.safetensors", extra={"source": "inf", "note": [math.nan]})
    for text in (path.with_suffix(".json").read_text(), _metadata(path)):
        data = strict_loads(text)
        assert data["init_kwargs"]["sigma_max"] == "inf"
        assert "Infinity" not in text and "NaN" not in text
    config = read_config(path)
    assert config["init_kwargs"] == net.init_kwargs and config["init_kwargs"]["sigma_max"] == math.inf
    assert config["source"] == "inf"  # a string field keeps its value: only known float fields are decoded
    again = load_safetensors_network(path)
    assert again.init_kwargs == net.init_kwargs and again.sigma_max == math.inf


def test_old_files_with_infinity_still_load(tmp_path):
    from safetensors.torch import save_file

    net = tiny(label_dim=2)
    config = {"format": "relay-diffusion/network-1", "precond": "EDMPrecond", "init_kwargs": net.init_kwargs}
    old = json.dumps(config)  # how earlier versions wrote it
    assert "Infinity" in old
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={META_KEY: old})
    assert read_config(tmp_path / "old.safetensors")["init_kwargs"] == net.init_kwargs
    again = load_safetensors_network(tmp_path / "old.safetensors")
    assert again.init_kwargs == net.init_kwargs
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again(x, torch.tensor([1.0, 2.0])), net(x, torch.tensor([1.0, 2.0])))


def test_bundled_sidecars_are_strict():
    for path in sorted(ASSETS.glob("*.json")):
        config = strict_loads(path.read_text())
        if path.name == "pipeline.json":  # the bundled pipeline folder's description, not a network sidecar
            assert [s["network"] for s in config["stages"]] == ["stage1-16x16.safetensors", "stage2-64x64.safetensors"]
            continue
        assert restore_non_finite(config, FLOAT_KWARGS) == read_config(path.with_suffix(".safetensors")), path.name


def test_dumps_strict_rules():
    data = {"a": math.inf, "b": [-math.inf, 1.5, math.nan], "c": {"d": (math.inf,)}, "e": "nan"}
    text = dumps_strict(data, indent=1)
    assert strict_loads(text) == {"a": "inf", "b": ["-inf", 1.5, "nan"], "c": {"d": ["inf"]}, "e": "nan"}
    everywhere = loads_strict(text)
    assert everywhere["a"] == math.inf and everywhere["b"][0] == -math.inf and math.isnan(everywhere["b"][2])
    assert everywhere["c"]["d"] == [math.inf]
    known = loads_strict(text, keys={"a", "c"})
    assert known["a"] == math.inf and known["c"]["d"] == [math.inf] and known["b"][0] == "-inf" and known["e"] == "nan"
    assert loads_strict('{"a": Infinity, "b": NaN}', keys={"a"})["a"] == math.inf  # the old tokens still read
    assert dumps_strict({"x": np.float64("-inf")}) == '{"x": "-inf"}'  # numpy's float64 is a float too


def test_stats_records_are_strict_and_read_back(tmp_path):
    from relay_diffusion.training.stats import STATS_FILE, StatsLog

    log = StatsLog(tmp_path)
    for step, loss in ((1, math.nan), (2, 0.5), (3, math.inf)):
        log.append({"tick": step, "step": step, "kimg": step / 1000, "loss": loss})
    log.flush()
    log.close()
    lines = (tmp_path / STATS_FILE).read_text().splitlines()
    assert [strict_loads(line)["loss"] for line in lines] == ["nan", 0.5, "inf"]
    resumed = StatsLog(tmp_path, resume_step=2)
    resumed.close()
    assert [r["step"] for r in resumed.records] == [1, 2]
    assert math.isnan(resumed.records[0]["loss"]) and resumed.records[1]["loss"] == 0.5
