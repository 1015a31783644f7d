"""The names of a run's snapshots, grids and states: one per image count (ticks under 1 kimg never overwrite each
other), sorting chronologically as plain strings (``ls | sort | tail -n 1`` is the latest), and run folders of
older versions (whole-kimg names) still resumed and found."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from relay_diffusion.cli.train import train as train_cli
from relay_diffusion.training.rundir import RUN_FILES, kimg_label, label_order, run_files
from relay_diffusion.training.state import latest_state, load_state, states
from test_training import TINY_ARGS, write_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "plain-8x8.zip", 16, 8)


def train(outdir: Path, data: Path, *extra: str):
    """A tiny run of 8-image steps, one tick per step (0.008 kimg), a snapshot, grid and state at every tick."""
    args = ["--outdir", str(outdir), "--data", str(data), "--batch=8", "--lr=2e-3", "--seed=1", "--tick=0.008",
            "--snap=1", "--dump=1", "--grid=4", "--workers=0", "--nosubdir", *TINY_ARGS, *extra]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    return result


def shell_latest(folder: Path, pattern: str, locale: str | None = None) -> str:
    """The recipes' choice of the latest file: ``ls <pattern> | sort | tail -n 1``."""
    env = dict(os.environ, **({"LC_ALL": locale} if locale else {}))
    out = subprocess.run(f"ls {pattern} | sort | tail -n 1", shell=True, cwd=folder, env=env, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def test_kimg_labels_are_unique_and_sort_as_strings():
    assert kimg_label(0) == "000000.000" and kimg_label(8) == "000000.008" and kimg_label(200512) == "000200.512"
    assert kimg_label(1_234_567) == "001234.567"
    nimgs = [8, 16, 992, 1000, 1008, 9_999, 10_000, 200_512, 999_999_999]
    labels = [kimg_label(n) for n in nimgs]
    assert len(set(labels)) == len(labels) and sorted(labels) == labels
    assert [label_order(x) for x in labels] == [(n, 1) for n in nimgs]
    for name in (f"network-snapshot-{labels[0]}.safetensors", f"training-state-{labels[-1]}.pt",
                 "network-snapshot-000200.safetensors", "training-state-000200.pt"):  # and the names of older runs
        assert RUN_FILES.match(name), name
    # an older run's whole-kimg state comes before every three-decimal one of its kimg (written after it)
    assert label_order("000200") < label_order("000200.000") < label_order("000200.512") < label_order("000201")


def test_ticks_under_one_kimg_keep_every_snapshot_and_the_latest_sorts_last(tmp_path, data):
    out = tmp_path / "run"
    train(out, data, "--duration=0.000024")  # 3 steps: ticks at 0.008, 0.016 and 0.024 kimg
    labels = ["000000.008", "000000.016", "000000.024"]
    names = {p.name for p in out.iterdir()}
    for label in labels:  # a snapshot and grid at every tick, a state at every tick after the first
        for name in (f"network-snapshot-{label}.safetensors", f"network-snapshot-{label}.json", f"samples-{label}.png",
                     *([f"training-state-{label}.pt"] if label != labels[0] else [])):
            assert name in names, (name, sorted(names))
    assert not [n for n in names if n.startswith(("network-snapshot-000000.s", "training-state-000000.pt"))]
    assert [p.name for p in states(out)] == [f"training-state-{x}.pt" for x in reversed(labels[1:])]
    for locale in (None, "C"):
        assert shell_latest(out, "network-snapshot-*.safetensors", locale) == "network-snapshot-000000.024.safetensors"
        assert shell_latest(out, "samples-*.png", locale) == "samples-000000.024.png"
    assert run_files(out)[-1] == "training_options.json"

    # --resume of the folder continues from the latest state, adding names after the earlier ones
    train(out, data, "--resume", str(out), "--duration=0.00004")
    assert load_state(latest_state(out))["nimg"] == 40
    assert shell_latest(out, "network-snapshot-*.safetensors") == "network-snapshot-000000.040.safetensors"
    assert shell_latest(out, "training-state-*.pt") == "training-state-000000.040.pt"


def test_a_run_folder_with_whole_kimg_names_resumes_and_is_renamed(tmp_path, data):
    """A run of an older version named its files by whole kimg (every tick of this run wrote ``000000``, each
    replacing the previous). Resuming it finds its state; its files get the new names, so that the resumed run's
    files sort after them."""
    out = tmp_path / "run"
    train(out, data, "--duration=0.000024")
    for p in sorted(out.iterdir()):  # make it an older version's folder: the last tick's files, whole-kimg names
        if p.name.startswith(("network-snapshot-", "samples-", "training-state-")):
            if "000000.024" in p.name:
                p.rename(p.with_name(p.name.replace("000000.024", "000000")))
            else:
                p.unlink()
    assert latest_state(out).name == "training-state-000000.pt"
    assert shell_latest(out, "network-snapshot-*.safetensors") == "network-snapshot-000000.safetensors"

    result = train(out, data, "--resume", str(out), "--duration=0.00004")
    assert "Resumed from:" in result.output and "(step 3, kimg 0.024)" in result.output
    assert "Renamed 4 file(s) to three-decimal kimg names" in result.output
    names = sorted(p.name for p in out.iterdir())
    assert "network-snapshot-000000.024.safetensors" in names and "training-state-000000.024.pt" in names
    assert "samples-000000.024.png" in names and "network-snapshot-000000.024.json" in names
    assert not [n for n in names if n in ("network-snapshot-000000.safetensors", "training-state-000000.pt")]
    assert shell_latest(out, "network-snapshot-*.safetensors") == "network-snapshot-000000.040.safetensors"
    assert load_state(latest_state(out))["nimg"] == 40
    options = json.loads((out / "training_options.json").read_text())
    assert options["resume_state"] == str(out / "training-state-000000.024.pt")  # the state under its new name


def test_an_unreadable_whole_kimg_file_keeps_its_name(tmp_path):
    from relay_diffusion.training.state import rename_whole_kimg_files

    (tmp_path / "training-state-000007.pt").write_bytes(b"not a state")
    (tmp_path / "samples-000007.png").write_bytes(b"no snapshot says its kimg")
    assert rename_whole_kimg_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples-000007.png", "training-state-000007.pt"]
