"""benchmarks/bench_cuda.py, the script a short GPU lease runs: its table, its time budget and its errors,
with the per-configuration benchmark replaced by a stand-in (no GPU, no subprocess)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_cuda  # noqa: E402


def row(config: str, kind: str, img_s: float, stage: str | None = None) -> dict:
    r = dict(config=config, kind=kind, batch=64, torch="2.x", img_s=img_s, limit_img_s=img_s * 1.1)
    if stage:
        r["stage"] = stage
    return r


def test_table_is_relative_to_fp32_and_names_what_did_not_run():
    rows = [row("fp32-chunk8", "generate", 10.0), row("fp32", "generate", 20.0),
            row("fp32", "train", 100.0, "stage1"), row("bf16", "train", 150.0, "stage1")]
    text = bench_cuda.table(rows, "cuda", {"fp32-chunk8": "ok", "fp32": "ok", "bf16": "ok",
                                           "bf16-compile": "stopped at the budget"})
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "10 (11), 0.50x" in lines["fp32-chunk8"] and "20 (22), 1.00x" in lines["fp32"]
    assert "150 (165), 1.50x" in lines["bf16"]
    assert "- bf16-compile: stopped at the budget" in text and "- fp32:" not in text
    assert "no configuration finished" in bench_cuda.table([], "cuda", {"fp32": "failed (exit 1)"})


def run_main(monkeypatch, tmp_path, argv, seconds_per_config: float, fail: tuple = ()):
    """main() with a stand-in for each configuration that takes ``seconds_per_config`` of a fake clock."""
    clock = {"now": 0.0}
    started, tables = [], []
    out = tmp_path / "cuda.md"

    def fake_run(name, extra, args, jsonl, timeout=None):
        started.append((name, timeout))
        if out.exists():
            tables.append(out.read_text())
        clock["now"] += seconds_per_config
        if name in fail:
            return "failed (exit 1)"
        with open(jsonl, "a") as f:
            f.write(json.dumps(row(name, "generate", 10.0 + len(started))) + "\n")
        return "ok"

    monkeypatch.setattr(bench_cuda, "run", fake_run)
    monkeypatch.setattr(bench_cuda.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(sys, "argv", ["bench_cuda.py", "--out", str(out), *argv])
    return started, tables, out


def test_budget_stops_starting_configurations_and_the_table_is_rewritten_after_each(monkeypatch, tmp_path, capsys):
    started, tables, out = run_main(monkeypatch, tmp_path, ["--budget", "300"], seconds_per_config=70)
    bench_cuda.main()
    names = [n for n, _ in started]
    # 0 s: fp32-chunk8, 70: fp32, 140: bf16, 210: bf16-compile needs 150 -> not started, nor fp32-compile;
    # nor bf16-compile-cl
    assert names == ["fp32-chunk8", "fp32", "bf16"]
    assert [t for _, t in started] == [300, 230, 160]  # each may run at most what is left
    assert len(tables) == 2 and "fp32-chunk8" in tables[0] and "| fp32 |" in tables[1]
    text = out.read_text()
    assert "- bf16-compile: not started (90 s of the budget left)" in text and "| bf16 |" in text


def test_without_a_budget_every_configuration_runs(monkeypatch, tmp_path, capsys):
    started, _, out = run_main(monkeypatch, tmp_path, [], seconds_per_config=1000)
    bench_cuda.main()
    assert [n for n, t in started] == list(bench_cuda.CONFIGS) and all(t is None for _, t in started)
    assert out.with_suffix(".jsonl").exists()


def test_a_failed_configuration_fails_the_run_after_the_others(monkeypatch, tmp_path, capsys):
    started, _, out = run_main(monkeypatch, tmp_path, ["--configs", "fp32,bf16"], seconds_per_config=1,
                               fail=("fp32",))
    with pytest.raises(SystemExit, match="failed: fp32"):
        bench_cuda.main()
    assert [n for n, _ in started] == ["fp32", "bf16"]
    assert "- fp32: failed (exit 1)" in out.read_text()


def test_unknown_configuration_is_refused_before_anything_runs(monkeypatch, tmp_path):
    started, _, out = run_main(monkeypatch, tmp_path, ["--configs", "fp32,fp64"], seconds_per_config=1)
    with pytest.raises(SystemExit, match="--configs: unknown fp64"):
        bench_cuda.main()
    assert started == [] and not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_session_refuses_a_machine_without_cuda(tmp_path):
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "session"
    res = subprocess.run(["bash", "benchmarks/cuda_session.sh", str(out)], cwd=root, capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=sys.executable), timeout=120)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "no CUDA device" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["env.txt"]  # no test or benchmark ran


def test_adm256_table_names_kernels_and_rows_not_run():
    import bench_adm256

    class Args:
        device, precision, cbase = "cpu", "bf16", 256

    rows = [dict(kind="step", config="bf16", batch=8, img_s=40.0, step_s=0.2, fwd_bwd_s=0.19, vs_fwd_bwd=1.05,
                 peak_gb=30.0, sdpa="flash"),
            dict(kind="layout", batch=16, strided_s=0.6, contiguous_s=0.3, strided_peak_gb=50.0,
                 contiguous_peak_gb=30.0, strided_sdpa="math", contiguous_sdpa="flash", speedup=2.0)]
    text = bench_adm256.table(rows, ["not run (10 s of the budget left): bf16-compile at batch 16"], Args)
    assert "| bf16 | 8 | 40.0 | 200 | 190 | 1.050 | 30.0 | flash |" in text
    assert "strided q/k/v (math) 600 ms" in text and "**2.00x**" in text
    assert "- not run (10 s of the budget left): bf16-compile at batch 16" in text
