"""Real images (a committed subset of the emoji data): the relay stages' datasets built in one run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner

from relay_diffusion.cli import main
from relay_diffusion.data.dataset import ImageFolderDataset

SUBSET = Path(__file__).parent / "data" / "emoji-subset"


def test_box_filtered_low_resolution_is_the_patch_mean_of_the_high_one(tmp_path):
    res = CliRunner().invoke(main, ["dataset", "--source", str(SUBSET), "--dest", str(tmp_path / "emoji-{res}.zip"),
                                    "--resolution", "64x64", "--resolution", "16x16", "--filter", "box",
                                    "--workers", "1"])
    assert res.exit_code == 0, res.output
    high, low = ImageFolderDataset(tmp_path / "emoji-64x64.zip"), ImageFolderDataset(tmp_path / "emoji-16x16.zip")
    assert len(high) == len(low) == 32 and high.num_channels == 3
    for i in range(len(high)):
        h = high[i][0].astype(np.float64)
        mean = h.reshape(3, 16, 4, 16, 4).mean(axis=(2, 4))
        assert np.abs(low[i][0] - mean).max() <= 0.5 + 1e-9  # the exact block mean, rounded to uint8
    # RGBA emoji were composited on white: the corners of every image are white
    corners = np.stack([high[i][0][:, 0, 0] for i in range(len(high))])
    assert (corners == 255).all()
