"""``rdm demo`` writes the relay grid, the stage-1 grid and a trajectory; the same images as ``rdm generate``."""

from __future__ import annotations

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from relay_diffusion.checkpoints.bundled import bundled_network_paths, export_bundled
from relay_diffusion.checkpoints.snapshot import save_network
from relay_diffusion.cli import main
from relay_diffusion.networks.precond import build_network


def tiny(res: int, path):
    torch.manual_seed(res)
    net = build_network("EDMPrecond", img_resolution=res, img_channels=3, label_dim=0, model_type="DhariwalUNet",
                        model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    return save_network(net, path)


def test_demo_writes_grids_and_matches_generate(tmp_path):
    first, second = tiny(4, tmp_path / "s1.safetensors"), tiny(8, tmp_path / "s2.safetensors")
    nets = ["--network_first", str(first), "--network_second", str(second)]
    steps = ["--num_steps_first", "4", "--num_steps_second", "8"]
    res = CliRunner().invoke(main, ["demo", "--outdir", str(tmp_path / "demo"), "--seeds", "0-3", "--device", "cpu",
                                    *nets, *steps])
    assert res.exit_code == 0, res.output
    grid = np.asarray(Image.open(tmp_path / "demo" / "relay-grid.png"))
    assert grid.shape == (16, 16, 3)  # 2 x 2 samples of 8x8
    assert np.asarray(Image.open(tmp_path / "demo" / "stage1-grid.png")).shape == (16, 16, 3)
    traj = np.asarray(Image.open(tmp_path / "demo" / "relay-trajectory.png"))
    assert traj.shape[0] == 16 and traj.shape[1] > 32  # start + several relay steps, enlarged 2x
    res = CliRunner().invoke(main, ["generate", "--outdir", str(tmp_path / "gen"), "--seeds", "0-3", "--device", "cpu",
                                    "--up_scale_second", "2", *nets, *steps])
    assert res.exit_code == 0, res.output
    top_left = np.asarray(Image.open(tmp_path / "gen" / "000000.png"))
    np.testing.assert_array_equal(grid[:8, :8], top_left)
    np.testing.assert_array_equal(traj[::2, -16::2], top_left)  # the trajectory ends at the first seed's sample


def test_demo_trajectory_of_a_chosen_seed(tmp_path):
    first, second = tiny(4, tmp_path / "s1.safetensors"), tiny(8, tmp_path / "s2.safetensors")
    args = ["demo", "--seeds", "0-3", "--device", "cpu", "--network_first", str(first), "--network_second",
            str(second), "--num_steps_first", "4", "--num_steps_second", "8"]
    res = CliRunner().invoke(main, [*args, "--outdir", str(tmp_path), "--trajectory_seed", "2"])
    assert res.exit_code == 0, res.output
    assert "seed 2:" in res.output
    grid = np.asarray(Image.open(tmp_path / "relay-grid.png"))
    traj = np.asarray(Image.open(tmp_path / "relay-trajectory.png"))
    np.testing.assert_array_equal(traj[::2, -16::2], grid[8:, :8])  # seed 2: second row, first column
    stage1 = np.asarray(Image.open(tmp_path / "stage1-grid.png"))
    np.testing.assert_array_equal(traj[::2, :16:2], stage1[8:, :8])  # and starts at its stage-1 sample
    res = CliRunner().invoke(main, [*args, "--outdir", str(tmp_path / "x"), "--trajectory_seed", "9"])
    assert res.exit_code != 0 and "--trajectory_seed" in res.output


def test_export_bundled_round_trip(tmp_path):
    first, second = tiny(4, tmp_path / "s1.safetensors"), tiny(8, tmp_path / "s2.safetensors")
    folder = tmp_path / "assets"
    assert bundled_network_paths(folder) is None
    export_bundled(first, second, folder)
    paths = bundled_network_paths(folder)
    assert paths is not None and set(paths) == {"first", "second"}


def test_demo_never_pairs_a_given_network_with_a_bundled_one(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--network_second", str(tiny(8, tmp_path / "s2.safetensors"))])
    assert res.exit_code != 0 and "--network_first is required when the other network is given" in res.output


def test_demo_without_networks_says_what_is_missing(monkeypatch):
    monkeypatch.setattr("relay_diffusion.checkpoints.bundled.bundled_network_paths", lambda folder=None: None)
    res = CliRunner().invoke(main, ["demo"])
    assert res.exit_code != 0 and "--network_first" in res.output
