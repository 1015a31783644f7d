"""The bundled networks' own preset (``emoji``): multistep solvers with both stages autoguided by the bundled
guide networks. It is the default only when the bundled networks stand in; ``--preset default`` gives the
reference's settings back, and a guidance scale of 1 turns a stage's guide off."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from relay_diffusion.checkpoints.bundled import ASSETS, GUIDE_FILES, bundled_network_paths
from relay_diffusion.cli import main as rdm
from relay_diffusion.generation import PRESETS, GenerationOptions, OptionError, load, resolve
from relay_diffusion.generation.files import load_images
from relay_diffusion.generation.pipeline import RelayPipeline
from relay_diffusion.utils.jsonio import to_strict

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(bundled_network_paths() is None, reason="no bundled networks")]


def test_the_bundled_networks_default_to_their_preset_and_user_networks_to_the_reference_one():
    bundled = resolve(GenerationOptions(seeds=[0]))
    assert bundled.preset_name == "emoji"
    assert (bundled.first.solver, bundled.first.num_steps, bundled.first.cfg_scale) == ("multistep", 9, 2.0)
    assert (bundled.second.solver, bundled.second.num_steps, bundled.second.cfg_scale) == ("multistep", 18, 2.0)
    paths = bundled_network_paths()
    mine = resolve(GenerationOptions(network_first=paths["first"], network_second=paths["second"], seeds=[0]))
    assert mine.preset_name == "default" and mine.first.solver == "heun" and mine.first.cfg_scale == 1.0
    assert resolve(GenerationOptions(preset="default", seeds=[0])).first.num_steps == 18


def test_the_bundled_preset_is_refused_with_networks_of_ones_own():
    paths = bundled_network_paths()
    with pytest.raises(OptionError, match="preset emoji is the setting of the bundled networks") as exc:
        resolve(GenerationOptions(preset="emoji", network_first=paths["first"], network_second=paths["second"]))
    assert exc.value.option == "preset"


def test_the_preset_attaches_the_bundled_guides_and_a_scale_of_one_turns_one_off():
    stages = load(GenerationOptions(seeds=[0])).pipeline.stages
    assert [s.guide_source for s in stages] == [str(ASSETS / GUIDE_FILES[w]) for w in ("first", "second")]
    stages = load(GenerationOptions(first={"cfg_scale": 1.0}, seeds=[0])).pipeline.stages
    assert stages[0].guide is None and stages[1].guide_source == str(ASSETS / GUIDE_FILES["second"])
    stages = load(GenerationOptions(guide_first="self-dropout", seeds=[0])).pipeline.stages
    assert stages[0].guide_source == "self-dropout"  # a given guide wins over the preset's


def test_the_bundled_pipeline_folder_holds_the_preset():
    spec = json.loads((ASSETS / "pipeline.json").read_text())
    preset = PRESETS["emoji"]
    for entry, config, guide in zip(spec["stages"], (preset.first, preset.second),
                                    (preset.guide_first, preset.guide_second)):
        assert entry["sampler"] == to_strict(dataclasses.asdict(config))
        assert entry["guide"] == guide and (ASSETS / guide).is_file()


def test_the_command_line_default_the_api_and_the_pipeline_folder_give_the_same_images(tmp_path):
    result = CliRunner().invoke(rdm, ["generate", "--outdir", str(tmp_path), "--seeds", "4"])
    assert result.exit_code == 0, result.output
    assert "Preset: emoji" in result.output and "18 + 14 = 32" in result.output
    manifest = json.loads((tmp_path / "generation.json").read_text())
    assert manifest["nfe"] == [18, 14] and [s["sampler"]["cfg_scale"] for s in manifest["stages"]] == [2.0, 2.0]
    cli = np.round((load_images(tmp_path, [4]).permute(0, 2, 3, 1).numpy() + 1) * 127.5)
    api = load(GenerationOptions(seeds=[4])).pipeline(seeds=[4], output_type="np").images
    folder = RelayPipeline.from_bundled()(seeds=[4], output_type="np").images
    assert np.array_equal(np.round(api * 255), cli) and np.array_equal(np.round(folder * 255), cli)
    assert float(np.abs(cli - 127.5).mean()) > 10  # an image, not a flat field
