"""Several processes and their faults: which device each process takes, a bad or stale launch environment,
an error, a kill or a stop in one process ending all of them quickly with one error line, and the run-folder
lock on filesystems without ``lockf``.

The multi-process tests start the processes themselves (env:// rendezvous on a free port) rather than through
``torchrun``, whose agent stops the other processes of a failed one on its own: here only the project's own
handling can end them.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from relay_diffusion.training.rundir import OWNER_FILE, RunFolderBusy, RunFolderLock
from relay_diffusion.utils import distributed
from relay_diffusion.utils.distributed import LaunchError, launch_env, pick_device

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
               "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID", "GROUP_RANK")
FAST = ["--num_steps_first=3", "--num_steps_second=3", "--device=cpu"]


# --- which device -----------------------------------------------------------------------------------
@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_bare_cuda_takes_the_local_rank(four_gpus):
    assert pick_device("cuda", 3, world_size=8) == torch.device("cuda", 3)
    assert pick_device(None, 2, world_size=8) == torch.device("cuda", 2)
    assert pick_device("auto", 1, world_size=2) == torch.device("cuda", 1)
    assert pick_device("cuda:2", 0, world_size=1) == torch.device("cuda", 2)  # one process: as given
    assert pick_device("cpu", 3, world_size=8) == torch.device("cpu")


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_an_explicit_index_under_several_processes_is_refused(four_gpus, device):
    with pytest.raises(ValueError, match="--device cuda") as info:
        pick_device(device, 1, world_size=2)
    assert "\n" not in str(info.value)


def test_more_processes_than_gpus_is_refused(four_gpus):
    with pytest.raises(ValueError, match="LOCAL_RANK=4.*4 visible CUDA"):
        pick_device("cuda", 4, world_size=8)


def test_a_process_that_sees_one_gpu_of_its_own_uses_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES set per process
    assert pick_device("cuda", 3, world_size=4) == torch.device("cuda", 0)


def test_init_puts_each_process_on_its_gpu(four_gpus, monkeypatch):
    # Rank 5 of 8 on the second machine (local rank 1); no rendezvous: the process group exists already.
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 5)
    ctx = distributed.init("cuda")
    assert ctx.device == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (5, 8, 1)
    with pytest.raises(ValueError, match="--device cuda"):
        distributed.init("cuda:0")


# --- the launch environment --------------------------------------------------------------------------
@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc'"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, "MASTER_PORT is not"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK=2"),
    ({"WORLD_SIZE": "2", "RANK": "x", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK='x'"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "MASTER_PORT"),
])
def test_bad_launch_environment_is_one_line(clean_env, env, needle):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(LaunchError) as info:
        launch_env()
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_one_process_ignores_a_stale_rank(clean_env):
    clean_env.setenv("RANK", "3")
    assert launch_env() == (1, 0, 0)
    clean_env.setenv("WORLD_SIZE", "1")
    assert launch_env() == (1, 0, 0)


def _env(**launch: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", **launch)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Error:")]


@pytest.mark.parametrize("launch, needle", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc'"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR"),
    ({"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT"),
    # A complete environment whose other processes never come: the rendezvous gives up after a short wait.
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "free"},
     "did not complete"),
    pytest.param({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": "free"}, "did not complete", marks=pytest.mark.slow),
])
def test_stale_launch_environment_fails_fast(tmp_path, launch, needle):
    if launch.get("MASTER_PORT") == "free":
        launch = {**launch, "MASTER_PORT": str(_free_port())}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "relay_diffusion", "generate", f"--outdir={tmp_path / 'out'}",
                           "--seeds=0-1", "--timeout=0.05", *FAST], env=_env(**launch), capture_output=True,
                          text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert elapsed < 20, elapsed
    assert not (tmp_path / "out").exists()


def test_stale_world_size_in_train_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "relay_diffusion", "train", f"--outdir={tmp_path}", "--data=x",
                           "--dry-run"], env=_env(WORLD_SIZE="abc"), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(_error_lines(proc.stderr)) == 1 and "WORLD_SIZE='abc'" in proc.stderr, proc.stderr


# --- faults in one of several processes ------------------------------------------------------------
# Runs ``rdm`` in one process of a group; PATCH (Python source, may be empty) runs first on the rank given.
LAUNCHER = """
import os, sys
rank, patch_rank, patch = int(os.environ["RANK"]), int(sys.argv[1]), sys.argv[2]
if rank == patch_rank:
    exec(patch)
from relay_diffusion.cli import main
main(sys.argv[3:], prog_name="rdm")
"""
NON_FINITE = """
from relay_diffusion.generation.pipeline import RelayPipeline
_output = RelayPipeline.output
def _nan(self, *args, **kwargs):
    out = _output(self, *args, **kwargs)
    out.samples[0] = float("nan")
    return out
RelayPipeline.output = _nan
"""
STEP_FAILS = """
from relay_diffusion.training.loop import Trainer
_step = Trainer._train_step
def _fail(self):
    if self.step == 2:
        raise ValueError("injected: image 7 of the dataset is damaged")
    return _step(self)
Trainer._train_step = _fail
"""


def launch(args: list[str], world: int = 2, patch_rank: int = -1, patch: str = "") -> list[subprocess.Popen]:
    port = str(_free_port())
    return [subprocess.Popen([sys.executable, "-c", LAUNCHER, str(patch_rank), patch, *args],
                             env=_env(WORLD_SIZE=str(world), RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(world)]


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, stdout + stderr))
    return out


def _all_failed(procs) -> tuple[list[str], str]:
    """Wait for ``procs``; every one must have failed without a traceback. Their error lines and output."""
    results = finish(procs)
    text = "\n".join(o for _, o in results)
    assert all(rc != 0 for rc, _ in results), text
    assert "Traceback" not in text, text
    return _error_lines(text), text


def test_non_finite_samples_in_one_process_end_all_of_them(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    lines, text = _all_failed(launch(["generate", f"--outdir={out}", "--seeds=0-11", "--batch=1", "--timeout=5",
                                      *FAST], patch_rank=1, patch=NON_FINITE))
    elapsed = time.monotonic() - start
    assert len(lines) == 1 and "1 of 1 samples are not finite" in lines[0] and "seeds 1;" in lines[0], text
    assert elapsed < 60, elapsed
    # Rank 0 stopped at the end of the batch where rank 1 failed (seed 0), not after its whole share.
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png"]


def test_an_error_in_one_training_process_ends_all_of_them(tmp_path):
    from test_training import TINY_ARGS, write_dataset

    data = write_dataset(tmp_path / "data.zip", 16, 8)
    start = time.monotonic()
    procs = launch(["train", f"--outdir={tmp_path / 'runs'}", f"--data={data}", "--batch=4", "--batch-gpu=2",
                    "--duration=0.0001", "--tick=1", "--grid=0", "--workers=0", "--timeout=5", "--device=cpu",
                    *TINY_ARGS], patch_rank=1, patch=STEP_FAILS)
    lines, text = _all_failed(procs)
    elapsed = time.monotonic() - start
    assert lines == ["Error: injected: image 7 of the dataset is damaged"], text
    assert elapsed < 60, elapsed


def _generate_then(tmp_path: Path, timeout_min: float, sig: int) -> tuple[float, list[tuple[int, str]]]:
    """Start a two-process generation, send ``sig`` to rank 1 once rank 0 samples; seconds until rank 0 ends."""
    out = tmp_path / "out"
    procs = launch(["generate", f"--outdir={out}", "--seeds=0-199", "--batch=1", f"--timeout={timeout_min}", *FAST])
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.png")) and time.monotonic() < deadline:  # rank 0 or 1 wrote an image
            time.sleep(0.2)
        assert list(out.glob("*.png")), "no image was written"
        procs[1].send_signal(sig)
        start = time.monotonic()
        stdout, stderr = procs[0].communicate(timeout=120)
        return time.monotonic() - start, [(procs[0].returncode, stdout + stderr)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def test_a_killed_process_ends_the_others(tmp_path):
    elapsed, [(rc, text)] = _generate_then(tmp_path, 0.25, signal.SIGKILL)
    assert rc != 0 and "Traceback" not in text, text
    lines = _error_lines(text)
    assert len(lines) == 1 and "lost contact with another process" in lines[0], text
    assert elapsed < 30, elapsed


@pytest.mark.slow
def test_a_stopped_process_ends_the_others_after_the_timeout(tmp_path):
    elapsed, [(rc, text)] = _generate_then(tmp_path, 0.2, signal.SIGSTOP)  # 12 s
    assert rc != 0 and "Traceback" not in text, text
    lines = _error_lines(text)
    assert len(lines) == 1 and "lost contact with another process" in lines[0] and "0.2 min" in lines[0], text
    assert 5 < elapsed < 40, elapsed


# --- run-folder lock without lockf ------------------------------------------------------------------
@pytest.fixture
def no_lockf(monkeypatch):
    import fcntl

    def refuse(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", refuse)


def test_lock_falls_back_to_an_owner_file(tmp_path, no_lockf):
    with RunFolderLock(tmp_path):
        owner = (tmp_path / OWNER_FILE).read_text().strip()
        assert owner == f"{os.getpid()}@{socket.gethostname()}"
        with pytest.raises(RunFolderBusy, match=f"{tmp_path} is in use by process {os.getpid()}"):
            RunFolderLock(tmp_path).__enter__()
    assert not (tmp_path / OWNER_FILE).exists()
    with RunFolderLock(tmp_path):  # free again
        pass


def test_lock_takes_over_a_dead_owner_and_refuses_another_hosts(tmp_path, no_lockf):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / OWNER_FILE).write_text(f"{dead.pid}@{socket.gethostname()}\n")
    with RunFolderLock(tmp_path):
        assert (tmp_path / OWNER_FILE).read_text().startswith(f"{os.getpid()}@")
    (tmp_path / OWNER_FILE).write_text("123@another-host\n")
    with pytest.raises(RunFolderBusy) as info:
        RunFolderLock(tmp_path).__enter__()
    message = str(info.value)
    assert str(tmp_path) in message and "another-host" in message and OWNER_FILE in message and "\n" not in message
    assert (tmp_path / OWNER_FILE).read_text() == "123@another-host\n"  # another run's file is left alone


def test_lock_where_nothing_works_explains(tmp_path, no_lockf, monkeypatch):
    real_open = os.open

    def no_create(path, flags, *args):
        if flags & os.O_EXCL:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_create)
    with pytest.raises(RunFolderBusy, match=f"cannot lock {tmp_path}: .*neither lockf nor"):
        RunFolderLock(tmp_path).__enter__()


def test_a_held_lockf_lock_is_still_busy(tmp_path, monkeypatch):
    import fcntl

    def held(*args):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "lockf", held)
    with pytest.raises(RunFolderBusy, match="in use by another training run"):
        RunFolderLock(tmp_path).__enter__()
    assert not (tmp_path / OWNER_FILE).exists()
