"""A relay stage is one self-describing unit: its file carries its forward process and its stage kind, and
every command samples through the same pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import tiny_adm
from relay_diffusion.checkpoints.loading import load_network_file
from relay_diffusion.checkpoints.snapshot import save_network
from relay_diffusion.cli import main as rdm
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.generation import EDMStage, EDMStageConfig, RelayPipeline, RelayStage, RelayStageConfig
from relay_diffusion.training import TrainingConfig, plan_training, run_training
from test_training import TINY, write_dataset

TRAINED = BlurProcess(up_scale=2, blur_sigma_max=2.0, prob_length=0.89, block_scale=0.1)
STEPS = ["--num_steps_first=4", "--num_steps_second=10"]


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(res: int, label_dim: int = 0, seed: int = 0) -> torch.nn.Module:
    return tiny_adm(res, label_dim, seed=seed)


def snapshot(path: Path, res: int, kind: str, label_dim: int = 0, seed: int = 0,
             process: BlurProcess | None = None) -> str:
    extra = {"stage_kind": kind, **({"process": process.to_dict()} if process else {})}
    return str(save_network(tiny(res, label_dim, seed), path, extra=extra))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, str]:
    """A stage 1 at 4x4 and a stage 2 at 8x8 trained with non-default forward-process settings."""
    root = tmp_path_factory.mktemp("trained")
    data8, data4 = write_dataset(root / "d8.zip", 16, 8), write_dataset(root / "d4.zip", 16, 4)
    common = dict(batch=8, lr=2e-3, ema=0.0001, seed=3, tick=0.008, snap=1000, dump=1000, duration=16 / 1e6, **TINY)
    runs = {}
    for name, data, extra in (
        ("first", data4, dict(precond="edm", cres=[1])),
        ("second", data8, dict(precond="blur", up_scale=TRAINED.up_scale, blur_sigma_max=TRAINED.blur_sigma_max,
                               prob_length=TRAINED.prob_length, block_scale=TRAINED.block_scale)),
    ):
        cfg = TrainingConfig(outdir=str(root / name), data=str(data), **{**common, **extra})
        run_dir = run_training(plan_training(cfg))
        runs[name] = str(sorted(run_dir.glob("network-snapshot-*.safetensors"))[-1])
    return runs


def generate(outdir: Path, *args, ok: bool = True):
    result = CliRunner().invoke(rdm, ["generate", f"--outdir={outdir}", "--seeds=0-3", "--device=cpu", *STEPS,
                                      *map(str, args)])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_snapshot_records_and_loading_returns_the_forward_process(trained):
    second, first = load_network_file(trained["second"]), load_network_file(trained["first"])
    assert second.kind == "relay" and second.process == TRAINED
    assert first.kind == "edm" and first.process is None


def test_generation_takes_the_forward_process_from_the_file(trained, tmp_path):
    nets = [f"--network_first={trained['first']}", f"--network_second={trained['second']}"]
    plain = generate(tmp_path / "plain", *nets)
    assert "Note:" not in plain.output and '"prob_length": 0.89' in plain.output
    spelled = generate(tmp_path / "spelled", *nets, "--up_scale_second=2", "--blur_sigma_max_second=2",
                       "--truncation_t_second=0.89", "--s_block_second=0.1")
    assert "Note:" not in spelled.output
    defaults = generate(tmp_path / "defaults", *nets, "--blur_sigma_max_second=3", "--truncation_t_second=0.93",
                        "--s_block_second=0.15")
    assert pngs(tmp_path / "plain") == pngs(tmp_path / "spelled") and len(pngs(tmp_path / "plain")) == 4
    different = [k for k, v in pngs(tmp_path / "defaults").items() if v != pngs(tmp_path / "plain")[k]]
    assert len(different) == 4
    for name, value, trained_value in (("blur_sigma_max", 3.0, 2.0), ("prob_length", 0.93, 0.89),
                                       ("block_scale", 0.15, 0.1)):
        assert f"{name} = {value} overrides the value {trained_value} the network was trained with" in defaults.output
    # the canonical names are accepted too, as aliases of the same settings
    generate(tmp_path / "canonical", *nets, "--prob_length_second=0.89", "--block_scale_second=0.1")
    assert pngs(tmp_path / "canonical") == pngs(tmp_path / "plain")


def test_swapped_stage_files_are_refused(trained, tmp_path):
    result = generate(tmp_path / "x", f"--network_first={trained['second']}",
                      f"--network_second={trained['second']}", ok=False)
    assert result.exit_code == 2 and "--network_first" in result.output
    assert "is a relay (stage-2) network; it cannot be stage 1" in result.output
    result = generate(tmp_path / "x", f"--network_first={trained['first']}",
                      f"--network_second={trained['first']}", ok=False)
    assert result.exit_code == 2 and "--network_second" in result.output
    assert "is a stage-1 (EDM) network; it cannot be the relay stage 2" in result.output
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").iterdir())


def test_reference_style_files_infer_the_relay_factor(tmp_path):
    """Files without a recorded process (reference checkpoints) take the preset's, with p from the resolutions."""
    first = str(save_network(tiny(4, seed=1), tmp_path / "a.safetensors"))
    second = str(save_network(tiny(16, seed=2), tmp_path / "b.safetensors"))
    result = generate(tmp_path / "out", f"--network_first={first}", f"--network_second={second}")
    assert '"up_scale": 4' in result.output and len(pngs(tmp_path / "out")) == 4


def test_three_stage_chain_from_the_cli(tmp_path):
    first = snapshot(tmp_path / "s4.safetensors", 4, "edm", seed=1)
    second = snapshot(tmp_path / "s8.safetensors", 8, "relay", seed=2, process=BlurProcess(up_scale=2))
    third = snapshot(tmp_path / "s16.safetensors", 16, "relay", seed=3, process=BlurProcess(up_scale=2, block_scale=0.0))
    generate(tmp_path / "chain", f"--network_first={first}", f"--network_second={second}",
             f"--network_next={third}")
    images = [np.asarray(Image.open(tmp_path / "chain" / f"{s:06d}.png")) for s in range(4)]
    assert all(im.shape == (16, 16, 3) for im in images)
    chain = RelayPipeline([EDMStage(tiny(4, seed=1), EDMStageConfig(num_steps=4)),
                           RelayStage(tiny(8, seed=2), RelayStageConfig(num_steps=10), BlurProcess(up_scale=2)),
                           RelayStage(tiny(16, seed=3), RelayStageConfig(num_steps=10),
                                      BlurProcess(up_scale=2, block_scale=0.0))])
    np.testing.assert_array_equal(np.stack(images), chain(range(4)).array)
    # an incompatible third stage is named in one error
    wrong = snapshot(tmp_path / "w.safetensors", 24, "relay", process=BlurProcess(up_scale=2))
    result = generate(tmp_path / "bad", f"--network_first={first}", f"--network_second={second}",
                      f"--network_next={wrong}", ok=False)
    assert result.exit_code == 2 and "resolution 24 != previous stage resolution 8 x up_scale 2" in result.output


def test_demo_and_generate_give_the_same_images_with_class_conditional_networks(tmp_path):
    first = snapshot(tmp_path / "c4.safetensors", 4, "edm", label_dim=3, seed=4)
    second = snapshot(tmp_path / "c8.safetensors", 8, "relay", label_dim=3, seed=5, process=BlurProcess(up_scale=2))
    nets = [f"--network_first={first}", f"--network_second={second}"]
    res = CliRunner().invoke(rdm, ["demo", f"--outdir={tmp_path / 'demo'}", "--seeds=0-3", "--device=cpu", *nets,
                                   *STEPS])
    assert res.exit_code == 0, res.output
    generate(tmp_path / "gen", *nets)
    grid = np.asarray(Image.open(tmp_path / "demo" / "relay-grid.png"))
    for seed in range(4):
        row, col = divmod(seed, 2)
        tile = grid[row * 8:(row + 1) * 8, col * 8:(col + 1) * 8]
        np.testing.assert_array_equal(tile, np.asarray(Image.open(tmp_path / "gen" / f"{seed:06d}.png")))
    # labels matter: the same seeds with another class differ
    generate(tmp_path / "class2", *nets, "--class=2")
    assert pngs(tmp_path / "class2") != pngs(tmp_path / "gen")



def test_sampler_keywords_and_config_fields_agree():
    """Each knob is declared once as a config field (the CLI options come from it); the pure sampler functions
    keep keyword arguments for standalone use, and their defaults must not drift from the fields' (a setting
    a solver refuses other values of defaults to the value it takes). Every solver of the registry."""
    import dataclasses
    import inspect

    from relay_diffusion.core.registry import SOLVERS

    for (kind, name), entry in SOLVERS.items():
        cls = EDMStageConfig if kind == "edm" else RelayStageConfig
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        refused = dict(entry.refuses)
        kwargs = dataclasses.replace(cls(), solver=name, **refused).sampler_kwargs()
        params = inspect.signature(entry.sampler).parameters
        assert set(kwargs) <= set(params), (name, set(kwargs) - set(params))
        for key in kwargs:
            assert params[key].default == refused.get(key, fields[key]), (kind, name, key)
