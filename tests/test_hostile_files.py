"""Files from strangers: loading them runs none of their code, and each refusal is one line naming the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
from PIL import Image

#: Printed by the hostile archive's ``__setstate__`` if anything ever runs it.
MARKER = "HOSTILE-SETSTATE-RAN"


class Hostile(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` (run by ``torch.jit.load``) prints :data:`MARKER`."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        self.weight = state[0]
        self.training = state[1]
        print("HOSTILE-SETSTATE-RAN")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    path = folder / "network.pt"
    torch.jit.script(Hostile()).save(str(path))
    return path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay_diffusion", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_the_hostile_archive_really_runs_code_when_loaded_as_torchscript(hostile):
    res = subprocess.run([sys.executable, "-c", f"import torch; torch.jit.load({str(hostile)!r})"],
                         capture_output=True, text=True, timeout=120)
    assert MARKER in res.stdout + res.stderr  # what every loader below must never do


def one_error_line(res: subprocess.CompletedProcess, path: Path) -> str:
    assert res.returncode != 0
    assert MARKER not in res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines()  # click's usage lines around an option's error aside
             if line.strip() and not line.startswith(("Usage: ", "Try '"))]
    assert len(lines) == 1 and str(path) in lines[0], res.stderr
    return lines[0]


def test_convert_refuses_torchscript_without_running_it(hostile, tmp_path):
    res = run("convert", str(hostile), str(tmp_path / "out"), cwd=tmp_path)
    assert "TorchScript" in one_error_line(res, hostile)
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_a_torchscript_network_without_running_it(hostile, tmp_path):
    res = run("generate", f"--outdir={tmp_path / 'out'}", "--seeds=0", "--device=cpu", "--sampler_stages=first",
              f"--network_first={hostile}", cwd=tmp_path)
    assert "TorchScript" in one_error_line(res, hostile)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_torchscript_detector_is_read_without_running_it(hostile, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    res = run("evaluate", "activations", f"--data={folder}", f"--dest={tmp_path / 'act.npz'}", "--device=cpu",
              "--workers=0", f"--detector={hostile}", cwd=tmp_path)
    assert "Inception" in one_error_line(res, hostile)  # its tensors were read: they are not Inception's
    assert not (tmp_path / "act.npz").exists()


def test_torchscript_tensors_match_what_torchscript_itself_holds(tmp_path):
    import zipfile

    from relay_diffusion.checkpoints.unpickle import torchscript_prefix, torchscript_tensors

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(5, 2))
    path = tmp_path / "ts.pt"
    torch.jit.script(net).save(str(path))
    with zipfile.ZipFile(path) as archive:
        tensors = torchscript_tensors(archive, torchscript_prefix(archive.namelist()), max_bytes=1 << 20)
    expected = net.state_dict()
    assert set(tensors) == set(expected)
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    with zipfile.ZipFile(path) as archive, pytest.raises(Exception, match="limit"):
        torchscript_tensors(archive, torchscript_prefix(archive.namelist()), max_bytes=64)


def peak_rss_of_loading(path: Path) -> tuple[str, float]:
    """The error of loading ``path`` as a network in a fresh process, and that process's peak RSS in GB."""
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child of a large test process would report
    # its parent's peak
    code = ("import sys\nfrom relay_diffusion.checkpoints.loading import load_network_file\n"
            "try:\n    load_network_file(sys.argv[1])\n    print('loaded')\nexcept ValueError as exc:\n    print(exc)\n"
            "hwm = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
            "print(int(hwm) / 1e6)")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    message, rss = res.stdout.strip().rsplit("\n", 1)
    return message, float(rss)


@pytest.mark.parametrize("change, needle", [({"model_channels": 8192}, "do not match"),
                                            ({"num_blocks": 10**7}, "blocks")])
def test_a_small_file_asking_for_a_huge_network_is_refused_before_allocating(tmp_path, change, needle):
    import json

    from relay_diffusion.checkpoints.snapshot import read_config, save_network
    from relay_diffusion.networks.precond import build_network

    net = build_network("EDMPrecond", img_resolution=8, img_channels=3, model_type="DhariwalUNet",
                        model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    path = save_network(net, tmp_path / "net.safetensors")
    config = read_config(path)
    config["init_kwargs"].update(change)
    path.with_suffix(".json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file  # the metadata copy says the same

    save_file(load_file(str(path)), str(path), metadata={"relay_diffusion": json.dumps(config)})
    assert path.stat().st_size < 1 << 20
    message, rss_gb = peak_rss_of_loading(path)
    assert str(path) in message and needle in message, message
    assert rss_gb < 1.0


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory) -> Path:
    from relay_diffusion.generation import RelayPipeline

    folder = tmp_path_factory.mktemp("pipeline") / "pipe"
    RelayPipeline.from_bundled("cpu").save_pretrained(folder)
    return folder


def edited_pipeline(source: Path, tmp_path: Path, edit) -> Path:
    import json
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(source, folder)
    doc = json.loads((folder / "pipeline.json").read_text())
    edit(doc, folder)
    (folder / "pipeline.json").write_text(json.dumps(doc))
    return folder


def _outside(doc, folder, how):
    outside = folder.parent / "elsewhere.safetensors"
    (folder / doc["stages"][0]["network"]).rename(outside)
    folder.joinpath(doc["stages"][0]["network"]).with_suffix(".json").rename(outside.with_suffix(".json"))
    if how == "absolute":
        doc["stages"][0]["network"] = str(outside)
    elif how == "dotdot":
        doc["stages"][0]["network"] = "../elsewhere.safetensors"
    else:  # a link inside the folder to a file outside it
        (folder / "link.safetensors").symlink_to(outside)
        (folder / "link.json").symlink_to(outside.with_suffix(".json"))
        doc["stages"][0]["network"] = "link.safetensors"


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_pipeline_folder_never_reads_outside_itself(pipeline_folder, tmp_path, how):
    from relay_diffusion.generation import RelayPipeline

    folder = edited_pipeline(pipeline_folder, tmp_path, lambda doc, folder: _outside(doc, folder, how))
    with pytest.raises(ValueError, match="outside the pipeline folder"):
        RelayPipeline.from_pretrained(folder)


@pytest.mark.parametrize("edit, needle", [
    (lambda doc, folder: doc.update(net_batch=100_000_000), "net_batch must be an integer from 1 to"),
    (lambda doc, folder: doc.update(net_bacth=8), "unknown keys ['net_bacth']"),
    (lambda doc, folder: doc["stages"][1].update(proces={}), "stage 2: unknown keys ['proces']"),
    (lambda doc, folder: doc.update(stages=doc["stages"] * 5), "10 stages"),
])
def test_pipeline_file_values_are_bounded_and_keys_checked(pipeline_folder, tmp_path, edit, needle):
    from relay_diffusion.generation import RelayPipeline

    folder = edited_pipeline(pipeline_folder, tmp_path, edit)
    with pytest.raises(ValueError) as info:
        RelayPipeline.from_pretrained(folder)
    assert needle in str(info.value) and str(folder) in str(info.value)


def test_deeply_nested_pipeline_file_is_one_error(pipeline_folder, tmp_path):
    from relay_diffusion.generation import RelayPipeline

    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "pipeline.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        RelayPipeline.from_pretrained(folder)


# --- decompression bombs -----------------------------------------------------------------------------------

def run_measured(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``rdm args`` in a child process, and that child's peak RSS in GB."""
    wrapper = ("import resource, subprocess, sys\n"
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6, file=sys.stderr)\n"
               "sys.exit(r.returncode)")
    res = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "relay_diffusion", *args], cwd=cwd,
                         capture_output=True, text=True, timeout=300)
    head, rss = res.stderr.rstrip("\n").rsplit("\n", 1) if "\n" in res.stderr.strip() else ("", res.stderr)
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout, head + "\n"), float(rss)


def zip_with_member(path: Path, name: str, size: int, fill: bytes = b"\0") -> Path:
    """A zip holding one small PNG and member ``name`` of ``size`` bytes of ``fill``, deflated (a few hundred KB)."""
    import io
    import zipfile

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    chunk = fill * (8 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("ok.png", buf.getvalue())
        with zf.open(name, "w", force_zip64=True) as f:
            for start in range(0, size, len(chunk)):
                f.write(chunk[: size - start])
    return path


@pytest.mark.parametrize("member, size", [("dataset.json", 136 << 20), ("big.png", 260 << 20)])
def test_dataset_source_zip_bomb_is_refused_by_the_member_size(tmp_path, member, size):
    source = zip_with_member(tmp_path / "source.zip", member, size, b" " if member.endswith("json") else b"\0")
    assert source.stat().st_size < 2 << 20
    res, rss = run_measured("dataset", f"--source={source}", f"--dest={tmp_path / 'out.zip'}",
                            "--resolution=8x8", cwd=tmp_path)
    assert "Traceback" not in res.stderr and rss < 1.0
    if member == "dataset.json":  # the labels are needed: the run stops, naming the member
        assert res.returncode != 0 and member in res.stderr and "MiB" in res.stderr, res.stderr
        assert not (tmp_path / "out.zip").exists()
    else:  # an image: skipped and listed with its reason in the report, as any unreadable image
        report = (tmp_path / "out.zip.report.json").read_text()
        assert res.returncode == 0 and member in res.stderr and member in report and "MiB" in report, report


def test_mnist_gzip_bomb_is_refused_after_its_header(tmp_path):
    import gzip

    folder = tmp_path / "mnist"
    folder.mkdir()
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(b"\0\0\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
        zeros = bytes(8 << 20)
        for _ in range(1536 // 8):  # 1.5 GB where the header promises 2 images of 28 x 28
            f.write(zeros)
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\0\0\x08\x01" + (2).to_bytes(4, "big") + b"\x01\x02")
    res, rss = run_measured("dataset", f"--source={folder}", f"--dest={tmp_path / 'out.zip'}", cwd=tmp_path)
    assert res.returncode != 0 and "train-images-idx3-ubyte.gz" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert rss < 1.0
    assert not (tmp_path / "out.zip").exists()


def png_bomb(path: Path, side: int) -> Path:
    """A grey PNG of ``side`` x ``side`` zero pixels: a few hundred KB that decode to ``side**2`` bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp, row, parts = zlib.compressobj(9), bytes(side + 1), []
    for _ in range(side):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [9000, 20000])  # past our bound; past Pillow's own (which raises its own error)
def test_decompression_bomb_png_in_indir_is_one_error_line(tmp_path, side):
    indir = tmp_path / "in"
    indir.mkdir()
    bomb = png_bomb(indir / "000000.png", side)
    assert bomb.stat().st_size < 2 << 20
    res, rss = run_measured("generate", f"--indir={indir}", f"--outdir={tmp_path / 'out'}", "--seeds=0",
                            "--device=cpu", "--sampler_stages=second", cwd=tmp_path)
    assert res.returncode != 0 and str(bomb) in res.stderr and "decompression bomb" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert rss < 1.0


def test_a_sub_folder_that_cannot_be_listed_is_an_error_not_a_skip(tmp_path, monkeypatch):
    import errno
    import os

    from relay_diffusion.data.files import list_files

    (tmp_path / "data" / "locked").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data" / "a.png")
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ValueError, match="locked.*Permission denied"):
        list_files(tmp_path / "data")


def test_the_dataset_tool_takes_no_grid_from_a_generate_folder(tmp_path):
    from relay_diffusion.data.sources import open_source

    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(folder / f"{i:06d}.png")
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(folder / "grid.png")
    (folder / "generation.json").write_text("{}")
    assert len(open_source(str(folder))) == 3
    (folder / "generation.json").unlink()  # an ordinary folder: every image counts
    assert len(open_source(str(folder))) == 4


def test_a_fifo_as_the_dataset_source_is_refused_at_once(tmp_path):
    import os
    import time

    fifo = tmp_path / "source.zip"
    os.mkfifo(fifo)
    start = time.monotonic()
    res = run("dataset", f"--source={fifo}", f"--dest={tmp_path / 'out.zip'}", cwd=tmp_path)
    assert time.monotonic() - start < 60 and res.returncode == 2, res.stderr
    assert str(fifo) in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out.zip").exists()


@pytest.mark.parametrize("seeds", ["", ",", "5-3"])
def test_an_empty_seed_list_is_one_error_line(tmp_path, seeds):
    from click.testing import CliRunner

    from relay_diffusion.cli import main as rdm

    res = CliRunner().invoke(rdm, ["generate", f"--outdir={tmp_path / 'o'}", f"--seeds={seeds}", "--device=cpu"])
    assert res.exit_code == 2 and "--seeds" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()
