"""The multistep solvers and the guidance interval through the stage configs, rdm generate and pipeline folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from relay_diffusion.cli import main as rdm
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.core.solvers import multistep_edm_sampler, multistep_relay_sampler
from relay_diffusion.generation import EDMStage, RelayPipeline
from relay_diffusion.generation.stages import FixedBatchDenoiser
from test_stage_unit import snapshot, tiny

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("nets")
    return [f"--network_first={snapshot(root / 'a.safetensors', 4, 'edm', label_dim=2, seed=1)}",
            "--network_second=" + str(snapshot(root / 'b.safetensors', 8, 'relay', label_dim=2, seed=2,
                                                process=BlurProcess(up_scale=2)))]


def gen(outdir, *args):
    return CliRunner().invoke(rdm, ["generate", f"--outdir={outdir}", "--seeds=0-3", "--device=cpu",
                                    "--num_steps_first=6", "--num_steps_second=12", *map(str, args)])


def test_generate_with_the_multistep_solvers_matches_the_library(nets, tmp_path):
    args = ["--solver_first=multistep", "--solver_second=multistep", "--cfg_scale_first=2",
            "--guidance_interval_first=0.3,5", "--cfg_scale_second=1.5"]
    result = gen(tmp_path / "ms", *nets, *args)
    assert result.exit_code == 0, result.output
    assert "NFE per image (denoiser evaluations): 6 + 4 = 10" in result.output
    first, second = tiny(4, 2, seed=1), tiny(8, 2, seed=2)
    rng = SeedGenerators(range(4))
    labels = RelayPipeline([EDMStage(first)]).class_labels(range(4))
    low = multistep_edm_sampler(FixedBatchDenoiser(first), rng.randn([3, 4, 4]), rng, labels, num_steps=6,
                                cfg_scale=2.0, guidance_interval=(0.3, 5.0))
    up = low.repeat_interleave(2, 2).repeat_interleave(2, 3)
    high = multistep_relay_sampler(FixedBatchDenoiser(second), up, rng, labels, process=BlurProcess(up_scale=2),
                                   num_steps=12, cfg_scale=1.5)
    expected = np.clip(high.numpy() * 127.5 + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    got = np.stack([np.asarray(Image.open(tmp_path / "ms" / f"{s:06d}.png")) for s in range(4)])
    np.testing.assert_array_equal(got, expected)
    # the defaults are the reference's samplers and differ from these
    default = gen(tmp_path / "default", *nets)
    assert "NFE per image (denoiser evaluations): 11 + 7 = 18" in default.output
    assert (tmp_path / "default" / "000000.png").read_bytes() != (tmp_path / "ms" / "000000.png").read_bytes()


@pytest.mark.parametrize("args, needle", [
    (["--solver_first=multistep", "--preset=imagenet256"], "S_churn"),
    (["--solver_first=multistep", "--sde_scale_first=0.05"], "sde_scale_first"),
    (["--solver_second=multistep", "--preset=celebahq256"], "churn_second"),
    (["--solver_first=euler"], "--solver_first"),
    (["--guidance_interval_first=3,1"], "--guidance_interval_first"),
    (["--guidance_interval_second=abc"], "--guidance_interval_second"),
])
def test_solver_option_errors(nets, tmp_path, args, needle):
    result = gen(tmp_path / "x", *nets, *args)
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, result.output


def test_pipeline_folder_keeps_the_solvers(nets, tmp_path):
    args = ["--solver_first=multistep", "--solver_second=multistep", "--guidance_interval_second=0.1,0.8"]
    res = CliRunner().invoke(rdm, ["export", f"--out={tmp_path / 'p'}", *nets, "--num_steps_first=6",
                                   "--num_steps_second=12", *args])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "p" / "pipeline.json").read_text())
    assert doc["stages"][0]["sampler"]["solver"] == "multistep"
    assert doc["stages"][1]["sampler"]["guidance_interval"] == [0.1, 0.8]
    pipe = RelayPipeline.from_pretrained(tmp_path / "p")
    assert pipe.stages[1].config.guidance_interval == (0.1, 0.8)
    assert gen(tmp_path / "g", *nets, *args).exit_code == 0
    np.testing.assert_array_equal(pipe(range(4)).array[2], np.asarray(Image.open(tmp_path / "g" / "000002.png")))
