"""Training on bad input and faults: run folders are never reused by accident, damaged states are skipped,
stale temporary files are removed, a failed fresh run leaves no stub folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from relay_diffusion.cli.train import train as train_cli
from test_training import TINY_ARGS, write_dataset


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "plain-8x8.zip", 16, 8)


def train(outdir, data, *extra):
    args = ["--outdir", str(outdir), "--data", str(data), "--batch=8", "--lr=2e-3", "--seed=1", "--tick=0.008",
            "--snap=1000", "--dump=1", "--grid=0", "--workers=0", "--duration=0.000024", *TINY_ARGS, *extra]
    return CliRunner().invoke(train_cli, args)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def clean_error(result, *needles):
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output + repr(result.exception)
    for needle in needles:
        assert needle in result.output, result.output


def test_nosubdir_never_reuses_a_run_folder(tmp_path, data):
    out = tmp_path / "run"
    assert train(out, data, "--nosubdir").exit_code == 0
    before = files(out)
    clean_error(train(out, data, "--nosubdir"), "--nosubdir", "already holds a training run", "--resume")
    assert files(out) == before


def test_resume_skips_a_damaged_latest_state_and_cleans_temporaries(tmp_path, data):
    out = tmp_path / "run"
    assert train(out, data, "--nosubdir").exit_code == 0
    intact = sorted(out.glob("training-state-*.pt"))[-1]
    latest = out / "training-state-000001.pt"  # a newer state, truncated as a full disk might leave it
    latest.write_bytes(intact.read_bytes()[:1000])
    stale = out / ".training-state-000099.pt.abc123.tmp"
    stale.write_bytes(b"x" * 100)
    result = train(out, data, "--nosubdir", "--resume", str(out), "--duration=0.000032")
    assert result.exit_code == 0, result.output
    log = (out / "log.txt").read_text()
    assert f"skipped {latest}" in result.output or f"skipped {latest}" in log
    assert "Removed 1 temporary file" in log and not stale.exists()
    assert f"from {intact.name}" in log or f"from {intact.name}" in result.output


def test_resume_with_only_damaged_states_is_one_error(tmp_path, data):
    out = tmp_path / "run"
    assert train(out, data, "--nosubdir").exit_code == 0
    for p in out.glob("training-state-*.pt"):
        p.write_bytes(b"")
    before = files(out)
    clean_error(train(out, data, "--nosubdir", "--resume", str(out)), "--resume", "no intact training-state")
    assert files(out) == before
    clean_error(train(out, data, "--resume", str(sorted(out.glob("training-state-*.pt"))[0])), "--resume",
                "not a readable training state")


def test_nothing_to_do_leaves_the_options_file_alone(tmp_path, data):
    out = tmp_path / "run"
    assert train(out, data, "--nosubdir").exit_code == 0
    before = (out / "training_options.json").read_bytes()
    result = train(out, data, "--nosubdir", "--resume", str(out))
    assert result.exit_code == 0 and "Nothing to do" in (out / "log.txt").read_text()
    assert (out / "training_options.json").read_bytes() == before


def test_a_run_folder_in_use_is_refused(tmp_path, data):
    out = tmp_path / "run"
    assert train(out, data, "--nosubdir").exit_code == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    try:
        line = holder.stdout.readline().strip()
        if line != "locked":
            holder.wait(timeout=60)
        assert line == "locked", holder.stderr.read()
        clean_error(train(out, data, "--nosubdir", "--resume", str(out), "--duration=0.000032"), "in use")
    finally:
        holder.kill()
        holder.wait()
    assert train(out, data, "--nosubdir", "--resume", str(out), "--duration=0.000032").exit_code == 0


HOLD_LOCK = """
import sys, time
from pathlib import Path
from relay_diffusion.training.rundir import RunFolderLock
with RunFolderLock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_damaged_dataset_leaves_no_stub_run_folder(tmp_path, data):
    broken = tmp_path / "broken.zip"
    raw = bytearray(data.read_bytes())
    with zipfile.ZipFile(data) as z:
        info = z.infolist()[3]
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + 40:start + 60] = b"\x00" * 20  # damage one image's compressed bytes (bad CRC)
    broken.write_bytes(bytes(raw))
    result = train(tmp_path / "runs", broken)
    clean_error(result, "broken.zip")
    assert not (tmp_path / "runs").exists() or not any(p.is_dir() for p in (tmp_path / "runs").iterdir())


def test_resume_refuses_contradicting_options_and_continues_with_the_saved_ones(tmp_path, data):
    out = tmp_path / "run"
    assert train(out, data, "--nosubdir", "--precond=blur", "--up-scale=2").exit_code == 0
    before = files(out)
    for args, needle in ((["--batch=16"], "--batch: 16 given, the run has 8"),
                         (["--precond=edm"], "--precond: \"edm\" given, the run has \"blur\""),
                         (["--lr=1e-4"], "--lr"), (["--seed=2"], "--seed"), (["--cbase=32"], "--cbase"),
                         (["--blur-sigma-max=2"], "--blur-sigma-max")):
        result = train(out, data, "--nosubdir", "--resume", str(out), "--precond=blur", "--up-scale=2", *args)
        clean_error(result, "--resume", "contradict", needle)
        assert files(out) == before
    # nothing but --resume (and where to write): the run's own options, stage 2 included
    result = CliRunner().invoke(train_cli, ["--outdir", str(out), "--resume", str(out), "--duration=0.000032"])
    assert result.exit_code == 0, result.output
    log = (out / "log.txt").read_text()
    assert "BlurLoss" in log and "Resumed from" in log


def test_disk_full_during_a_state_write_is_one_line_and_keeps_the_previous_state(tmp_path, data, monkeypatch):
    import errno

    out = tmp_path / "run"
    assert train(out, data, "--nosubdir").exit_code == 0
    before = files(out)

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("relay_diffusion.training.loop.save_state", full)
    result = train(out, data, "--nosubdir", "--resume", str(out), "--duration=0.000032")
    clean_error(result, "No space left on device")
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error:") and sum(line.startswith("Error") for line in lines) == 1
    for name in before:
        if name.startswith("training-state-"):
            assert (out / name).read_bytes() == before[name]


@pytest.mark.parametrize("nosubdir", [[], ["--nosubdir"]])
def test_an_outdir_inside_the_data_folder_is_refused(tmp_path, data, nosubdir):
    import zipfile

    folder = tmp_path / "images"
    folder.mkdir()
    with zipfile.ZipFile(data) as zf:
        zf.extractall(folder)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    clean_error(train(folder / "runs", folder, *nosubdir), "--outdir", "inside the data folder")
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before


def test_a_transfer_file_with_a_damaged_header_is_one_line(tmp_path, data):
    bad = tmp_path / "net.safetensors"
    bad.write_bytes(b"\xff" * 8 + b"{not json")
    clean_error(train(tmp_path / "runs", data, f"--transfer={bad}"), "--transfer", "net.safetensors",
                "not a readable safetensors file")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_torch_s_own_write_error_on_a_full_disk_is_an_os_error(tmp_path, monkeypatch):
    """torch.save to a full disk raises a RuntimeError from its zip writer: here the real one, from /dev/full."""
    import relay_diffusion.training.state as state

    real_save = torch.save
    monkeypatch.setattr(state.torch, "save", lambda obj, f: real_save(obj, "/dev/full"))
    net = torch.nn.Linear(64, 64)
    with pytest.raises(OSError, match="cannot write the training state") as info:
        state.save_state(tmp_path / "s.pt", net, net, torch.optim.SGD(net.parameters(), lr=1), 1, 8, 0, {})
    assert info.value.filename == str(tmp_path / "s.pt") and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_network_that_cannot_be_built_is_one_line_naming_it(tmp_path, data, monkeypatch):
    from relay_diffusion.training.plan import NetworkSpec

    def refuse(self):
        raise ValueError("channel_mult and attention resolutions do not fit")

    monkeypatch.setattr(NetworkSpec, "build", refuse)
    clean_error(train(tmp_path / "runs", data), "--arch", "cannot build the EDMPrecond network",
                "do not fit")


def test_fp16_on_the_cpu_is_named_and_noted_as_the_fp32_it_computes_in(tmp_path, data):
    result = train(tmp_path / "runs", data, "--fp16=1", "--device=cpu")
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.endswith("-fp32") and "computes in fp32 on the CPU" in result.output
    bf16 = train(tmp_path / "runs2", data, "--precision=bf16", "--device=cpu")
    assert bf16.exit_code == 0, bf16.output
    assert next((tmp_path / "runs2").iterdir()).name.endswith("-bf16") and "computes in" not in bf16.output


def test_a_filesystem_without_lockf_locks_with_an_owner_file(tmp_path, data, monkeypatch):
    import errno
    import fcntl
    import socket

    from relay_diffusion.training.rundir import OWNER_FILE

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    out = tmp_path / "run"
    assert train(out, data, "--nosubdir").exit_code == 0
    assert not (out / OWNER_FILE).exists()  # released at the end
    (out / OWNER_FILE).write_text(f"4242@other-{socket.gethostname()}\n")
    result = train(out, data, "--nosubdir", "--resume", str(out), "--duration=0.000032")
    clean_error(result, f"{out} is in use by process 4242 on other-", OWNER_FILE)
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output
    (out / OWNER_FILE).unlink()
    assert train(out, data, "--nosubdir", "--resume", str(out), "--duration=0.000032").exit_code == 0


def test_a_damaged_image_read_in_a_loader_worker_is_named(tmp_path, data):
    folder = tmp_path / "images"
    with zipfile.ZipFile(data) as zf:
        zf.extractall(folder)
        victim = sorted(n for n in zf.namelist() if n.endswith(".png"))[5]
    (folder / victim).write_bytes(b"\x89PNG not an image")
    result = train(tmp_path / "runs", folder, "--workers=1")
    clean_error(result, victim, "cannot decode")
    assert "DataLoader worker" not in result.output


def test_a_path_that_is_not_utf8_is_named_before_anything_is_written(tmp_path, data):
    out = os.fsdecode(bytes(tmp_path) + b"/runs\xff")
    clean_error(train(out, data), "--outdir", "not valid UTF-8")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("minutes, states", [("0", 1), ("0.000001", 3)])
def test_checkpoint_minutes_saves_a_state_at_least_that_often(tmp_path, data, monkeypatch, minutes, states):
    from relay_diffusion.training.loop import Trainer

    saved, real = [], Trainer._save_state

    def count(self):
        saved.append(self.step)
        return real(self)

    monkeypatch.setattr(Trainer, "_save_state", count)
    result = train(tmp_path / "run", data, "--tick=1000", "--dump=1000", f"--checkpoint-minutes={minutes}")
    assert result.exit_code == 0, result.output
    assert len(saved) == states, saved  # 3 steps of 8 images: with 0.00006 s every step is due; with 0 only the end
    assert saved[-1] == 3


def test_several_processes_count_checkpoint_minutes_in_steps_agreed_at_the_tick():
    """No collective inside the steps: the first process's pace over a tick sets the step budget."""
    import types

    from relay_diffusion.training.loop import Trainer

    t = object.__new__(Trainer)
    t.cfg, t.ctx, t._checkpoint_steps = types.SimpleNamespace(checkpoint_minutes=1.0), \
        types.SimpleNamespace(distributed=True), None
    t.step = 100
    assert not t._checkpoint_due(saved_at=0.0, saved_step=0)  # no tick measured yet
    t._agree_checkpoint_steps(seconds=30.0, steps=10)  # 3 s a step: 20 steps a minute
    assert t._checkpoint_steps == 20
    t.step = 24
    assert not t._checkpoint_due(saved_at=0.0, saved_step=5)
    t.step = 25
    assert t._checkpoint_due(saved_at=0.0, saved_step=5)
