"""Relay generation end to end: the pipeline API, ``rdm generate`` with tiny networks, torchrun on CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import REPO, fixtures_dir, tiny_adm
from relay_diffusion.checkpoints.snapshot import save_network
from relay_diffusion.cli import main as rdm
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.generation import (
    PRESETS, EDMStage, EDMStageConfig, Enhancement, RelayPipeline, RelayStage, RelayStageConfig,
)
from relay_diffusion.generation.configs import from_reference_kwargs
from relay_diffusion.generation.files import image_path, load_images
from relay_diffusion.core.toy import GaussianToyDenoiser

STAGE1_OPTIONS = ["--num_steps_first=5"]
STAGE2_OPTIONS = ["--num_steps_second=10"]  # 4 steps below truncation_sigma 0.9


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_network(resolution: int, label_dim: int = 3, channels: int = 3, seed: int = 0) -> torch.nn.Module:
    return tiny_adm(resolution, label_dim, channels, seed)


def read_pngs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png")) if p.name != "grid.png"}


def read_uint8(folder: Path, seeds, subdirs=False) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(image_path(folder, s, subdirs))) for s in seeds])


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Stage 1 at 8x8 and stage 2 at 16x16 (relay factor 2), conditional on 3 classes, as snapshots."""
    folder = tmp_path_factory.mktemp("nets")
    first, second = tiny_network(8, seed=1), tiny_network(16, seed=2)
    paths = save_network(first, folder / "first.safetensors"), save_network(second, folder / "second.safetensors")
    return dict(first=first, second=second, first_path=str(paths[0]), second_path=str(paths[1]))


def run(args, ok=True):
    result = CliRunner().invoke(rdm, ["generate", *map(str, args)])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def relay_args(nets, outdir, *extra):
    return [f"--outdir={outdir}", f"--network_first={nets['first_path']}", f"--network_second={nets['second_path']}",
            "--up_scale_second=2", *STAGE1_OPTIONS, *STAGE2_OPTIONS, *extra]


def api_pipeline(nets, stages="both", **kwargs) -> RelayPipeline:
    first = EDMStage(nets["first"], EDMStageConfig(num_steps=5))
    second = RelayStage(nets["second"], RelayStageConfig(num_steps=10), BlurProcess(up_scale=2))
    return RelayPipeline({"first": [first], "second": [second], "both": [first, second]}[stages], **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Pipeline API


def test_pipeline_reproduces_the_reference_chain():
    """Stage 1 -> stage 2 with shared per-seed generators (docs/math.md §8) gives the fixtures' pipe_stage2."""
    meta = json.loads((fixtures_dir() / "reference.json").read_text())["cases"]
    arrays = np.load(fixtures_dir() / "reference.npz")
    c1, c2 = meta["pipe_stage1"], meta["pipe_stage2"]
    assert c2["continues"] == "pipe_stage1"
    channels = arrays["pipe_stage1/out"].shape[1]
    toy1 = GaussianToyDenoiser(channels, c1["res"], c1["label_dim"])
    toy2 = GaussianToyDenoiser(channels, c2["res"], c2["label_dim"])
    pipeline = RelayPipeline([EDMStage(toy1, EDMStageConfig(**c1["kwargs"])),
                              RelayStage(toy2, *from_reference_kwargs(c2["kwargs"], up_scale=c2["up_scale"]))])
    out = pipeline(c1["seeds"]).samples.numpy()
    expected = arrays["pipe_stage2/out"]
    assert np.abs(out - expected).max() / max(1.0, np.abs(expected).max()) < 1e-6


def test_images_depend_on_their_seed_only(nets):
    pipeline = api_pipeline(nets)
    seeds = list(range(7))
    whole = pipeline(seeds).samples
    assert whole.dtype == torch.float64 and whole.shape == (7, 3, 16, 16)
    for size in (1, 3):
        parts = torch.cat([pipeline(seeds[i : i + size]).samples for i in range(0, len(seeds), size)])
        assert torch.equal(parts, whole)
    assert torch.equal(pipeline(seeds[::-1]).samples, whole.flip(0))


def test_three_stage_chain(nets):
    third = tiny_network(32, seed=3)
    chain = RelayPipeline([EDMStage(nets["first"], EDMStageConfig(num_steps=4)),
                           RelayStage(nets["second"], RelayStageConfig(num_steps=10), BlurProcess(up_scale=2)),
                           RelayStage(third, RelayStageConfig(num_steps=10), BlurProcess(up_scale=2))])
    images = chain([0, 1, 2]).array
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(chain([1]).array[0], images[1])


def test_stage_compatibility_is_checked_in_one_error(nets):
    wrong = tiny_network(24, label_dim=5, channels=1)
    with pytest.raises(ValueError) as info:
        RelayPipeline([EDMStage(nets["first"]), RelayStage(wrong, RelayStageConfig(), BlurProcess(up_scale=4))])
    message = str(info.value)
    assert "resolution 24 != previous stage resolution 8 x up_scale 4 = 32" in message
    assert "1 channels, previous stage has 3" in message and "label_dim 5, previous stage has 3" in message
    with pytest.raises(ValueError, match="not divisible by up_scale 5"):
        RelayPipeline([RelayStage(nets["second"], RelayStageConfig(), BlurProcess(up_scale=5))])
    with pytest.raises(ValueError, match="only the first stage"):
        RelayPipeline([EDMStage(nets["first"]), EDMStage(nets["first"])])


def test_labels_and_class_option(nets):
    pipeline = api_pipeline(nets)
    assert pipeline.class_labels([0, 1, 5]).argmax(1).tolist() == [0, 1, 2]
    assert pipeline.class_labels([0, 1, 5], class_labels=2).argmax(1).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="out of range"):
        pipeline.class_labels([0], class_labels=3)


def test_presets_match_the_reference_scripts():
    imagenet, celeba = PRESETS["imagenet256"], PRESETS["celebahq256"]
    assert (imagenet.first.num_steps, imagenet.first.S_churn, imagenet.first.S_min, imagenet.first.S_max,
            imagenet.first.S_noise) == (256, 40, 0.05, 50, 1.003)
    assert (imagenet.second.num_steps, imagenet.second.rho, imagenet.second.cfg_scale) == (200, 100, 3.5)
    assert imagenet.enhancement == Enhancement(brightness=1.06)
    assert (celeba.first.num_steps, celeba.first.sde_scale) == (120, 0.05)
    assert (celeba.second.num_steps, celeba.second.truncation_sigma, celeba.process.prob_length,
            celeba.process.blur_sigma_max, celeba.second.churn) == (150, 0.95, 1.05, 2.0, True)
    assert celeba.enhancement == Enhancement(contrast=0.9, brightness=1.05, color=0.99)
    assert not PRESETS["default"].enhancement.enabled


# ----------------------------------------------------------------------------------------------------------
# CLI


def test_first_second_both(nets, tmp_path):
    seeds = [0, 1, 2, 1003]
    first, both, second = tmp_path / "first", tmp_path / "both", tmp_path / "second"
    run(relay_args(nets, first, "--sampler_stages=first", "--seeds=0-2,1003", "--subdirs"))
    run(relay_args(nets, both, "--seeds=0-2,1003", "--grid"))
    run(relay_args(nets, second, "--sampler_stages=second", f"--indir={first}", "--seeds=0-2,1003"))
    assert sorted(read_pngs(first)) == ["000000/000000.png", "000000/000001.png", "000000/000002.png",
                                        "001000/001003.png"]
    assert (both / "grid.png").is_file() and len(read_pngs(both)) == 4
    # Stage-1 files are the stage-1 part of the chain; both-stage files are the whole chain.
    assert np.array_equal(read_uint8(first, seeds, subdirs=True), api_pipeline(nets, "first")(seeds).array)
    assert np.array_equal(read_uint8(both, seeds), api_pipeline(nets)(seeds).array)
    # Second-stage-only: the stage-1 PNGs (v / 127.5 - 1) with fresh generators from the seeds (docs/math.md §8).
    inputs = load_images(first, seeds)
    assert inputs.shape == (4, 3, 8, 8) and inputs.dtype == torch.float64
    expected = api_pipeline(nets, "second")(seeds, inputs=inputs).array
    assert np.array_equal(read_uint8(second, seeds), expected)
    # The flat layout indir/{seed:06d}.png is read too.
    flat = tmp_path / "flat"
    flat.mkdir()
    for rel, data in read_pngs(first).items():
        (flat / Path(rel).name).write_bytes(data)
    run(relay_args(nets, tmp_path / "second_flat", "--sampler_stages=second", f"--indir={flat}", "--seeds=0-2,1003"))
    assert read_pngs(tmp_path / "second_flat") == read_pngs(second)


def test_batch_size_does_not_change_files(nets, tmp_path):
    for batch in (1, 3, 64):
        run(relay_args(nets, tmp_path / f"b{batch}", "--seeds=0-6", f"--batch={batch}"))
    assert read_pngs(tmp_path / "b1") == read_pngs(tmp_path / "b3") == read_pngs(tmp_path / "b64")


def test_resume_skips_existing_files(nets, tmp_path):
    out = tmp_path / "out"
    run(relay_args(nets, out, "--seeds=0-3"))
    original = read_pngs(out)
    (out / "000001.png").unlink()
    (out / "000002.png").write_bytes(original["000003.png"])  # a complete PNG of the right size: kept
    (out / "000000.png").write_bytes(original["000000.png"][:100])  # truncated: rendered again
    (out / "000003.png").write_bytes(b"")  # zero bytes: rendered again
    run(relay_args(nets, out, "--seeds=0-3"))
    assert (out / "000001.png").read_bytes() == original["000001.png"]
    assert (out / "000002.png").read_bytes() == original["000003.png"]
    assert (out / "000000.png").read_bytes() == original["000000.png"]
    assert (out / "000003.png").read_bytes() == original["000003.png"]
    run(relay_args(nets, out, "--seeds=0-3", "--overwrite"))
    assert read_pngs(out) == original


@pytest.mark.parametrize("preset", ["imagenet256", "celebahq256"])
def test_presets_through_the_cli(nets, tmp_path, preset):
    """The preset's samplers (churn, CFG, SDE steps, relay churn) and its post-processing, as the API runs them."""
    args = ["--seeds=0-2", f"--preset={preset}", "--num_steps_first=4", "--num_steps_second=8"]
    run(relay_args(nets, tmp_path / "plain", *args, "--no-enhance"))
    result = run(relay_args(nets, tmp_path / "enhanced", *args))
    enhancement = PRESETS[preset].enhancement
    assert f'"brightness": {enhancement.brightness}' in result.output
    first = dataclasses.replace(PRESETS[preset].first, num_steps=4)
    second = dataclasses.replace(PRESETS[preset].second, num_steps=8)
    process = dataclasses.replace(PRESETS[preset].process, up_scale=2)
    pipeline = RelayPipeline([EDMStage(nets["first"], first), RelayStage(nets["second"], second, process)])
    plain = read_uint8(tmp_path / "plain", [0, 1, 2])
    assert np.array_equal(plain, pipeline([0, 1, 2]).array)
    assert np.array_equal(read_uint8(tmp_path / "enhanced", [0, 1, 2]), enhancement.apply(plain))
    assert not np.array_equal(plain, enhancement.apply(plain))


def test_cli_errors(nets, tmp_path):
    result = run(["--outdir", tmp_path / "x", "--network_second", nets["second_path"]], ok=False)
    assert result.exit_code == 2 and "--network_first is required" in result.output
    result = run(relay_args(nets, tmp_path / "x", "--up_scale_second=4"), ok=False)
    assert result.exit_code == 2 and "resolution 16 != previous stage resolution 8 x up_scale 4" in result.output
    result = run(relay_args(nets, tmp_path / "x", "--class=7"), ok=False)
    assert result.exit_code != 0 and "out of range" in result.output
    result = run(relay_args(nets, tmp_path / "x", "--preset=celebahq256", "--cfg_scale_first=2"), ok=False)
    assert result.exit_code == 2 and "cfg_scale_first" in result.output
    indir = tmp_path / "partial"
    run(relay_args(nets, indir, "--sampler_stages=first", "--seeds=0,1,3"))
    result = run(relay_args(nets, tmp_path / "x", "--sampler_stages=second", f"--indir={indir}", "--seeds=0-5"), ok=False)
    assert result.exit_code != 0 and "3 input image(s) missing" in result.output
    for seed in (2, 4, 5):
        assert f"{seed:06d}.png" in result.output
    assert not list(tmp_path.glob("x/*.png"))


def _subprocess(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_torchrun_two_processes_match_one(nets, tmp_path):
    common = relay_args(nets, tmp_path / "two", "--seeds=0-6", "--batch=2")
    _subprocess(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "relay_diffusion",
                 "generate", *common], cwd=tmp_path)
    run(relay_args(nets, tmp_path / "one", "--seeds=0-6"))
    assert read_pngs(tmp_path / "two") == read_pngs(tmp_path / "one")
    # The reference's command line, verbatim, with the root script.
    result = _subprocess(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "generate.py",
                          "--sampler_stages=both", f"--outdir={tmp_path / 'root'}", *relay_args(nets, "")[1:],
                          "--seeds=0-6"], cwd=REPO)
    assert "Done." in result.stdout
    assert read_pngs(tmp_path / "root") == read_pngs(tmp_path / "one")
