"""The cascaded super-resolution stage (core/sr.py): network, loss, training, generation and files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_adm
from relay_diffusion.checkpoints.loading import load_network_file
from relay_diffusion.checkpoints.snapshot import save_network
from relay_diffusion.cli import main as rdm
from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.core.sr import SRCondition, SRLoss, downsample, upsample
from relay_diffusion.generation import (EDMStage, FixedBatchDenoiser, RelayPipeline, SRStage, SRStageConfig,
                                        check_stages)
from relay_diffusion.networks.precond import build_network
from relay_diffusion.training import TrainingConfig, plan_training, run_training
from test_training import TINY, write_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_sr(res: int, level_channel: bool = False, label_dim: int = 0, seed: int = 0) -> torch.nn.Module:
    net = build_network("SRPrecond", img_resolution=res, img_channels=3, label_dim=label_dim,
                        model_type="DhariwalUNet", model_channels=16, channel_mult=[1], num_blocks=1,
                        attn_resolutions=[], level_channel=level_channel)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval().requires_grad_(False)


def test_condition_round_trip_and_validation():
    c = SRCondition(up_scale=2, noise_aug=0.3)
    assert SRCondition.from_dict(c.to_dict()) == c and c.level_channel and not SRCondition().level_channel
    for bad in ({"up_scale": 0}, {"noise_aug": -1.0}, {"noise_aug": float("nan")}, {"blur": 1}):
        with pytest.raises(ValueError):
            SRCondition.from_dict(bad)


def test_network_reads_the_conditioning_image_and_the_level():
    net = tiny_sr(8, level_channel=True)
    assert net.model.init_kwargs["in_channels"] == 7  # 3 noisy + 3 conditioning + 1 level
    x, cond = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([0.5, 2.0])
    a = net(x, sigma, cond=cond, cond_level=0.0)
    assert not torch.equal(a, net(x, sigma, cond=cond + 0.5, cond_level=0.0))  # the image matters
    assert not torch.equal(a, net(x, sigma, cond=cond, cond_level=0.3))        # and the level
    assert torch.equal(a, net(x, sigma, cond=cond))                            # None is level 0
    with pytest.raises(ValueError, match="conditioning image"):
        net(x, sigma)
    with pytest.raises(ValueError, match="cond must have shape"):
        net(x, sigma, cond=cond[:, :, :4, :4])


def test_snapshot_records_kind_and_condition(tmp_path):
    net = tiny_sr(8, level_channel=True)
    cond = SRCondition(up_scale=2, noise_aug=0.25)
    path = save_network(net, tmp_path / "sr.safetensors", extra={"stage_kind": "sr", "condition": cond.to_dict()})
    file = load_network_file(path)
    assert file.kind == "sr" and file.condition == cond and file.process is None
    x, c = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    assert torch.equal(file.net(x, 1.0, cond=c, cond_level=0.1), net(x, 1.0, cond=c, cond_level=0.1))
    bare = save_network(net, tmp_path / "bare.safetensors", extra={"stage_kind": "sr"})
    with pytest.raises(ValueError, match="records no 'condition'"):
        load_network_file(bare)


class Spy(torch.nn.Module):
    """Records what the loss gives the network and returns the noisy input."""

    def forward(self, x, sigma, class_labels=None, augment_labels=None, cond=None, cond_level=None):
        self.seen = dict(x=x, sigma=sigma, cond=cond, level=cond_level)
        return x


def test_loss_conditions_on_the_box_downsampled_image():
    y = torch.rand(4, 3, 8, 8) * 2 - 1
    spy = Spy()
    SRLoss(SRCondition(up_scale=2))(spy, y, SeedGenerators([0, 1, 2, 3]))
    assert torch.equal(spy.seen["cond"], upsample(downsample(y, 2), 2))
    assert torch.equal(spy.seen["level"], torch.zeros(4))
    # Same seeds, same draws: the loss is a function of the seeds.
    a = SRLoss(SRCondition(up_scale=2))(spy, y, SeedGenerators([0, 1, 2, 3]))
    b = SRLoss(SRCondition(up_scale=2))(spy, y, SeedGenerators([0, 1, 2, 3]))
    assert torch.equal(a, b)


def test_loss_noise_augmentation_levels_and_noise():
    y = torch.zeros(256, 3, 8, 8)
    spy = Spy()
    SRLoss(SRCondition(up_scale=4, noise_aug=0.5))(spy, y, SeedGenerators(range(256)))
    level, cond = spy.seen["level"], spy.seen["cond"]
    assert level.min() >= 0 and level.max() <= 0.5 and level.std() > 0.1  # uniform on [0, 0.5]
    low = cond[:, :, ::4, ::4]
    assert torch.equal(upsample(low, 4), cond)                    # noise at the low resolution, then upsampled
    ratio = low.flatten(1).std(1) / level                         # noise std = level per sample
    assert abs(float(ratio[level > 0.1].median()) - 1) < 0.15


def test_denoiser_extras_follow_their_samples_in_chunks_and_doubled_batches():
    net = tiny_sr(8, label_dim=3)
    x, cond = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    level, sigma = torch.zeros(5), torch.full([5], 1.5)
    labels = torch.eye(3)[[0, 1, 2, 0, 1]]
    whole = net(x, sigma, labels, cond=cond, cond_level=level)
    chunked = FixedBatchDenoiser(net, 2, extra={"cond": cond, "cond_level": level})
    assert torch.allclose(chunked(x, sigma, labels), whole, atol=1e-5)
    # a guidance call (2N batch, second half unlabelled) sees each sample's own conditioning image twice
    doubled = chunked(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, torch.zeros_like(labels)]))
    uncond = net(x, sigma, torch.zeros_like(labels), cond=cond, cond_level=level)
    assert torch.allclose(doubled[:5], whole, atol=1e-5) and torch.allclose(doubled[5:], uncond, atol=1e-5)
    with pytest.raises(ValueError, match="cond for 5"):
        chunked(x[:3], sigma[:3], labels[:3])


def test_stage_results_depend_on_the_seed_only_and_on_the_input():
    pipe = RelayPipeline([EDMStage(tiny_adm(4)), SRStage(tiny_sr(8), SRStageConfig(num_steps=3),
                                                         SRCondition(up_scale=2))])
    together = pipe(seeds=[0, 1, 2, 3]).samples
    alone = torch.cat([pipe(seeds=[s]).samples for s in range(4)])
    assert torch.equal(together, alone) and torch.isfinite(together).all()
    sr_only = RelayPipeline([SRStage(tiny_sr(8), SRStageConfig(num_steps=3), SRCondition(up_scale=2))])
    low = torch.rand(2, 3, 4, 4) * 2 - 1
    a = sr_only(seeds=[0, 1], inputs=low).samples
    assert not torch.equal(a, sr_only(seeds=[0, 1], inputs=-low).samples)
    aug = tiny_sr(8, level_channel=True)
    clean = RelayPipeline([SRStage(aug, SRStageConfig(num_steps=3), SRCondition(2, 0.5))])
    noisy = RelayPipeline([SRStage(aug, SRStageConfig(num_steps=3, cond_level=0.2), SRCondition(2, 0.5))])
    assert not torch.equal(clean(seeds=[0, 1], inputs=low).samples, noisy(seeds=[0, 1], inputs=low).samples)


def test_chain_checks_the_relay_factor():
    with pytest.raises(ValueError, match=r"resolution 8 != previous stage resolution 4 x up_scale 4"):
        check_stages([EDMStage(tiny_adm(4)), SRStage(tiny_sr(8), condition=SRCondition(up_scale=4))])
    with pytest.raises(ValueError, match="only the first stage may be an EDM stage"):
        check_stages([EDMStage(tiny_adm(4)), EDMStage(tiny_adm(8))])


def test_config_refuses_bad_sr_options(tmp_path):
    with pytest.raises(ValueError, match="--noise-aug"):
        TrainingConfig(outdir=str(tmp_path), data="x", precond="sr", noise_aug=-0.1).validate()
    with pytest.raises(ValueError, match="--noise-aug: only applies"):
        TrainingConfig(outdir=str(tmp_path), data="x", precond="blur", noise_aug=0.2).validate()
    with pytest.raises(ValueError, match="--up-scale"):
        TrainingConfig(outdir=str(tmp_path), data="x", precond="sr", up_scale=0).validate()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, str]:
    """A stage 1 at 4x4 and a super-resolution stage at 8x8 with noise augmentation, trained briefly."""
    root = tmp_path_factory.mktemp("sr")
    data8, data4 = write_dataset(root / "d8.zip", 16, 8), write_dataset(root / "d4.zip", 16, 4)
    common = dict(batch=8, lr=2e-3, ema=0.0001, seed=3, tick=0.008, snap=1000, dump=1000, duration=16 / 1e6, **TINY)
    runs = {}
    for name, data, extra in (("first", data4, dict(precond="edm", cres=[1])),
                              ("sr", data8, dict(precond="sr", up_scale=2, noise_aug=0.3, grid=4))):
        cfg = TrainingConfig(outdir=str(root / name), data=str(data), **{**common, **extra})
        run_dir = run_training(plan_training(cfg))
        runs[name] = str(sorted(run_dir.glob("network-snapshot-*.safetensors"))[-1])
        runs[name + "_dir"] = str(run_dir)
    return runs


def test_training_writes_a_self_describing_sr_snapshot(trained):
    file = load_network_file(trained["sr"])
    assert file.kind == "sr" and file.condition == SRCondition(up_scale=2, noise_aug=0.3)
    assert file.net.level_channel and file.net.cond_channels == 3
    run = Path(trained["sr_dir"])
    assert (run / "reals-relay-start.png").is_file() and list(run.glob("samples-*.png"))
    records = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert records and all(0 < r["cpu_sec_per_tick"] < 1e4 for r in records)  # the compute budget, per tick
    options = json.loads((run / "training_options.json").read_text())
    assert options["loss"] == {"name": "SRLoss", "label_dropout": 0.0,
                               "condition": {"up_scale": 2, "noise_aug": 0.3}}


def test_generate_and_export_sample_a_super_resolution_stage(trained, tmp_path):
    args = ["generate", "--seeds=0-3", "--device=cpu", "--num_steps_first=4", "--num_steps_sr=3",
            f"--network_first={trained['first']}", f"--network_second={trained['sr']}"]
    result = CliRunner().invoke(rdm, [*args, f"--outdir={tmp_path / 'a'}", "--batch=4"])
    assert result.exit_code == 0, result.output
    assert "super-resolution, 8x8" in result.output and "NFE per image (denoiser evaluations): 7 + 5 = 12" in result.output
    again = CliRunner().invoke(rdm, [*args, f"--outdir={tmp_path / 'b'}", "--batch=1"])
    assert again.exit_code == 0, again.output
    a, b = sorted((tmp_path / "a").glob("*.png")), sorted((tmp_path / "b").glob("*.png"))
    assert len(a) == 4 and [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    manifest = json.loads((tmp_path / "a" / "generation.json").read_text())
    assert manifest["stages"][1]["kind"] == "sr" and manifest["stages"][1]["condition"]["up_scale"] == 2
    # a different augmentation level is a different image set: refused without --overwrite
    other = CliRunner().invoke(rdm, [*args, f"--outdir={tmp_path / 'a'}", "--cond_level_sr=0.1"])
    assert other.exit_code != 0 and "cond_level" in other.output

    export = CliRunner().invoke(rdm, ["export", f"--out={tmp_path / 'pipe'}", "--num_steps_first=4",
                                      "--num_steps_sr=3", f"--network_first={trained['first']}",
                                      f"--network_second={trained['sr']}"])
    assert export.exit_code == 0, export.output
    pipe = RelayPipeline.from_pretrained(tmp_path / "pipe")
    assert [s.kind for s in pipe.stages] == ["edm", "sr"] and pipe.stages[1].condition.noise_aug == 0.3
    from PIL import Image
    arr = pipe(seeds=range(4)).array
    assert np.array_equal(arr, np.stack([np.asarray(Image.open(p)) for p in a]))


def test_bad_sr_options_and_swapped_files_are_one_line(trained, tmp_path):
    base = ["generate", f"--outdir={tmp_path / 'o'}", "--seeds=0-1", "--device=cpu"]
    bad = CliRunner().invoke(rdm, [*base, "--cond_level_sr=-1", f"--network_first={trained['first']}",
                                   f"--network_second={trained['sr']}"])
    assert bad.exit_code != 0 and "--cond_level_sr" in bad.output and "Traceback" not in bad.output
    swapped = CliRunner().invoke(rdm, [*base, f"--network_first={trained['sr']}",
                                       f"--network_second={trained['first']}"])
    assert swapped.exit_code != 0 and "super-resolution network; it cannot be stage 1" in swapped.output
    assert not (tmp_path / "o").exists()


def test_second_stage_only_from_pngs_and_options_that_do_not_apply(trained, tmp_path):
    from PIL import Image

    indir = tmp_path / "in"
    indir.mkdir()
    rng = np.random.default_rng(0)
    for s in range(3):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(indir / f"{s:06d}.png")
    base = ["generate", "--seeds=0-2", "--device=cpu", "--sampler_stages=second", f"--indir={indir}",
            f"--network_second={trained['sr']}", "--num_steps_sr=2"]
    ok = CliRunner().invoke(rdm, [*base, f"--outdir={tmp_path / 'o'}"])
    assert ok.exit_code == 0, ok.output
    assert len(list((tmp_path / "o").glob("*.png"))) == 3
    relay_flag = CliRunner().invoke(rdm, [*base, f"--outdir={tmp_path / 'p'}", "--num_steps_second=5"])
    assert relay_flag.exit_code != 0 and "--num_steps_second applies to relay stages" in relay_flag.output
    assert "*_sr" in relay_flag.output and not (tmp_path / "p").exists()
    process_flag = CliRunner().invoke(rdm, [*base, f"--outdir={tmp_path / 'p'}", "--block_scale_second=0"])
    assert process_flag.exit_code != 0 and "--block_scale_second applies to relay stages" in process_flag.output


def test_sampling_noise_level_needs_a_level_input():
    stage = SRStage(tiny_sr(8, level_channel=False), SRStageConfig(num_steps=2, cond_level=0.1), SRCondition(2))
    with pytest.raises(ValueError, match="needs a network trained with noise augmentation"):
        check_stages([stage])
