"""The Python API: the README's Library snippets, pipeline folders (``rdm export`` / ``from_pretrained``)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import REPO
from relay_diffusion.cli import main as rdm
from test_stage_unit import snapshot

STEPS = ["--num_steps_first=4", "--num_steps_second=10"]


pytestmark = pytest.mark.usefixtures("single_thread")


def readme_library_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Library"):]
    section = section[:section.index("\n## ", 4)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_library_snippets_run():
    blocks = readme_library_blocks()
    assert len(blocks) == 4
    first = [line for line in blocks[0].splitlines() if line.strip()]
    assert len(first) <= 3  # four images from the bundled models in at most three lines
    scope: dict = {}
    exec(compile(blocks[0], "README.md:Library[0]", "exec"), scope)
    images = scope["images"]
    assert len(images) == 4 and all(isinstance(im, Image.Image) and im.size == (64, 64) for im in images)
    scope2: dict = {}
    exec(compile(blocks[1], "README.md:Library[1]", "exec"), scope2)
    out = scope2["out"]
    assert out.samples.shape == (2, 3, 64, 64) and out.array.dtype == np.uint8 and len(out.stages) == 2
    # the same seeds from the bundled pipeline are the same images (its defaults: the emoji preset)
    bundled = scope["pipe"](seeds=[0, 1])
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in images[:2]]), bundled.array)
    scope3: dict = {}
    exec(compile(blocks[2], "README.md:Library[2]", "exec"), scope3)
    assert scope3["images"].shape == (2, 64, 64, 3) and scope3["images"].dtype == np.float32
    scope4: dict = {}  # every rdm generate option from Python (GenerationOptions), autoguidance included
    exec(compile(blocks[3], "README.md:Library[3]", "exec"), scope4)
    assert len(scope4["images"]) == 8 and scope4["pipe"].stages[0].guide_source == "self-dropout"
    assert [s.config.solver for s in scope4["pipe"].stages] == ["multistep", "multistep"]


def test_export_and_from_pretrained_give_the_images_of_generate(tmp_path):
    from relay_diffusion import BlurProcess, RelayPipeline

    first = snapshot(tmp_path / "s4.safetensors", 4, "edm", label_dim=2, seed=1)
    second = snapshot(tmp_path / "s8.safetensors", 8, "relay", label_dim=2, seed=2,
                      process=BlurProcess(up_scale=2, blur_sigma_max=2.5))
    nets = [f"--network_first={first}", f"--network_second={second}"]
    res = CliRunner().invoke(rdm, ["export", f"--out={tmp_path / 'pipe'}", *nets, *STEPS, "--s_noise_second=0.1"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "pipe" / "pipeline.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert [s["kind"] for s in doc["stages"]] == ["edm", "relay"]
    assert doc["stages"][1]["process"]["blur_sigma_max"] == 2.5 and doc["stages"][1]["sampler"]["s_noise"] == 0.1
    res = CliRunner().invoke(rdm, ["generate", f"--outdir={tmp_path / 'gen'}", "--seeds=0-3", "--device=cpu",
                                   *nets, *STEPS, "--s_noise_second=0.1"])
    assert res.exit_code == 0, res.output
    pipe = RelayPipeline.from_pretrained(tmp_path / "pipe").to("cpu")
    out = pipe(seeds=range(4))
    for seed in range(4):
        np.testing.assert_array_equal(out.array[seed], np.asarray(Image.open(tmp_path / "gen" / f"{seed:06d}.png")))
    assert np.asarray(out.images[3]).shape == (8, 8, 3)
    # explicit labels: one class for all, one per seed, one-hot rows
    ones = pipe(seeds=[0, 1], class_labels=1).array
    np.testing.assert_array_equal(ones, pipe(seeds=[0, 1], class_labels=[1, 1]).array)
    np.testing.assert_array_equal(ones, pipe(seeds=[0, 1], class_labels=torch.eye(2)[[1, 1]]).array)
    with pytest.raises(ValueError, match="out of range"):
        pipe(seeds=[0], class_labels=5)
    # exporting again without --overwrite is refused and leaves the folder as it was
    before = {p.name: p.read_bytes() for p in (tmp_path / "pipe").iterdir()}
    res = CliRunner().invoke(rdm, ["export", f"--out={tmp_path / 'pipe'}", *nets])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "pipe").iterdir()} == before


def test_from_pretrained_errors_name_the_file(tmp_path):
    from relay_diffusion import RelayPipeline

    with pytest.raises(FileNotFoundError, match="pipeline.json"):
        RelayPipeline.from_pretrained(tmp_path)
    (tmp_path / "pipeline.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a relay-diffusion pipeline file"):
        RelayPipeline.from_pretrained(tmp_path)


def test_package_root_exports():
    import relay_diffusion

    for name in ("RelayPipeline", "RelayOutput", "BlurProcess", "EDMStage", "RelayStage", "load_network",
                 "TrainingConfig", "generate_images"):
        assert getattr(relay_diffusion, name) is not None
    with pytest.raises(AttributeError):
        relay_diffusion.no_such_name
