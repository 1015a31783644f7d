"""``rdm generate --indir``: an input image a stage cannot take is named, with what is wrong with it."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from relay_diffusion.cli import main as rdm


def second(indir, outdir, seeds="0"):
    return CliRunner().invoke(rdm, ["generate", f"--indir={indir}", f"--outdir={outdir}", f"--seeds={seeds}",
                                    "--sampler_stages=second", "--device=cpu"])


@pytest.mark.parametrize("image, needle", [
    (Image.fromarray(np.zeros((16, 16, 4), np.uint8)), "a RGBA image"),
    (Image.fromarray(np.zeros((16, 16), np.uint8)).convert("P"), "a P image"),
    (Image.fromarray(np.zeros((16, 16), np.uint16)), "a I;16 image"),
    (Image.fromarray(np.zeros((8, 8, 3), np.uint8)), "8x8 with 3 channel(s); this pipeline's first stage takes 16x16"),
])
def test_an_input_image_of_the_wrong_kind_is_named(tmp_path, image, needle):
    indir = tmp_path / "in"
    indir.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(indir / "000000.png")
    image.save(indir / "000001.png")
    res = second(indir, tmp_path / "out", "0-1")
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert f"{indir / '000001.png'}: {needle}" in res.output, res.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


def test_seeds_past_64_bits_are_refused_before_anything_runs(tmp_path):
    res = CliRunner().invoke(rdm, ["generate", f"--outdir={tmp_path / 'o'}", f"--seeds={2**64}", "--device=cpu",
                                   "--sampler_stages=first"])
    assert res.exit_code == 2 and "seeds must be below 2**63" in res.output and "Generating" not in res.output
    assert not (tmp_path / "o").exists()
