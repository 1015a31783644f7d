import subprocess
import sys

import numpy as np
from click.testing import CliRunner
from PIL import Image

from relay_diffusion.cli import main


def test_smoke_writes_a_grid(tmp_path):
    res = CliRunner().invoke(main, ["smoke", "--outdir", str(tmp_path), "--seeds", "0-3", "--resolution", "4",
                                    "--up-scale", "2"])
    assert res.exit_code == 0, res.output
    img = np.asarray(Image.open(tmp_path / "smoke-grid.png"))
    assert img.shape[2] == 3 and img.std() > 10  # four side-by-side pairs, not a blank image


def test_module_entry_point_lists_commands():
    out = subprocess.run([sys.executable, "-m", "relay_diffusion", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "smoke" in out


def test_bad_seeds_are_named():
    res = CliRunner().invoke(main, ["smoke", "--seeds", ","])
    assert res.exit_code != 0 and "--seeds" in res.output
