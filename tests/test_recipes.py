"""The helpers of recipes/compare.sh: the held-out split, the training-budget sums and the held-out figure of the
report."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))

import compare_report  # noqa: E402
import holdout  # noqa: E402


def emoji_names() -> list[str]:
    """Groups of variants sharing their first code point, like the emoji files."""
    names = []
    for i in range(300):
        base = f"1f{i:03x}"
        names.append(f"{base}.png")
        names += [f"{base}-1f3f{t}.png" for t in "bcdef"[: i % 4]]
    return names


def run_split(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RECIPES / "holdout.py"), str(tmp_path / "src"), str(tmp_path / "train"),
                           str(tmp_path / "held"), *extra], capture_output=True, text=True)


def test_split_holds_out_whole_groups(tmp_path):
    (tmp_path / "src").mkdir()
    names = emoji_names()
    for n in names:
        (tmp_path / "src" / n).write_bytes(n.encode())
    result = run_split(tmp_path)
    assert result.returncode == 0, result.stderr
    train = {p.name for p in (tmp_path / "train").iterdir()}
    held = {p.name for p in (tmp_path / "held").iterdir()}
    assert train | held == set(names) and not train & held
    group = lambda n: n.split(".")[0].split("-")[0]  # noqa: E731
    assert not {group(n) for n in train} & {group(n) for n in held}     # no emoji on both sides
    share = len({group(n) for n in held}) / 300
    assert 0.12 < share < 0.28                                          # about 20% of the groups
    assert (tmp_path / "held" / sorted(held)[0]).read_bytes() == sorted(held)[0].encode()
    # the split is a function of the names only, and a non-empty destination is refused
    assert all(holdout.held_out(n, 20) for n in held) and not any(holdout.held_out(n, 20) for n in train)
    again = run_split(tmp_path)
    assert again.returncode == 1 and "is not empty" in again.stderr


def test_budget_sums_the_cpu_seconds_of_each_tick_once(tmp_path):
    run = tmp_path / "runs" / "relay2" / "00000-x"
    run.mkdir(parents=True)
    ticks = [dict(tick=0, step=1, kimg=0.032, sec_per_tick=2.0, cpu_sec_per_tick=1.5),
             dict(tick=1, step=60, kimg=2.0, sec_per_tick=100.0, cpu_sec_per_tick=90.0),
             dict(tick=1, step=60, kimg=2.0, sec_per_tick=110.0, cpu_sec_per_tick=95.0),  # rewritten after a resume
             dict(tick=2, step=120, kimg=4.0, sec_per_tick=100.0),                        # older record: wall time
             # a resumed run numbers its ticks from 0 again: its records count as well
             dict(tick=0, step=121, kimg=4.032, sec_per_tick=1.0, cpu_sec_per_tick=0.5),
             dict(tick=1, step=180, kimg=6.0, sec_per_tick=80.0, cpu_sec_per_tick=70.0)]
    (run / "stats.jsonl").write_text("".join(json.dumps(t) + "\n" for t in ticks))
    (run / "log.txt").write_text("Done: 6.000 kimg in 180 steps\n")
    b = compare_report.run_budget(tmp_path / "runs" / "relay2")
    assert b["cpu_sec"] == 1.5 + 95.0 + 100.0 + 0.5 + 70.0 and b["wall_sec"] == 2.0 + 110.0 + 100.0 + 1.0 + 80.0
    assert b["kimg"] == 6.0 and b["steps"] == 180 and b["done"]
    assert compare_report.run_budget(tmp_path / "runs" / "missing") == {}


def test_fid_sampling_error_from_halves_and_bootstrap(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", feat=rng.normal(size=(400, 8)).astype(np.float32))
    np.savez(tmp_path / "r.npz", feat=rng.normal(0.5, 1.0, size=(300, 8)).astype(np.float32))
    err = compare_report.fid_sampling_error(tmp_path / "s.npz", tmp_path / "r.npz", boots=5)
    assert err["size"] == 400 and err["half_size"] == 200 and err["boot_n"] == 5
    # the means differ by 0.5 in 8 dimensions: FID about 8 x 0.25 = 2, each half near it, the spread small
    assert all(1.0 < h < 3.5 for h in err["halves"]) and 0 < err["boot_sd"] < 1.0
    assert compare_report.fid_sampling_error(tmp_path / "missing.npz", tmp_path / "r.npz") == {}


def test_the_heldout_figure_is_labelled(tmp_path):
    """Rows of held-out emoji, a column per 64x64 stage between the input and the real image, each column named,
    a title above and the rows named along the left."""
    e = tmp_path / "eval"
    truth = [np.full((64, 64, 3), 40 * i, np.uint8) for i in range(3)]
    for i in range(3):
        (e / "heldout16").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (200, 0, 0)).save(e / "heldout16" / f"{i:06d}.png")
        for arm in compare_report.SR_ARMS:
            (e / f"sr-heldout-{arm}").mkdir(exist_ok=True)
            Image.new("RGB", (64, 64), (0, 200, 0)).save(e / f"sr-heldout-{arm}" / f"{i:06d}.png")
    fig = np.asarray(compare_report.heldout_figure(tmp_path, truth, count=3))
    columns = len(compare_report.SR_ARMS) + 2
    assert columns == len(compare_report.HELDOUT_COLUMNS)
    body_h, body_w = 3 * 64 * 2, columns * 64 * 2  # shown at 2x
    assert fig.shape[0] > body_h + 40 and fig.shape[1] > body_w + 10
    top, left = fig.shape[0] - 6 - body_h, fig.shape[1] - 6 - body_w
    assert (fig[top:top + 128, left:left + 128] == (200, 0, 0)).all()  # the first cell: the upsampled input
    assert (fig[:top] < 128).any() and (fig[top:, :left] < 128).any()  # text above (title, columns) and at the left


FAKE_RDM = """#!/usr/bin/env bash
# Stands in for rdm: logs its command, writes what the real one would, fails for the outdir in $FAIL_ON;
# sampling also logs its start and end (to $CALLS.spans), to show how many ran at once.
set -e
echo "$*" >> "$CALLS"
case "$1 $2" in
generate*) out=$3; [ "$out" != "$FAIL_ON" ] || exit 7; echo "begin $out" >> "$CALLS.spans"; mkdir -p "$out"
           sleep 0.5; touch "$out/000000.png"; echo "end $out" >> "$CALLS.spans" ;;
"evaluate activations") touch "${@: -3:1}" ;;
"evaluate calc") echo '{"metrics": {}}' > "${@: -1}" ;;
esac
"""


def fake_work(tmp_path: Path) -> None:
    """Runs with a snapshot each, three held-out 16x16 images, and the fake rdm."""
    work = tmp_path / "work"
    for arm in ("relay1", "relay2", "single", "sr", "noblock"):
        run = work / "runs" / arm / "00000-x"
        run.mkdir(parents=True)
        (run / "network-snapshot-000010.safetensors").touch()
    with zipfile.ZipFile(work / "heldout-16x16.zip", "w") as z:
        for i in range(3):
            path = tmp_path / f"{i}.png"
            Image.new("RGB", (16, 16), (i, 0, 0)).save(path)
            z.write(path, f"{i:05d}.png")
    fake = tmp_path / "rdm"
    fake.write_text(FAKE_RDM)
    fake.chmod(0o755)


def run_evaluate(tmp_path: Path, fail_on: str = "") -> tuple[subprocess.CompletedProcess, list[str]]:
    """``JOBS=2 compare.sh evaluate`` with the fake rdm; the commands it ran this time."""
    log = tmp_path / "calls"
    before = log.read_text().splitlines() if log.is_file() else []
    env = {"PATH": "/usr/bin:/bin", "WORK": str(tmp_path / "work"), "RDM": str(tmp_path / "rdm"), "PY": sys.executable,
           "JOBS": "2", "CALLS": str(log), "FAIL_ON": fail_on and str(tmp_path / "work" / "eval" / fail_on)}
    result = subprocess.run(["bash", str(RECIPES / "compare.sh"), "evaluate"], env=env, capture_output=True,
                            text=True)
    return result, (log.read_text().splitlines() if log.is_file() else [])[len(before):]


def test_evaluate_runs_every_command_two_at_a_time(tmp_path):
    fake_work(tmp_path)
    result, calls = run_evaluate(tmp_path)
    assert result.returncode == 0, result.stderr
    kinds = [c.split()[0] if c.startswith("generate") else c.split()[1] for c in calls]
    gens = [c for c in calls if c.startswith("generate")]
    assert len(gens) == 5 + 3                                   # five sample sets, three stages on held-out inputs
    assert sum("--sampler_stages second --indir" in c and "--seeds 0-2" in c for c in gens) == 3
    assert kinds.count("activations") == 2 + 8 + 1 and kinds.count("calc") == 8 * 2 + 1
    # every sampling command before any activation, every activation before any metric
    assert kinds == sorted(kinds, key=["generate", "activations", "calc"].index)
    # sampling ran side by side, never more than JOBS=2 at once
    spans = (tmp_path / "calls.spans").read_text().splitlines()
    open_at = np.cumsum([1 if line.startswith("begin") else -1 for line in spans])
    assert open_at.max() == 2 and open_at[-1] == 0
    # run again: the activations and metrics that are there are kept (sampling resumes inside rdm generate)
    again, calls = run_evaluate(tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(calls) == 8 and all(c.startswith("generate") for c in calls)


def test_evaluate_stops_on_a_failed_command_before_any_metric(tmp_path):
    fake_work(tmp_path)
    result, calls = run_evaluate(tmp_path, fail_on="sr")
    assert result.returncode != 0
    assert any(c.startswith("generate --outdir") and "/eval/sr " in c for c in calls)
    assert not any(c.startswith("evaluate") for c in calls)


def test_a_bad_jobs_count_is_refused_before_any_folder(tmp_path):
    for jobs in ("0", "two", "-1"):
        env = {"PATH": "/usr/bin:/bin", "WORK": str(tmp_path / "work"), "JOBS": jobs}
        result = subprocess.run(["bash", str(RECIPES / "compare.sh"), "evaluate"], env=env, capture_output=True,
                                text=True)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            f"JOBS must be a positive whole number, got: {jobs}"]
        assert not (tmp_path / "work").exists()
