"""The tiny emoji relay models shipped in the package: ``rdm generate`` and ``rdm demo`` use them with no
network options, and what they produce looks like the data (not like noise)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from relay_diffusion.checkpoints.bundled import ASSETS, bundled_network_paths
from relay_diffusion.checkpoints.snapshot import read_config, save_network
from relay_diffusion.cli import main
from relay_diffusion.checkpoints.loading import load_network
from relay_diffusion.networks.precond import build_network

SUBSET = Path(__file__).parent / "data" / "emoji-subset"


@functools.cache
def emoji_reference() -> np.ndarray:
    """The committed emoji subset composited on white, as the recipe builds its 64x64 dataset: [N, 64, 64, 3]
    (read once; read-only)."""
    out = []
    for path in sorted(SUBSET.glob("*.png")):
        rgba = Image.open(path).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out.append(np.asarray(Image.alpha_composite(white, rgba).convert("RGB")))
    images = np.stack(out)
    images.setflags(write=False)
    return images


def image_stats(images: np.ndarray) -> dict[str, float]:
    """Summary statistics of uint8 images [N, H, W, 3] in [0, 1] units."""
    x = images.astype(np.float64) / 255
    return {
        "mean": float(x.mean()),                                              # emoji: mostly white background
        "white": float((x.min(axis=-1) > 0.94).mean()),                       # share of (near-)white pixels
        "roughness": float(np.abs(np.diff(x, axis=2)).mean() + np.abs(np.diff(x, axis=1)).mean()) / 2,
        "saturation": float((x.max(axis=-1) - x.min(axis=-1)).mean()),     # colourful, not grey
    }


TOLERANCE = {"mean": 0.12, "white": 0.2, "roughness": 0.02, "saturation": 0.15}


def close_to(stats: dict[str, float], ref: dict[str, float]) -> list[str]:
    """The statistics that are not within TOLERANCE of the reference's (empty = looks like the data)."""
    return [f"{k}: {stats[k]:.3f} vs {ref[k]:.3f}" for k in TOLERANCE if abs(stats[k] - ref[k]) > TOLERANCE[k]]


def test_the_statistics_tell_emoji_from_noise_and_grey():
    real = emoji_reference()
    ref = image_stats(real)
    for start in range(0, len(real), 4):  # any 12 real emoji (the size of the samples checked below) pass
        assert close_to(image_stats(np.roll(real, -start, axis=0)[:12]), ref) == [], start
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(8, 64, 64, 3), dtype=np.uint8)
    assert close_to(image_stats(noise), ref)  # negative controls: noise and flat grey both fail
    assert close_to(image_stats(np.full((8, 64, 64, 3), 128, np.uint8)), ref)
    smooth_noise = np.asarray(Image.fromarray(noise[0]).resize((8, 8)).resize((64, 64), Image.BICUBIC))
    assert close_to(image_stats(smooth_noise[None]), ref)


def test_bundled_models_are_installed_small_and_load_as_float32():
    paths = bundled_network_paths()
    assert paths is not None, f"no bundled networks in {ASSETS}"
    total = sum(Path(p).stat().st_size for p in paths.values())
    assert total < 50e6, f"bundled weights are {total / 1e6:.1f} MB"
    first, second = load_network(paths["first"], "cpu"), load_network(paths["second"], "cpu")
    assert (first.img_resolution, second.img_resolution) == (16, 64)
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in second.parameters())
    assert (ASSETS / "NOTICE").is_file()


def generate(outdir: Path, *options: str) -> np.ndarray:
    """``rdm generate`` of seeds 0-11 with 12 steps per stage -> uint8 [12, 64, 64, 3]."""
    res = CliRunner().invoke(main, ["generate", "--outdir", str(outdir), "--seeds", "0-11", "--device", "cpu",
                                    "--num_steps_first", "12", "--num_steps_second", "12", *options])
    assert res.exit_code == 0, res.output
    files = sorted(outdir.glob("*.png"))
    assert len(files) == 12
    return np.stack([np.asarray(Image.open(f)) for f in files])


def test_generate_with_no_network_options_uses_the_bundled_models(tmp_path):
    images = generate(tmp_path)
    assert images.shape == (12, 64, 64, 3)
    mismatch = close_to(image_stats(images), image_stats(emoji_reference()))
    assert mismatch == [], f"bundled samples do not look like emoji: {mismatch}"


def test_untrained_networks_of_the_same_shape_fail_the_check(tmp_path):
    """Negative control: the check of the bundled models' samples rejects what untrained networks give."""
    paths = bundled_network_paths()
    assert paths is not None
    options = ["--up_scale_second", "4"]
    for which, path in paths.items():
        config = read_config(path)
        torch.manual_seed(0)
        net = build_network(config["precond"], **config["init_kwargs"])
        options += [f"--network_{which}", str(save_network(net, tmp_path / Path(path).name))]
    images = generate(tmp_path / "out", *options)
    assert close_to(image_stats(images), image_stats(emoji_reference()))


def test_demo_with_the_bundled_models(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--outdir", str(tmp_path), "--seeds", "0-3", "--device", "cpu",
                                    "--num_steps_first", "6", "--num_steps_second", "6"])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "relay-grid.png") in res.output
    assert np.asarray(Image.open(tmp_path / "relay-grid.png")).shape == (128, 128, 3)
    assert np.asarray(Image.open(tmp_path / "stage1-grid.png")).shape == (128, 128, 3)
