"""Generation on bad input and faults: one error line naming the option or file, non-zero exit, no traceback,
the user's files as they were; never an image that is not finite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from relay_diffusion.checkpoints.snapshot import save_network
from relay_diffusion.cli import main as rdm
from relay_diffusion.core.process import BlurProcess
from test_stage_unit import snapshot, tiny

STEPS = ["--num_steps_first=4", "--num_steps_second=10", "--seeds=0-3", "--device=cpu"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("nets")
    first = snapshot(root / "s4.safetensors", 4, "edm", seed=1)
    second = snapshot(root / "s8.safetensors", 8, "relay", seed=2, process=BlurProcess(up_scale=2))
    return [f"--network_first={first}", f"--network_second={second}"]


def gen(outdir, *args):
    return CliRunner().invoke(rdm, ["generate", f"--outdir={outdir}", *STEPS, *map(str, args)])


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_clean_error(result, *needles):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), repr(result.exception)
    for needle in needles:
        assert needle in result.output, result.output


def test_rerun_with_other_settings_is_refused_and_keeps_the_images(nets, tmp_path):
    out = tmp_path / "out"
    assert gen(out, *nets).exit_code == 0
    before = files(out)
    assert "generation.json" in before
    manifest = json.loads(before["generation.json"], parse_constant=lambda c: pytest.fail(c))
    assert [s["kind"] for s in manifest["stages"]] == ["edm", "relay"]
    result = gen(out, *nets, "--s_noise_second=0.5")
    assert_clean_error(result, "holds images made with other networks or settings", "s_noise")
    other = snapshot(tmp_path / "other.safetensors", 8, "relay", seed=9, process=BlurProcess(up_scale=2))
    result = gen(out, nets[0], f"--network_second={other}")
    assert_clean_error(result, "sha256")
    assert files(out) == before
    # the same settings resume; --overwrite regenerates with the new ones
    assert gen(out, *nets).exit_code == 0 and files(out) == before
    assert gen(out, *nets, "--s_noise_second=0.5", "--overwrite").exit_code == 0
    assert files(out)["000000.png"] != before["000000.png"]


def test_pngs_without_a_manifest_are_not_mixed_with_new_ones(nets, tmp_path):
    out = tmp_path / "legacy"
    out.mkdir()
    (out / "000000.png").write_bytes(b"someone else's image")
    result = gen(out, *nets)
    assert_clean_error(result, "no generation.json")
    assert files(out) == {"000000.png": b"someone else's image"}


def test_non_finite_weights_write_no_image(tmp_path):
    net = tiny(8, seed=3)
    with torch.no_grad():
        next(iter(net.parameters())).fill_(float("nan"))
    bad = str(save_network(net, tmp_path / "nan.safetensors", extra={"stage_kind": "relay",
                                                                      "process": {"up_scale": 2}}))
    first = snapshot(tmp_path / "s4.safetensors", 4, "edm", seed=1)
    result = gen(tmp_path / "out", f"--network_first={first}", f"--network_second={bad}")
    assert_clean_error(result, "not finite")
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize("args, needle", [
    (["--sigma_max_first=inf"], "--sigma_max_first"),
    (["--sigma_max_first=nan"], "--sigma_max_first"),
    (["--rho_first=1e-300"], "--rho_first"),
    (["--S_noise=1e30"], "--S_noise"),
    (["--num_steps_first=1000000000"], "--num_steps_first"),
    (["--seeds=0-99999999999"], "--seeds"),
    (["--seeds=5-2"], "--seeds"),
    (["--device=banana"], "--device"),
    (["--device=cuda:7"] if not torch.cuda.is_available() else ["--device=cuda:999"], "--device"),
    (["--blur_sigma_max_second=-1"], "--blur_sigma_max_second"),
    (["--up_scale_second=3"], "up_scale 3"),
])
def test_bad_options_name_themselves(nets, tmp_path, args, needle):
    result = CliRunner().invoke(rdm, ["generate", f"--outdir={tmp_path / 'o'}", "--num_steps_first=4",
                                      "--num_steps_second=10", *nets, *args])
    assert_clean_error(result, needle)
    assert not (tmp_path / "o").exists()


def test_outdir_that_is_a_file(nets, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("mine")
    result = gen(target, *nets)
    assert_clean_error(result, "--outdir", "not a folder")
    assert target.read_text() == "mine"


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, b"garbage" * 50])
def test_broken_network_files(nets, tmp_path, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    result = gen(tmp_path / "o", nets[0], f"--network_second={bad}")
    assert_clean_error(result, "--network_second", "bad.safetensors")
    assert bad.read_bytes() == content


def test_demo_errors(nets, tmp_path):
    for args, needle in ((["--seeds=abc"], "--seeds"), (["--device=banana"], "--device"),
                         ([nets[1].replace("--network_second", "--network_first"), nets[0].replace(
                             "--network_first", "--network_second")], "--network_first")):
        res = CliRunner().invoke(rdm, ["demo", f"--outdir={tmp_path / 'd'}", *(args if "network" in args[0] else
                                                                             [*nets, *args])])
        assert_clean_error(res, needle)


def _plain_safetensors(path: Path, net) -> Path:
    """Weights without the config in their metadata, so the sidecar JSON is what describes them."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("sidecar, needle", [
    ("[1, 2, 3]", "init_kwargs"),
    ('{"format": "relay-diffusion/network-1", "precond": "EDMPrecond"}', "init_kwargs"),
    ("{not json", "cannot load"),
])
def test_bad_sidecar_json(nets, tmp_path, sidecar, needle):
    path = _plain_safetensors(tmp_path / "net.safetensors", tiny(8))
    path.with_suffix(".json").write_text(sidecar)
    result = gen(tmp_path / "o", nets[0], f"--network_second={path}")
    assert_clean_error(result, "--network_second", "net.safetensors", needle)


def test_sidecar_with_unknown_kwarg_or_other_shapes(nets, tmp_path):
    from relay_diffusion.checkpoints.snapshot import network_config

    config = network_config(tiny(8))
    path = _plain_safetensors(tmp_path / "net.safetensors", tiny(8))
    path.with_suffix(".json").write_text(json.dumps({**config, "init_kwargs": {**config["init_kwargs"], "banana": 1}}))
    assert_clean_error(gen(tmp_path / "o", nets[0], f"--network_second={path}"), "net.safetensors", "banana")
    bigger = dict(config["init_kwargs"], model_channels=32)
    path.with_suffix(".json").write_text(json.dumps({**config, "init_kwargs": bigger}))
    assert_clean_error(gen(tmp_path / "o", nets[0], f"--network_second={path}"), "net.safetensors")


@pytest.mark.parametrize("name, content", [("ref.pkl", b""), ("ref.pt", b"\x80\x04garbage"), ("ref.pkl", b"PK\x03\x04")])
def test_broken_reference_checkpoints(nets, tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert_clean_error(gen(tmp_path / "o", nets[0], f"--network_second={path}"), "--network_second", name)
    assert "Aborted" not in gen(tmp_path / "o", nets[0], f"--network_second={path}").output


def test_disk_full_is_one_line(nets, tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("relay_diffusion.generation.files.save_png", full)
    result = gen(tmp_path / "o", *nets)
    assert_clean_error(result, "No space left on device")
    assert not list((tmp_path / "o").glob("*.png")) if (tmp_path / "o").exists() else True


def test_corrupt_input_png_of_a_second_stage_run(nets, tmp_path):
    indir = tmp_path / "in"
    assert gen(indir, nets[0], "--sampler_stages=first").exit_code == 0
    (indir / "000002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = gen(tmp_path / "o", nets[1], "--sampler_stages=second", f"--indir={indir}")
    assert_clean_error(result, "000002.png", "not a readable image")


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage"])
def test_convert_on_broken_checkpoints(tmp_path, content):
    src = tmp_path / "ref.pkl"
    src.write_bytes(content)
    result = CliRunner().invoke(rdm, ["convert", str(src), str(tmp_path / "out")])
    assert_clean_error(result, "ref.pkl")
    assert not list(tmp_path.glob("out*"))


def test_a_second_generation_into_a_folder_in_use_is_refused(tmp_path):
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "relay_diffusion", "generate", f"--outdir={out}", "--seeds=0-199",
                              "--batch=1", "--device=cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not list(out.glob("*.png")) and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)  # until the first job is writing
        assert first.poll() is None, "the first generation ended before the second started"
        before = sorted(p.name for p in out.glob("*.png"))
        res = CliRunner().invoke(rdm, ["generate", f"--outdir={out}", "--seeds=0-3", "--device=cpu",
                                       "--num_steps_first=3"])  # other settings
        assert res.exit_code != 0 and "is in use by another generation" in res.output, res.output
        assert set(before) <= {p.name for p in out.glob("*.png")}
    finally:
        first.kill()
        first.wait()
