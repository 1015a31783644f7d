"""Generation settings live in one place (generation/settings.py): the command line only parses and prints,
the Python API takes the same options, and errors name fields in the library and flags on the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO
from relay_diffusion.cli import main as rdm
from relay_diffusion.generation import GenerationOptions, OptionError, generate_images, load, resolve
from relay_diffusion.generation.files import load_images

pytestmark = pytest.mark.usefixtures("single_thread")
CLI = REPO / "src" / "relay_diffusion" / "cli" / "generate.py"


def test_the_generate_command_holds_no_long_function_and_no_sampling_logic():
    tree = ast.parse(CLI.read_text())
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert lengths and max(lengths.values()) <= 33, lengths  # the longest is generate(): docstring + 20 lines
    source = CLI.read_text()
    for logic in ("dataclasses.replace", "build_pipeline", "solver(", ".validate(", "relay_diffusion.core.samplers"):
        assert logic not in source, logic


def test_the_api_and_the_command_line_give_the_same_images(tmp_path):
    first, second = {"num_steps": 3, "solver": "multistep"}, {"num_steps": 8, "solver": "multistep"}
    result = CliRunner().invoke(rdm, ["generate", "--outdir", str(tmp_path / "cli"), "--seeds", "3,5",
                                      "--num-steps-first", "3", "--solver_first", "multistep",
                                      "--num_steps_second", "8", "--solver_second", "multistep"])
    assert result.exit_code == 0, result.output
    built = load(GenerationOptions(first=first, second=second, seeds=[3, 5]))
    api = built.pipeline(seeds=[3, 5], output_type="np").images
    cli = np.round((load_images(tmp_path / "cli", [3, 5]).permute(0, 2, 3, 1).numpy() + 1) * 127.5)
    assert np.array_equal(np.round(api * 255), cli)
    assert [s.config.num_steps for s in built.pipeline.stages] == [3, 8]


def test_the_preset_fills_what_was_not_given_and_checks_what_was():
    resolved = resolve(GenerationOptions(preset="imagenet256", first={"num_steps": 7}, seeds=[1]))
    assert resolved.first.num_steps == 7 and resolved.first.S_churn == 40  # given / the preset's
    assert resolved.second.cfg_scale == 3.5 and resolved.enhancement.brightness == 1.06
    assert resolve(GenerationOptions()).seeds == list(range(64))


@pytest.mark.parametrize("options, library, flag", [
    (GenerationOptions(first={"num_steps": 0}), "first.num_steps", "--num_steps_first"),
    (GenerationOptions(second={"s_noise": 2.0}), "second.s_noise", "--s_noise_second"),
    (GenerationOptions(process={"prob_length": -1.0}), "process.prob_length", "--prob_length_second"),
    (GenerationOptions(network_first="a.safetensors"), "network_second", "--network_second"),
    (GenerationOptions(sampler_stages="second", network_second="b.safetensors"), "indir", "--indir"),
])
def test_errors_name_the_field_in_the_library_and_the_flag_on_the_command_line(options, library, flag):
    from relay_diffusion.cli.generate import cli_name

    with pytest.raises(OptionError) as exc:
        resolve(options)
    assert library in str(exc.value) and "--" not in str(exc.value)
    with pytest.raises(OptionError) as exc:
        resolve(options, cli_name)
    assert flag in str(exc.value)


def test_an_unknown_setting_is_named():
    with pytest.raises(OptionError, match="first.num_stepz is not a setting of EDMStageConfig"):
        resolve(GenerationOptions(first={"num_stepz": 3}))


def test_writing_images_names_its_arguments_by_the_caller(tmp_path):
    from relay_diffusion.cli.generate import cli_name

    pipeline = load(GenerationOptions(first={"num_steps": 2}, sampler_stages="first")).pipeline
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^outdir .* exists and is not a folder"):
        generate_images(pipeline, [0], tmp_path / "file", progress=False)
    with pytest.raises(ValueError, match=r"^--outdir .* exists and is not a folder"):
        generate_images(pipeline, [0], tmp_path / "file", progress=False, names=cli_name)
    assert (tmp_path / "file").read_text() == "x" and not Path(tmp_path / "out").exists()
