"""``rdm dataset`` and the dataset reader on bad input and faults (docs/guarantees.md): one error line naming the
option or file, a non-zero exit, no traceback, and the user's files exactly as they were."""

from __future__ import annotations

import errno
import io
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

from relay_diffusion.cli import main
from relay_diffusion.data.dataset import ImageFolderDataset
from relay_diffusion.data.files import MAX_CLASSES
from relay_diffusion.data.writer import is_dataset_output


# --- helpers -------------------------------------------------------------------------------------------------
def png(seed: int, h: int = 4, w: int = 4) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def images(folder: Path, n: int = 3, **files: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i}.png").write_bytes(png(i))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under ``root``, by relative path."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        out[path.relative_to(root).as_posix()] = None if path.is_dir() else path.read_bytes()
    return out


def rdm(*args: str):
    return CliRunner().invoke(main, ["dataset", *args, "--workers", "1"])


def refused(result, *names: str) -> str:
    """The output of a run that must have failed cleanly, naming each of ``names``."""
    out = result.output
    assert result.exit_code not in (0, None), out
    assert "Traceback" not in out and not isinstance(result.exception, (AssertionError, TypeError)), out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Error" in out and len([line for line in out.splitlines() if "Error" in line]) == 1, out
    for name in names:
        assert name in out, (name, out)
    return out


def unchanged(root: Path):
    """Context: the files under ``root`` are byte-identical after the block."""
    class _Same:
        def __enter__(self):
            self.before = snapshot(root)

        def __exit__(self, *exc):
            if exc[0] is None:
                assert snapshot(root) == self.before
    return _Same()


# --- --dest and --source: never replace the input or anything the tool did not write -------------------------
def test_overwrite_never_removes_the_source_or_files_beside_it(tmp_path):
    top = tmp_path / "D"
    images(top / "raw")
    (top / "notes.txt").write_text("my notes")
    with unchanged(tmp_path):
        refused(rdm("--source", str(top / "raw"), "--dest", str(top), "--overwrite"), "--dest", "contains the --source")
        refused(rdm("--source", str(top / "raw"), "--dest", str(top)), "--dest")


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_dest_equal_to_the_source_is_refused(tmp_path, overwrite):
    src = images(tmp_path / "src")
    with zipfile.ZipFile(tmp_path / "src.zip", "w") as zf:
        for p in sorted(src.iterdir()):
            zf.write(p, p.name)
    with unchanged(tmp_path):
        refused(rdm("--source", str(src), "--dest", str(src), *overwrite), "--dest", "is the --source")
        refused(rdm("--source", str(src) + "/", "--dest", str(src), *overwrite), "--dest", "is the --source")
        refused(rdm("--source", str(tmp_path / "src.zip"), "--dest", str(tmp_path / "src.zip"), *overwrite),
                "--dest", "is the --source")
        # one of several outputs ({res}) being the source is refused as well
        (tmp_path / "4x4.zip").write_bytes((tmp_path / "src.zip").read_bytes())
        refused(rdm("--source", str(tmp_path / "4x4.zip"), "--dest", str(tmp_path / "{res}.zip"),
                    "--resolution", "4x4", "--resolution", "2x2", *overwrite), "--dest", "is the --source")
        (tmp_path / "4x4.zip").unlink()


def test_dest_inside_the_source_folder_is_refused_where_it_would_change_the_source(tmp_path):
    src = images(tmp_path / "src")
    with unchanged(tmp_path):
        refused(rdm("--source", str(src), "--dest", str(src / "sub" / "out")), "--dest", "inside the --source")
    before = snapshot(src)
    assert rdm("--source", str(src), "--dest", str(src / "out.zip")).exit_code == 0  # a new zip: no image changes
    assert {k: v for k, v in snapshot(src).items() if not k.startswith("out.zip")} == before
    with unchanged(tmp_path):
        for overwrite in ([], ["--overwrite"]):
            refused(rdm("--source", str(src), "--dest", str(src / "out.zip"), *overwrite), "--dest",
                    "inside the --source")


def test_overwrite_replaces_only_outputs_of_the_tool(tmp_path):
    src = images(tmp_path / "src")
    mine = tmp_path / "mine"
    images(mine / "00000", n=1)  # a folder of the user's that merely looks a little like a dataset
    (mine / "dataset.json").write_text('{"labels": null}')
    (mine / "keep.txt").write_text("precious")
    with zipfile.ZipFile(tmp_path / "mine.zip", "w") as zf:
        zf.writestr("photo.jpg", b"not ours")
        zf.writestr("dataset.json", '{"labels": null}')
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 broken")
    (tmp_path / "notes.txt").write_text("a file")
    with unchanged(tmp_path):
        for dest in ("mine", "mine.zip", "broken.zip", "notes.txt"):
            refused(rdm("--source", str(src), "--dest", str(tmp_path / dest), "--overwrite"),
                    "--dest", dest, "not a dataset")
            refused(rdm("--source", str(src), "--dest", str(tmp_path / dest)), "--dest", "already exists")
    # what the tool wrote is recognised and replaced
    for dest in (tmp_path / "out.zip", tmp_path / "out"):
        assert rdm("--source", str(src), "--dest", str(dest)).exit_code == 0
        assert is_dataset_output(str(dest))
        result = rdm("--source", str(src), "--dest", str(dest), "--overwrite", "--max-images", "1")
        assert result.exit_code == 0, result.output
        assert len(ImageFolderDataset(dest)) == 1


def test_dest_under_a_file_and_a_foreign_report_are_refused(tmp_path):
    src = images(tmp_path / "src")
    (tmp_path / "notes.txt").write_text("a file")
    (tmp_path / "out.zip.report.json").write_text("my own report, not the tool's")
    with unchanged(tmp_path):
        refused(rdm("--source", str(src), "--dest", str(tmp_path / "notes.txt" / "out.zip")), "notes.txt")
        refused(rdm("--source", str(src), "--dest", str(tmp_path / "out.zip")), "out.zip.report.json")


@pytest.mark.parametrize("value", ["100000x100000", "16385", "8x1000000", "-5", "64x64x64", "0", "x"])
def test_unsupported_resolutions_name_the_option(tmp_path, value):
    # the only image is unreadable, so a size that is not refused fails later (never allocating gigabytes)
    src = images(tmp_path / "src", n=0, **{"a.png": b"\x89PNG broken"})
    with unchanged(tmp_path):
        out = refused(rdm("--source", str(src), "--dest", str(tmp_path / "o.zip"), "--resolution", value),
                      "--resolution")
    assert ("larger than" if value[0] in "18" else "WIDTHxHEIGHT") in out


def test_missing_and_empty_sources_name_the_option(tmp_path):
    (tmp_path / "empty").mkdir()
    with unchanged(tmp_path):
        refused(rdm("--source", str(tmp_path / "nothing"), "--dest", str(tmp_path / "o.zip")), "--source")
        refused(rdm("--source", str(tmp_path / "empty"), "--dest", str(tmp_path / "o.zip")), "--source", "empty")


# --- damaged inputs ------------------------------------------------------------------------------------------
def _zip_with_bad_crc(path: Path, n: int = 3) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            zf.writestr(f"00000/img{i:08d}.png", png(i))
        zf.writestr("dataset.json", json.dumps({"labels": [[f"00000/img{i:08d}.png", i] for i in range(n)]}))
    raw = bytearray(path.read_bytes())
    second = raw.find(b"IDAT", raw.find(b"img00000001.png"))
    raw[second + 8] ^= 0xFF  # inside the second image: its CRC no longer matches
    path.write_bytes(bytes(raw))
    return path


def test_source_zip_with_a_bad_crc_is_skipped_or_named_with_strict(tmp_path):
    src = _zip_with_bad_crc(tmp_path / "src.zip")
    with unchanged(tmp_path):
        refused(rdm("--source", str(src), "--dest", str(tmp_path / "o.zip"), "--strict"), "img00000001.png", "CRC")
    result = rdm("--source", str(src), "--dest", str(tmp_path / "o.zip"))
    assert result.exit_code == 0 and "Skipped 1" in result.output, result.output
    assert json.loads((tmp_path / "o.zip.report.json").read_text())["skipped"][0]["name"] == "00000/img00000001.png"


def test_source_zip_with_a_damaged_directory_is_one_line(tmp_path):
    src = tmp_path / "src.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("a.png", png(0))
    raw = bytearray(src.read_bytes())
    cd = raw.find(b"PK\x01\x02")
    raw[cd: cd + 4] = b"XXXX"  # the central directory entry's signature: zipfile.BadZipFile on opening
    src.write_bytes(bytes(raw))
    with unchanged(tmp_path):
        refused(rdm("--source", str(src), "--dest", str(tmp_path / "o.zip")), "src.zip")


def test_reader_names_the_file_for_bad_crc_corrupt_png_and_mixed_sizes(tmp_path):
    ds = ImageFolderDataset(_zip_with_bad_crc(tmp_path / "d.zip"))
    with pytest.raises(ValueError, match=r"img00000001\.png.*d\.zip.*CRC"):
        ds[1]
    folder = images(tmp_path / "f", n=2, **{"2.png": png(2)[:40], "3.png": png(3, 6, 6)})
    ds = ImageFolderDataset(folder)
    with pytest.raises(ValueError, match=r"'2\.png'"):
        ds[2]
    with pytest.raises(ValueError, match=r"'3\.png' has shape"):
        ds[3]
    (folder / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"'0\.png'"):
        ImageFolderDataset(folder)


# --- labels --------------------------------------------------------------------------------------------------
BAD_LABELS = ["1e9", "1000000000", str(MAX_CLASSES), "-1", "NaN", '"cat"', '{"a": 1}', "true", "1.5", "null",
              "[]", "[1, NaN]", '[1, "x"]']


@pytest.mark.parametrize("label", BAD_LABELS)
def test_bad_labels_are_refused_when_built(tmp_path, label):
    src = images(tmp_path / "src", n=2)
    (src / "dataset.json").write_text(f'{{"labels": [["0.png", 0], ["1.png", {label}]]}}')
    with unchanged(tmp_path):
        out = refused(rdm("--source", str(src), "--dest", str(tmp_path / "o.zip")), "dataset.json", "1.png")
    assert "--source" in out


@pytest.mark.parametrize("label", BAD_LABELS)
def test_bad_labels_are_refused_when_read(tmp_path, label):
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(2):
            zf.writestr(f"00000/img{i:08d}.png", png(i))
        zf.writestr("dataset.json", '{"labels": [["00000/img00000000.png", 0], '
                                    f'["00000/img00000001.png", {label}]]}}')
    with pytest.raises(ValueError, match=r"dataset\.json in .*d\.zip.*img00000001\.png"):
        ImageFolderDataset(path, use_labels=True)


def test_good_labels_still_read(tmp_path):
    src = images(tmp_path / "src", n=2)
    (src / "dataset.json").write_text(f'{{"labels": [["0.png", 0], ["1.png", {MAX_CLASSES - 1}]]}}')
    assert rdm("--source", str(src), "--dest", str(tmp_path / "o.zip")).exit_code == 0
    assert ImageFolderDataset(tmp_path / "o.zip", use_labels=True).label_dim == MAX_CLASSES
    (src / "dataset.json").write_text('{"labels": [["0.png", [0.5, 1]], ["1.png", [2, -3.5]]]}')
    assert ImageFolderDataset(src, use_labels=True).label_shape == [2]
    (src / "dataset.json").write_text('{"labels": [["0.png", 1], ["1.png", [2, -3.5]]]}')
    with pytest.raises(ValueError, match="mix"):
        ImageFolderDataset(src, use_labels=True)


# --- faults: killed runs, full disks -------------------------------------------------------------------------
def test_stale_temporaries_of_killed_runs_are_removed_and_listed(tmp_path):
    src = images(tmp_path / "src")
    old = time.time() - 3600
    stale = [".o.zip.999999999.deadbeef.tmp", ".o.zip.999999999.0badc0de.tmp.old", ".o.zip.report.json.ab_cd123.tmp"]
    keep = [".o.zip.notes.tmp", ".other.zip.999999999.deadbeef.tmp", f".o.zip.{os.getpid()}.12345678.tmp", "o.zip.tmp"]
    for name in stale + keep:
        (tmp_path / name).write_bytes(b"x" * 100)
        os.utime(tmp_path / name, (old, old))
    (tmp_path / ".o.zip.999999998.feedf00d.tmp").mkdir()  # a killed folder output
    (tmp_path / ".o.zip.999999998.feedf00d.tmp" / "img.png").write_bytes(b"x")
    os.utime(tmp_path / ".o.zip.999999998.feedf00d.tmp", (old, old))
    stale.append(".o.zip.999999998.feedf00d.tmp")
    result = rdm("--source", str(src), "--dest", str(tmp_path / "o.zip"))
    assert result.exit_code == 0, result.output
    for name in stale:
        assert not (tmp_path / name).exists() and name in result.output and "interrupted" in result.output
    for name in keep:
        assert (tmp_path / name).exists()


@pytest.mark.parametrize("dest", ["o.zip", "o"])
def test_disk_full_names_the_file_and_leaves_the_old_output(tmp_path, monkeypatch, dest):
    src = images(tmp_path / "src", n=4)
    assert rdm("--source", str(src), "--dest", str(tmp_path / dest), "--max-images", "2").exit_code == 0
    calls = {"n": 0}

    def full(real):
        def write(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 2:
                raise OSError(errno.ENOSPC, "unexpected pos 123")  # what a library may say instead
            return real(self, *args, **kwargs)
        return write

    monkeypatch.setattr(zipfile.ZipFile, "writestr", full(zipfile.ZipFile.writestr))
    import relay_diffusion.data.writer as writer
    real_open = open

    def open_full(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and ".tmp" in os.fspath(path) and os.fspath(path).endswith(".png"):
            calls["n"] += 1
            if calls["n"] > 2:
                f.close()
                raise OSError(errno.ENOSPC, "unexpected pos 123")
        return f

    monkeypatch.setattr(writer, "open", open_full, raising=False)
    with unchanged(tmp_path):
        out = refused(rdm("--source", str(src), "--dest", str(tmp_path / dest), "--overwrite"),
                      "no space left on device", dest)
    assert "unexpected pos" not in out


def test_ctrl_c_during_a_build_with_workers_is_one_line_and_leaves_nothing(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1500):
        PIL.Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(src / f"{i:05d}.png")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "relay_diffusion", "dataset", f"--source={src}",
                             f"--dest={out / 'data.zip'}", "--resolution=32x32", "--workers=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # as from a terminal: a test run started in the background by a shell without job
                            # control inherits SIGINT ignored, and so would the build
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not any(out.iterdir()) and proc.poll() is None:
        time.sleep(0.05)  # until the output's temporary file exists: the build is under way
    time.sleep(0.3)
    assert proc.poll() is None, "the build ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert list(out.iterdir()) == []
