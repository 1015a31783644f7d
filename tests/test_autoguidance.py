"""Autoguidance (generation/guides.py): the guided denoiser, the self-dropout guide, NFE counting, the options."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_adm
from relay_diffusion.checkpoints.bundled import bundled_network_paths
from relay_diffusion.cli import main as rdm
from relay_diffusion.core.samplers import denoise, time_steps
from relay_diffusion.core.toy import GaussianToyDenoiser
from relay_diffusion.generation import EDMStage, EDMStageConfig, FixedBatchDenoiser, RelayPipeline
from relay_diffusion.generation.guides import DropoutGuide, uniform_hash
from relay_diffusion.generation.stages import stage_nfe

pytestmark = pytest.mark.usefixtures("single_thread")


class Spy:
    def __init__(self, net):
        self.net, self.calls = net, 0
        self.img_resolution, self.img_channels, self.label_dim = net.img_resolution, net.img_channels, net.label_dim

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


def dropout_net(seed=0, p=0.3):
    net = tiny_adm(8, seed=seed)
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
    return net


def test_the_guided_denoiser_steers_away_from_the_guide():
    good, bad = GaussianToyDenoiser(3, 8, var=0.25), GaussianToyDenoiser(3, 8, var=1.0)
    x, t = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    guided = FixedBatchDenoiser(good, 2, guide=bad)
    d_good, d_bad = denoise(good, x, t, None), denoise(bad, x, t, None)
    assert torch.allclose(denoise(guided, x, t, None, 2.5), 2.5 * d_good - 1.5 * d_bad)
    assert torch.equal(denoise(guided, x, t, None, 1.0), d_good)                         # scale 1: no guidance
    assert torch.equal(denoise(guided, x, t, None, 2.5, (2.0, 5.0), 1.3), d_good)          # outside the interval


def test_guide_evaluations_are_counted_where_the_interval_applies():
    net, guide = Spy(GaussianToyDenoiser(3, 8)), Spy(GaussianToyDenoiser(3, 8, var=1.0))
    for interval in (None, (0.5, 10.0)):
        config = EDMStageConfig(num_steps=9, solver="multistep", cfg_scale=2.0, guidance_interval=interval)
        stage = EDMStage(net, config, guide=guide)
        net.calls = guide.calls = 0
        RelayPipeline([stage], net_batch=1).run([0])
        assert stage_nfe(stage) == net.calls + guide.calls
        levels = time_steps(9, 0.002, 80.0, 7.0).tolist()[:9]
        inside = sum(interval is None or interval[0] < t <= interval[1] for t in levels)
        assert guide.calls == inside and net.calls == 9 and 0 < inside < (9 if interval else 10)
    assert stage_nfe(EDMStage(net, EDMStageConfig(num_steps=9, solver="multistep"), guide=guide)) == 9


def test_self_dropout_is_deterministic_batch_invariant_and_leaves_the_network_alone():
    net = dropout_net()
    guide = DropoutGuide(net)
    x, sigma = torch.randn(5, 3, 8, 8), torch.full([5], 2.0)
    plain = net(x, sigma)
    out = guide(x, sigma)
    assert not torch.allclose(out, plain, atol=1e-3)                      # dropout acts
    assert torch.equal(out, guide(x, sigma))                             # no random state
    fixed = FixedBatchDenoiser(guide, 4)  # calls of one size: bit-exact on the CPU (see FixedBatchDenoiser)
    assert torch.equal(fixed(x, sigma)[3:4], fixed(x[3:4], sigma[3:4]))    # a sample's output is its own
    assert torch.equal(net(x, sigma), plain)                             # the hooks are gone afterwards
    assert not torch.equal(guide(x, sigma * 1.01), out)                  # masks change with the level


def test_the_mask_hash_is_uniform_and_keeps_the_rate():
    u = uniform_hash(torch.tensor([1073741824, 7], dtype=torch.int64), (64, 16, 16), salt=3)
    assert u.shape == (2, 64, 16, 16) and 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float((u >= 0.1).float().mean()) - 0.9) < 0.01 and abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(u[0], u[1])


def test_a_network_without_dropout_cannot_guide_itself():
    with pytest.raises(ValueError, match="no dropout"):
        DropoutGuide(dropout_net(p=0.0))


def _generate(tmp_path, name, *extra):
    args = ["generate", "--outdir", str(tmp_path / name), "--seeds", "0-1", "--preset", "default",  # unguided
            "--solver_first", "multistep", "--num_steps_first", "3", "--solver_second", "multistep",
            "--num_steps_second", "8", *extra]
    return CliRunner().invoke(rdm, args)


@pytest.mark.skipif(bundled_network_paths() is None, reason="no bundled networks")
def test_the_command_line_guides_both_stages_and_records_it(tmp_path):
    paths = bundled_network_paths()
    plain = _generate(tmp_path, "plain")
    guided = _generate(tmp_path, "guided", "--cfg_scale_first", "2", "--guide_first", "self-dropout",
                       "--cfg_scale_second", "1.5", "--guide_second", paths["second"])
    assert plain.exit_code == 0 and guided.exit_code == 0, guided.output
    assert "3 + 3 = 6" in plain.output and "6 + 6 = 12" in guided.output  # guides counted
    manifest = json.loads((tmp_path / "guided" / "generation.json").read_text())
    assert manifest["stages"][0]["guide"] == {"kind": "self-dropout"}
    assert manifest["stages"][1]["guide"]["file"] == "stage2-64x64.safetensors" and manifest["nfe"] == [6, 6]
    a, b = ((tmp_path / d / "000000.png").read_bytes() for d in ("plain", "guided"))
    assert a != b
    again = _generate(tmp_path, "guided", "--cfg_scale_first", "2", "--guide_first", "self-dropout",
                      "--cfg_scale_second", "1.5", "--guide_second", paths["second"])
    assert again.exit_code == 0, again.output  # the same guide matches the folder's generation.json
    other = _generate(tmp_path, "guided", "--cfg_scale_first", "2", "--guide_first", "self-dropout",
                      "--cfg_scale_second", "1.5", "--guide_second", "self-dropout")
    assert other.exit_code != 0 and "guide" in other.output  # another guide is another set of images


@pytest.mark.skipif(bundled_network_paths() is None, reason="no bundled networks")
@pytest.mark.parametrize("extra, message", [
    (["--guide_first", "self-dropout"], "--guide_first guides only with a guidance scale above 1 (--cfg_scale_first)"),
    (["--cfg_scale_first", "2", "--guide_first", "SECOND"], "the guide of a EDM stage must be one too"),
    (["--cfg_scale_second", "2", "--guide_second", "FIRST"], "the guide of a relay stage must be one too"),
    (["--sampler_stages", "first", "--cfg_scale_second", "2", "--guide_second", "self-dropout"],
     "--guide_second: this chain has no relay stage"),
    (["--cfg_scale_first", "2", "--guide_first", "missing.safetensors"], "missing.safetensors"),
])
def test_guides_that_cannot_work_are_refused_naming_the_option(tmp_path, extra, message):
    paths = bundled_network_paths()
    extra = [paths["second"] if e == "SECOND" else paths["first"] if e == "FIRST" else e for e in extra]
    result = _generate(tmp_path, "out", *extra)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(bundled_network_paths() is None, reason="no bundled networks")
def test_a_pipeline_folder_keeps_its_guides(tmp_path):
    from relay_diffusion.generation.files import load_images

    paths = bundled_network_paths()
    options = ["--solver_first", "multistep", "--num_steps_first", "3", "--solver_second", "multistep",
               "--num_steps_second", "8", "--cfg_scale_first", "2", "--guide_first", paths["first"],
               "--cfg_scale_second", "1.5", "--guide_second", "self-dropout"]
    exported = CliRunner().invoke(rdm, ["export", "--out", str(tmp_path / "pipe"), *options])
    assert exported.exit_code == 0, exported.output
    doc = json.loads((tmp_path / "pipe" / "pipeline.json").read_text())
    assert [s.get("guide") for s in doc["stages"]] == ["stage1-16x16-guide.safetensors", "self-dropout"]
    pipe = RelayPipeline.from_pretrained(tmp_path / "pipe")
    assert [s.guide_source for s in pipe.stages][1] == "self-dropout" and pipe.stages[0].guide is not None
    generated = CliRunner().invoke(rdm, ["generate", "--outdir", str(tmp_path / "out"), "--seeds", "0-1", *options])
    assert generated.exit_code == 0, generated.output
    files = load_images(tmp_path / "out", [0, 1]).permute(0, 2, 3, 1).numpy()
    assert (pipe(seeds=[0, 1]).array == ((files + 1) * 127.5).round()).all()
