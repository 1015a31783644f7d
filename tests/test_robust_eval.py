"""``rdm evaluate`` on bad input and faults (docs/guarantees.md): one error line naming the file, a non-zero exit,
no traceback, nothing written (an existing output byte-identical), never a metric that is not finite, and
``--json`` strict JSON."""

from __future__ import annotations

import errno
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import relay_diffusion.cli.evaluate as cli_evaluate
from relay_diffusion.cli import main
from relay_diffusion.metrics import save_npz


# --- helpers -------------------------------------------------------------------------------------------------
def acts(seed: int, n: int = 40, dims: tuple[int, int] = (16, 12), shift: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"feat": (rng.standard_normal((n, dims[0])) + shift).astype(np.float32),
            "s_feat": rng.standard_normal((n, dims[1])).astype(np.float32)}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)  # np.savez, not save_npz: these files may hold what save_npz refuses
    return path


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def evaluate(*args: str):
    return CliRunner().invoke(main, ["evaluate", *args])


def refused(result, *names: str, figures: bool = False) -> str:
    """The output of a run that failed cleanly, naming each of ``names`` (and printing no figure before the
    error unless ``figures``)."""
    out = result.output
    assert result.exit_code not in (0, None), out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out and len([line for line in out.splitlines() if "Error" in line]) == 1, out
    assert figures or not re.search(r"^(s?FID|KID|Precision|Recall|Inception Score): ", out, re.M), out
    for name in names:
        assert name in out, (name, out)
    return out


def calc(sample: Path, ref: Path, *args: str):
    return evaluate("calc", "-m", "fid", "-m", "sfid", "-m", "pr", "-m", "kid", "--kid-subset-size=5",
                    "--kid-subsets=2", "--pr-k=2", f"--activations_sample={sample}", f"--activations_ref={ref}",
                    "--device=cpu", *args)


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


# --- non-finite activations and statistics -------------------------------------------------------------------
@pytest.mark.parametrize("where", ["feat", "s_feat"])
def test_calc_refuses_non_finite_activations_and_writes_nothing(tmp_path, where):
    bad = acts(0)
    bad[where][3, 2] = np.nan
    sample, ref = write_npz(tmp_path / "nan.npz", bad), write_npz(tmp_path / "ref.npz", acts(1))
    (tmp_path / "m.json").write_text("earlier figures\n")
    before = snapshot(tmp_path)
    refused(calc(sample, ref, f"--json={tmp_path / 'm.json'}"), "nan.npz", where, "non-finite")
    refused(calc(ref, sample), "nan.npz", where)  # in the reference as well
    bad[where][3, 2] = np.inf
    write_npz(sample, bad)
    before["nan.npz"] = sample.read_bytes()
    refused(calc(sample, ref, f"--json={tmp_path / 'm.json'}"), "nan.npz", where)
    assert snapshot(tmp_path) == before


def test_calc_refuses_non_finite_or_malformed_statistics(tmp_path):
    sample = write_npz(tmp_path / "s.npz", acts(0))
    mu, sigma = np.zeros(16), np.eye(16)
    sigma[0, 0] = np.nan
    ref = write_npz(tmp_path / "stats.npz", {"mu": mu, "sigma": sigma})
    before = snapshot(tmp_path)
    refused(evaluate("calc", "-m", "fid", f"--activations_sample={sample}", f"--activations_ref={ref}"),
            "stats.npz", "sigma", "non-finite")
    write_npz(ref, {"mu": mu, "sigma": np.eye(15)})
    refused(evaluate("calc", "-m", "fid", f"--activations_sample={sample}", f"--activations_ref={ref}"),
            "stats.npz", "sigma")
    write_npz(ref, {"mu": mu, "sigma": np.array(["a"] * 256).reshape(16, 16)})
    refused(evaluate("calc", "-m", "fid", f"--activations_sample={sample}", f"--activations_ref={ref}"),
            "stats.npz", "sigma")
    assert snapshot(tmp_path)["s.npz"] == before["s.npz"]


def test_ref_refuses_non_finite_activations_before_writing(tmp_path):
    bad = acts(0)
    bad["feat"][0, 0] = np.nan
    src = write_npz(tmp_path / "nan.npz", bad)
    save_npz(tmp_path / "stats.npz", {"mu": np.zeros(2), "sigma": np.eye(2)})  # an earlier output: kept
    before = snapshot(tmp_path)
    refused(evaluate("ref", f"--data={src}", f"--dest={tmp_path / 'stats.npz'}"), "nan.npz", "non-finite")
    refused(evaluate("ref", f"--data={src}", f"--dest={tmp_path / 'new.npz'}"), "nan.npz")
    assert snapshot(tmp_path) == before


class _StubNet(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n = x.shape[0]
        return {"feat": torch.full((n, 8), self.value) + torch.arange(n)[:, None], "s_feat": torch.ones(n, 6)}


class _StubDetector:
    """Stands in for Inception: activations of [N, 8] and [N, 6], NaN where asked (a broken detector file)."""

    has_head = False
    source = "stub-detector.pt"
    fingerprint = "stub"

    def __init__(self, value: float = 0.0):
        self.net = _StubNet(value)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(images.shape[0], 3, 299, 299)


def _folder(root: Path, n: int = 4, broken: int | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        buf = io.BytesIO()
        PIL.Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(buf, "PNG")
        (root / f"{i}.png").write_bytes(buf.getvalue()[:30] if i == broken else buf.getvalue())
    return root


def _stub_file(tmp_path: Path) -> str:
    (tmp_path / "stub.pt").write_bytes(b"stands for the weights the stub detector replaces")
    return f"--detector={tmp_path / 'stub.pt'}"


@pytest.mark.parametrize("command", ["activations", "ref"])
def test_non_finite_activations_of_a_detector_are_an_error_before_writing(tmp_path, monkeypatch, command):
    monkeypatch.setattr(cli_evaluate, "load_detector", lambda *a, **k: _StubDetector(float("nan")))
    data, stub = _folder(tmp_path / "imgs"), _stub_file(tmp_path)
    before = snapshot(tmp_path)
    args = (f"--data={data}", f"--dest={tmp_path / 'out.npz'}", "--workers=0", "--device=cpu", stub)
    refused(evaluate(command, *args), "imgs", "non-finite")
    assert snapshot(tmp_path) == before
    monkeypatch.setattr(cli_evaluate, "load_detector", lambda *a, **k: _StubDetector(1.0))
    result = evaluate(command, *args)
    assert result.exit_code == 0, result.output  # the same command with a working detector writes the file


def test_unreadable_image_in_a_loader_worker_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(cli_evaluate, "load_detector", lambda *a, **k: _StubDetector())
    data = _folder(tmp_path / "imgs", n=3, broken=2)
    out = refused(evaluate("activations", f"--data={data}", f"--dest={tmp_path / 'a.npz'}", "--workers=1",
                           "--batch=1", "--device=cpu", _stub_file(tmp_path)), "2.png")
    assert "Original Traceback" not in out and "worker" not in out
    assert not (tmp_path / "a.npz").exists()


# --- strict JSON -----------------------------------------------------------------------------------------------
def test_json_is_strict_and_never_holds_nan(tmp_path, monkeypatch):
    sample, ref = write_npz(tmp_path / "s.npz", acts(0)), write_npz(tmp_path / "r.npz", acts(1, shift=0.5))
    result = calc(sample, ref, f"--json={tmp_path / 'm.json'}")
    assert result.exit_code == 0, result.output
    figures = strict_json((tmp_path / "m.json").read_text())["metrics"]
    assert set(figures) == {"fid", "sfid", "precision", "recall", "kid", "kid_std"}
    # should a figure ever come out NaN, the file is not written
    monkeypatch.setattr(cli_evaluate, "calc_metrics", lambda *a, **k: {"fid": float("nan")})
    before = snapshot(tmp_path)
    refused(calc(sample, ref, f"--json={tmp_path / 'm.json'}"), "m.json", "not finite")
    assert snapshot(tmp_path) == before


# --- files that are not activations -----------------------------------------------------------------------------
def _damaged_npz(path: Path) -> Path:
    write_npz(path, acts(0))
    raw = bytearray(path.read_bytes())
    member = raw.find(b"feat.npy")
    raw[member + 200] ^= 0xFF  # inside the array data: its CRC no longer matches
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("kind", ["empty", "random", "truncated", "crc", "text", "pickle"])
def test_files_that_are_not_activations_are_one_line(tmp_path, kind):
    path = tmp_path / "bad.npz"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "truncated":
        write_npz(path, acts(0))
        path.write_bytes(path.read_bytes()[:700])
    elif kind == "crc":
        _damaged_npz(path)
    elif kind == "text":
        path.write_text("feat,s_feat\n1,2\n")
    else:
        np.savez(path, feat=np.array([{"a": 1}] * 4, dtype=object))
    good = write_npz(tmp_path / "good.npz", acts(1))
    before = snapshot(tmp_path)
    refused(calc(path, good), "bad.npz")
    refused(calc(good, path), "bad.npz")
    refused(evaluate("ref", f"--data={path}", f"--dest={tmp_path / 'stats.npz'}"), "bad.npz")
    assert snapshot(tmp_path) == before


def test_images_argument_that_is_not_a_dataset_is_one_line(tmp_path):
    (tmp_path / "zero.zip").write_bytes(b"")
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01")
    (tmp_path / "weights.pt").write_bytes(b"not loaded: --data is checked first")
    before = snapshot(tmp_path)
    for name in ("zero.zip", "junk.bin", "missing"):
        for command in ("activations", "ref"):
            refused(evaluate(command, f"--data={tmp_path / name}", f"--dest={tmp_path / 'a.npz'}",
                             "--device=cpu", f"--detector={tmp_path / 'weights.pt'}"), name)
    assert snapshot(tmp_path) == before


def test_reference_from_another_detector(tmp_path):
    sample = write_npz(tmp_path / "s.npz", dict(acts(0), detector=np.array("inception-v3:aaaa")))
    other = write_npz(tmp_path / "clip.npz", acts(1, dims=(32, 12)))  # other feature dimensions
    refused(calc(sample, other), "s.npz", "clip.npz", "differ")
    stats = write_npz(tmp_path / "adm.npz", {"mu": np.zeros(2048), "sigma": np.eye(2048)})
    refused(evaluate("calc", "-m", "fid", f"--activations_sample={sample}", f"--activations_ref={stats}"),
            "adm.npz", "differ")
    # same dimensions, other weights: computed, with a warning naming both files
    same = write_npz(tmp_path / "w.npz", dict(acts(1), detector=np.array("inception-v3:bbbb")))
    with pytest.warns(UserWarning, match="different detector weights"):
        result = evaluate("calc", "-m", "fid", f"--activations_sample={sample}", f"--activations_ref={same}")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output


def test_an_output_that_is_an_input_is_refused(tmp_path):
    sample, ref = write_npz(tmp_path / "s.npz", acts(0)), write_npz(tmp_path / "r.npz", acts(1))
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        zf.writestr("a.png", b"")
    before = snapshot(tmp_path)
    refused(evaluate("ref", f"--data={sample}", f"--dest={sample}"), "--dest", "s.npz")
    refused(evaluate("activations", f"--data={tmp_path / 'd.zip'}", f"--dest={tmp_path / 'd.zip'}"), "--dest", "d.zip")
    for target in (sample, ref):
        refused(calc(sample, ref, f"--json={target}"), "--json", target.name)
    assert snapshot(tmp_path) == before


# --- full disks -------------------------------------------------------------------------------------------------
def test_disk_full_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    sample, ref = write_npz(tmp_path / "s.npz", acts(0)), write_npz(tmp_path / "r.npz", acts(1))
    (tmp_path / "m.json").write_text("earlier\n")
    save_npz(tmp_path / "stats.npz", {"mu": np.zeros(2), "sigma": np.eye(2)})
    before = snapshot(tmp_path)

    def full_text(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[:10])
        raise OSError(errno.ENOSPC, "unexpected pos 4096")

    real_savez = np.savez

    def full_savez(file, *args, **kwargs):
        file.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "unexpected pos 4096")

    monkeypatch.setattr(Path, "write_text", full_text)
    out = refused(calc(sample, ref, f"--json={tmp_path / 'm.json'}"), "no space left on device", "m.json",
                  figures=True)
    monkeypatch.setattr(np, "savez", full_savez)
    out += refused(evaluate("ref", f"--data={sample}", f"--dest={tmp_path / 'stats.npz'}"),
                   "no space left on device", "stats.npz")
    monkeypatch.setattr(np, "savez", real_savez)
    assert "unexpected pos" not in out
    assert snapshot(tmp_path) == before  # the old files intact, no temporary file left


# --- inputs that would give a wrong figure or an unnamed error -----------------------------------------------
def test_calc_refuses_statistics_that_are_no_covariance(tmp_path):
    sample = write_npz(tmp_path / "s.npz", acts(0))
    sigma = np.eye(16)
    sigma[0, 0] = -50000.0  # a negative variance: the Frechet distance came out as -100,000
    ref = write_npz(tmp_path / "stats.npz", {"mu": np.zeros(16), "sigma": sigma})
    refused(evaluate("calc", "-m", "fid", f"--activations_sample={sample}", f"--activations_ref={ref}"),
            "stats.npz", "negative eigenvalue")
    sigma = np.eye(16)
    sigma[0, 1] = 3.0
    write_npz(ref, {"mu": np.zeros(16), "sigma": sigma})
    refused(evaluate("calc", "-m", "fid", f"--activations_sample={sample}", f"--activations_ref={ref}"),
            "stats.npz", "not symmetric")


def test_calc_refuses_features_without_dimensions(tmp_path):
    sample = write_npz(tmp_path / "empty.npz", {"feat": np.zeros((40, 0), np.float32)})
    ref = write_npz(tmp_path / "ref.npz", {"feat": np.zeros((40, 0), np.float32)})
    refused(evaluate("calc", "-m", "fid", f"--activations_sample={sample}", f"--activations_ref={ref}"),
            "empty.npz", "D >= 1")


@pytest.mark.parametrize("metric, rows, needle", [("pr", 2, "precision/recall"), ("kid", 4, "KID")])
def test_a_metric_the_files_cannot_give_is_skipped_with_its_reason(tmp_path, metric, rows, needle):
    few = write_npz(tmp_path / "few.npz", acts(0, n=rows))
    ref = write_npz(tmp_path / "ref.npz", acts(1))
    res = evaluate("calc", "-m", "fid", "-m", metric, "--kid-subset-size=5", "--kid-subsets=2", "--pr-k=2",
                   f"--activations_sample={few}", f"--activations_ref={ref}", "--device=cpu",
                   f"--json={tmp_path / 'm.json'}")
    assert res.exit_code == 0, res.output
    assert re.search(r"^FID: ", res.output, re.M)
    skipped = [line for line in res.output.splitlines() if line.startswith(f"Skipped {metric}: ")]
    assert len(skipped) == 1 and "few.npz" in skipped[0] and needle in skipped[0] and f"has {rows} rows" in skipped[0]
    record = strict_json((tmp_path / "m.json").read_text())
    assert set(record["metrics"]) == {"fid"} and needle in record["skipped"][metric]


def test_when_no_metric_can_be_computed_it_is_one_error_naming_the_file(tmp_path):
    few = write_npz(tmp_path / "few.npz", acts(0, n=1))
    ref = write_npz(tmp_path / "ref.npz", acts(1))
    out = refused(evaluate("calc", "-m", "fid", f"--activations_sample={few}", f"--activations_ref={ref}"),
                  "few.npz", "FID (a covariance)", "has 1 rows")
    assert "none of ['fid'] can be computed" in out


def test_a_non_finite_late_figure_prints_no_earlier_figure(tmp_path, monkeypatch):
    import relay_diffusion.metrics.scores as scores

    sample, ref = write_npz(tmp_path / "s.npz", acts(0)), write_npz(tmp_path / "r.npz", acts(1))
    monkeypatch.setattr(scores, "kernel_inception_distance", lambda *a, **k: (float("nan"), float("nan")))
    refused(calc(sample, ref, f"--json={tmp_path / 'm.json'}"), "kid = nan", "not finite")  # no FID line before it
    assert not (tmp_path / "m.json").exists()


def test_ref_of_too_few_activations_names_the_file(tmp_path):
    few = write_npz(tmp_path / "few.npz", acts(0, n=1))
    refused(evaluate("ref", f"--data={few}", f"--dest={tmp_path / 'stats.npz'}"), "few.npz", "has 1 rows")
    assert not (tmp_path / "stats.npz").exists()


def test_a_report_nested_too_deeply_is_not_taken_for_one_of_ours(tmp_path):
    from relay_diffusion.data.destinations import _is_report

    path = tmp_path / "out.zip.report.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert _is_report(str(path)) is False
