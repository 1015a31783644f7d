"""``rdm dataset`` / ``python dataset_tool.py``: every source kind, image mode, bad input and option error, on
small generated images."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

from relay_diffusion.cli import main
from relay_diffusion.data.dataset import ImageFolderDataset
from relay_diffusion.data.tool import DatasetToolError, dest_paths, parse_resolution
from relay_diffusion.data.transforms import block_mean, center_crop, composite, resize, to_array


# --- helpers -------------------------------------------------------------------------------------------------
def noise(seed: int, h: int, w: int, c: int = 3) -> np.ndarray:
    x = np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)
    return x[..., 0] if c == 1 else x


def smooth(seed: int, h: int, w: int) -> np.ndarray:
    """A distinct colour per seed plus a gentle gradient: survives downsampling recognisably."""
    base = np.random.default_rng(seed).integers(30, 200, 3)
    ramp = np.linspace(0, 40, w)[None, :, None]
    return np.clip(base[None, None, :] + ramp + np.zeros((h, 1, 1)), 0, 255).astype(np.uint8)


def save(path: Path, image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = image if isinstance(image, PIL.Image.Image) else PIL.Image.fromarray(image)
    img.save(path, **kwargs)
    return path


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def rdm(*args: str):
    return CliRunner().invoke(main, ["dataset", *args])


def ok(*args: str):
    result = rdm(*args)
    assert result.exit_code == 0, result.output
    return result


def read_zip(path: Path) -> tuple[list[str], list[np.ndarray], list | None]:
    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".png"))
        images = [np.asarray(PIL.Image.open(io.BytesIO(zf.read(n)))) for n in names]
        labels = json.loads(zf.read("dataset.json"))["labels"]
    return names, images, labels


def report(dest: Path) -> dict:
    return json.loads(Path(str(dest) + ".report.json").read_text())


def png16(values: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit colour): color_type 2 = RGB, 4 = LA, 6 = RGBA."""
    h, w = values.shape[:2]
    raw = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


# --- image folders, labels, the verbatim reference command ---------------------------------------------------
def test_folder_native_size_roundtrip(tmp_path):
    src = tmp_path / "src"
    names = ["a.png", "b/c.png", "b/d.bmp", "e.jpg", "z/y/x.png"]
    images = [noise(i, 6, 8) for i in range(len(names))]
    for name, image in zip(names, images):
        save(src / name, image, **({"quality": 100, "subsampling": 0} if name.endswith(".jpg") else {}))
    (src / "dataset.json").write_text(json.dumps({"labels": [[n, i % 3] for i, n in enumerate(reversed(names))]}))
    dest = tmp_path / "out.zip"
    ok("--source", str(src), "--dest", str(dest), "--workers", "1")

    out_names, out, labels = read_zip(dest)
    assert out_names == [f"00000/img{i:08d}.png" for i in range(5)]
    expect_labels = {n: (len(names) - 1 - i) % 3 for i, n in enumerate(names)}
    assert labels == [[f"00000/img{i:08d}.png", expect_labels[n]] for i, n in enumerate(names)]
    for name, got, want in zip(names, out, images):
        if name.endswith(".jpg"):  # lossy
            assert np.abs(got.astype(int) - want).mean() < 8
        else:
            np.testing.assert_array_equal(got, want)

    ds = ImageFolderDataset(dest, use_labels=True)
    assert len(ds) == 5 and ds.image_shape == [3, 6, 8] and ds.label_dim == 3
    image, label = ds[1]
    np.testing.assert_array_equal(image, images[1].transpose(2, 0, 1))
    np.testing.assert_array_equal(label, np.eye(3, dtype=np.float32)[expect_labels[names[1]]])
    rep = report(dest)
    assert rep["num_images"] == 5 and rep["skipped"] == [] and rep["label_origin"] == "dataset.json"


def test_reference_command_verbatim(tmp_path, repo_root):
    src = tmp_path / "original"
    wide = np.zeros((50, 100, 3), np.uint8)
    wide[:, :25] = (255, 0, 0)
    wide[:, 25:75] = (0, 0, 255)
    wide[:, 75:] = (0, 255, 0)
    save(src / "wide.png", wide)
    save(src / "tall.png", smooth(1, 90, 40))
    dest = tmp_path / "output" / "data.zip"
    cmd = [sys.executable, "dataset_tool.py", f"--source={src}", f"--dest={dest}", "--transform=center-crop",
           "--resolution=64x64", "--workers=1"]
    run = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    _, (tall, wide_out), labels = read_zip(dest)
    assert labels is None and tall.shape == wide_out.shape == (64, 64, 3)
    assert np.abs(wide_out.astype(int) - (0, 0, 255)).max() <= 2  # the centre square of the wide image is blue


def test_labels_from_folders(tmp_path):
    src = tmp_path / "src"
    for cls, n in (("cat", 2), ("ant", 1), ("dog", 3)):
        for i in range(n):
            save(src / cls / f"{i}.png", noise(n + i, 4, 4))
    (src / "dataset.json").write_text(json.dumps({"labels": None}))
    dest = tmp_path / "out.zip"
    ok("--source", str(src), "--dest", str(dest), "--labels-from-folders", "--workers", "1")
    assert [lab for _, lab in read_zip(dest)[2]] == [0, 1, 1, 2, 2, 2]  # ant, cat, dog
    assert report(dest)["class_names"] == ["ant", "cat", "dog"]
    assert ImageFolderDataset(dest, use_labels=True).label_dim == 3

    save(src / "loose.png", noise(9, 4, 4))
    result = rdm("--source", str(src), "--dest", str(tmp_path / "x.zip"), "--labels-from-folders")
    assert result.exit_code == 2 and "'loose.png'" in result.output and "--source" in result.output


def test_dataset_json_without_some_labels(tmp_path):
    src = tmp_path / "src"
    save(src / "a.png", noise(0, 4, 4))
    save(src / "b.png", noise(1, 4, 4))
    (src / "dataset.json").write_text(json.dumps({"labels": [["a.png", 1]]}))
    result = rdm("--source", str(src), "--dest", str(tmp_path / "x.zip"))
    assert result.exit_code == 2 and "no label for 'b.png'" in result.output


def test_zip_source(tmp_path):
    images = [noise(i, 5, 5) for i in range(3)]
    src = tmp_path / "images.zip"
    with zipfile.ZipFile(src, "w") as zf:
        for i, image in enumerate(images):
            zf.writestr(f"d/{2 - i}.png", _png_bytes(image))
        zf.writestr("__MACOSX/d/._0.png", b"resource fork")
        zf.writestr("e/damaged.png", _png_bytes(noise(7, 5, 5)))
        zf.writestr("dataset.json", json.dumps({"labels": [[f"d/{i}.png", [0.5, i]] for i in range(3)]
                                                          + [["e/damaged.png", [0.0, 0]]]}))
    raw = bytearray(src.read_bytes())
    at = raw.find(_png_bytes(noise(7, 5, 5)))
    raw[at + 40] ^= 0xFF  # stored member: its CRC no longer matches
    src.write_bytes(bytes(raw))
    dest = tmp_path / "out.zip"
    ok("--source", str(src), "--dest", str(dest), "--workers", "1")
    _, out, labels = read_zip(dest)
    for got, want in zip(out, reversed(images)):  # sorted names: d/0.png is images[2]
        np.testing.assert_array_equal(got, want)
    assert [lab for _, lab in labels] == [[0.5, 0], [0.5, 1], [0.5, 2]]
    rep = report(dest)
    assert rep["ignored"] == ["__MACOSX/d/._0.png"]
    assert [s["name"] for s in rep["skipped"]] == ["e/damaged.png"] and "CRC" in rep["skipped"][0]["reason"]


# --- image modes ---------------------------------------------------------------------------------------------
def test_modes_convert_to_gray_or_rgb(tmp_path):
    gray = noise(0, 4, 5, 1)
    np.testing.assert_array_equal(to_array(PIL.Image.fromarray(gray)), gray[..., None])
    bits = PIL.Image.fromarray(gray > 127).convert("1")
    np.testing.assert_array_equal(to_array(bits)[..., 0], np.where(gray > 127, 255, 0))

    rgb = noise(1, 4, 5)
    pal = PIL.Image.fromarray(rgb).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=8)
    np.testing.assert_array_equal(to_array(pal), np.asarray(pal.convert("RGB")))
    pal.info["transparency"] = 0  # palette index 0 transparent
    got = to_array(pal, background=(1, 2, 3))
    hole = np.asarray(pal) == 0
    assert hole.any() and (got[hole] == (1, 2, 3)).all() and (got[~hole] == np.asarray(pal.convert("RGB"))[~hole]).all()

    la = np.stack([np.full((2, 2), 100, np.uint8), np.full((2, 2), 128, np.uint8)], axis=-1)
    assert to_array(PIL.Image.fromarray(la, "LA"))[0, 0, 0] == (100 * 128 + 255 * 127 + 127) // 255
    assert to_array(PIL.Image.fromarray(la, "LA"), background=(0, 0, 0))[0, 0, 0] == (100 * 128 + 127) // 255

    rgba = np.dstack([rgb, np.full((4, 5), 64, np.uint8)])
    for bg in ((255, 255, 255), (0, 0, 0), (16, 32, 48)):
        np.testing.assert_array_equal(
            to_array(PIL.Image.fromarray(rgba, "RGBA"), bg), composite(rgb, rgba[..., 3], bg))
    assert composite(np.array([[[200]]], np.uint8), np.array([[255]], np.uint8), [0])[0, 0, 0] == 200

    cmyk = PIL.Image.fromarray(noise(2, 4, 5, 4), "CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="TIFF")
    np.testing.assert_array_equal(to_array(PIL.Image.open(buf)), np.asarray(cmyk.convert("RGB")))

    sixteen = np.array([[0, 257, 257 * 200], [65535, 128, 129]], np.uint16)
    buf = io.BytesIO()
    PIL.Image.fromarray(sixteen).save(buf, format="PNG")
    img16 = PIL.Image.open(buf)
    assert img16.mode.startswith("I;16")
    np.testing.assert_array_equal(to_array(img16)[..., 0], [[0, 1, 200], [255, 0, 1]])
    np.testing.assert_array_equal(to_array(PIL.Image.fromarray(sixteen.astype(np.int32), "I"))[..., 0],
                                  [[0, 1, 200], [255, 0, 1]])
    floats = PIL.Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], np.float32), "F")
    np.testing.assert_array_equal(to_array(floats)[..., 0], [[0, 128, 255, 255]])

    rgb16 = np.array([[[0, 1000, 65535], [32896, 300, 65280]]], np.uint16)
    out = to_array(PIL.Image.open(io.BytesIO(png16(rgb16, 2))))
    assert out.shape == (1, 2, 3) and np.abs(out.astype(int) - rgb16 / 257).max() <= 1


def test_mixed_modes_end_to_end(tmp_path):
    src = tmp_path / "src"
    rgb = noise(3, 8, 8)
    save(src / "01_l.png", noise(4, 8, 8, 1))
    save(src / "02_1.png", PIL.Image.fromarray(noise(5, 8, 8, 1) > 100).convert("1"))
    save(src / "03_i16.png", PIL.Image.fromarray(noise(6, 8, 8, 1).astype(np.uint16) * 257))
    save(src / "04_la.png", PIL.Image.fromarray(noise(7, 8, 8, 2), "LA"))
    save(src / "05_gray.jpg", noise(8, 8, 8, 1))
    gray_dest = tmp_path / "gray.zip"
    ok("--source", str(src), "--dest", str(gray_dest), "--workers", "1")
    _, out, _ = read_zip(gray_dest)
    assert all(x.shape == (8, 8) for x in out)  # grayscale stays one channel
    assert ImageFolderDataset(gray_dest).num_channels == 1

    save(src / "06_rgb.png", rgb)
    save(src / "07_p.gif", PIL.Image.fromarray(rgb).convert("P"))
    save(src / "08_rgba.png", PIL.Image.fromarray(noise(9, 8, 8, 4), "RGBA"))
    save(src / "09_cmyk.tif", PIL.Image.fromarray(noise(10, 8, 8, 4), "CMYK"))
    save(src / "10_cmyk.jpg", PIL.Image.fromarray(noise(11, 8, 8, 4), "CMYK"))
    (src / "11_rgb16.png").write_bytes(png16(noise(12, 8, 8).astype(np.uint16) * 257, 2))
    result = rdm("--source", str(src), "--dest", str(tmp_path / "mixed.zip"), "--workers", "1")
    assert result.exit_code == 2 and "'06_rgb.png'" in result.output and "--channels=3" in result.output
    assert not (tmp_path / "mixed.zip").exists() and no_leftovers(tmp_path)

    dest = tmp_path / "rgb.zip"
    ok("--source", str(src), "--dest", str(dest), "--channels", "3", "--workers", "1")
    _, out, _ = read_zip(dest)
    assert len(out) == 11 and all(x.shape == (8, 8, 3) for x in out)
    np.testing.assert_array_equal(out[5], rgb)
    assert report(dest)["expanded_to_rgb"] == 5


def test_background_option(tmp_path):
    src = tmp_path / "src"
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :2, 3] = 255  # left half opaque red-ish, right half fully transparent
    save(src / "a.png", PIL.Image.fromarray(rgba, "RGBA"))
    for option, colour in (([], (255, 255, 255)), (["--background", "black"], (0, 0, 0)),
                           (["--background", "#102030"], (16, 32, 48))):
        dest = tmp_path / f"{colour[0]}.zip"
        ok("--source", str(src), "--dest", str(dest), *option)
        (out,) = read_zip(dest)[1]
        assert (out[:, 2:] == colour).all() and (out[:, :2] == (200, 0, 0)).all()


# --- bad input -----------------------------------------------------------------------------------------------
def _folder_with_bad_files(root: Path, n_good: int = 40) -> list[str]:
    for i in range(n_good):
        save(root / f"good{i:03d}.png", noise(i, 8, 8))
    (root / "b_empty.png").write_bytes(b"")
    data = (root / "good000.png").read_bytes()
    (root / "c_truncated.png").write_bytes(data[: len(data) // 2])
    (root / "d_text.jpg").write_text("this is not a jpeg")
    (root / "notes.txt").write_text("not an image either, but not named as one")
    (root / ".hidden.png").write_bytes(data)
    return ["b_empty.png", "c_truncated.png", "d_text.jpg"]


def test_bad_files_are_skipped_and_reported(tmp_path):
    src = tmp_path / "src"
    bad = _folder_with_bad_files(src)
    dest2, dest1 = tmp_path / "w2.zip", tmp_path / "w1.zip"
    result = ok("--source", str(src), "--dest", str(dest2), "--workers", "2")
    assert "Skipped 3 unreadable files" in result.output and "w2.zip.report.json" in result.output
    rep = report(dest2)
    assert rep["num_images"] == 40 and [s["name"] for s in rep["skipped"]] == bad
    reasons = [s["reason"] for s in rep["skipped"]]
    assert "empty" in reasons[0] and "truncated" in reasons[1] and "not an image" in reasons[2]
    assert rep["ignored"] == [".hidden.png", "notes.txt"]
    ok("--source", str(src), "--dest", str(dest1), "--workers", "1")
    assert dest1.read_bytes() == dest2.read_bytes()  # same output for any number of workers
    _, out, _ = read_zip(dest2)
    np.testing.assert_array_equal(out[-1], noise(39, 8, 8))


def test_strict_stops_at_first_bad_file(tmp_path):
    src = tmp_path / "src"
    bad = _folder_with_bad_files(src)
    dest = tmp_path / "out" / "data.zip"
    result = rdm("--source", str(src), "--dest", str(dest), "--strict", "--workers", "2")
    assert result.exit_code == 1 and f"'{bad[0]}'" in result.output and "--strict" in result.output
    assert "Traceback" not in result.output
    assert not dest.exists() and no_leftovers(dest.parent)


def test_max_images_counts_written_images(tmp_path):
    src = tmp_path / "src"
    (src / "a_bad.png").parent.mkdir()
    (src / "a_bad.png").write_bytes(b"\x89PNG broken")
    for i in range(5):
        save(src / f"b{i}.png", noise(i, 4, 4))
    dest = tmp_path / "out.zip"
    ok("--source", str(src), "--dest", str(dest), "--max-images", "3", "--workers", "1")
    assert len(read_zip(dest)[1]) == 3 and len(report(dest)["skipped"]) == 1


def test_mixed_sizes_need_a_resolution(tmp_path):
    src = tmp_path / "src"
    save(src / "a.png", noise(0, 8, 8))
    save(src / "b.png", noise(1, 6, 9))
    dest = tmp_path / "out.zip"
    result = rdm("--source", str(src), "--dest", str(dest), "--workers", "1")
    assert result.exit_code == 2 and "different sizes" in result.output and "--resolution" in result.output
    assert "'b.png' is 9x6" in result.output and "Traceback" not in result.output
    assert not dest.exists() and no_leftovers(tmp_path)
    ok("--source", str(src), "--dest", str(dest), "--resolution", "8x8")
    assert [x.shape for x in read_zip(dest)[1]] == [(8, 8, 3)] * 2


def test_existing_dest_needs_overwrite(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        save(src / f"{i}.png", noise(i, 4, 4))
    for dest in (tmp_path / "out.zip", tmp_path / "folder"):
        ok("--source", str(src), "--dest", str(dest))
        result = rdm("--source", str(src), "--dest", str(dest), "--max-images", "1")
        assert result.exit_code == 2 and "already exists" in result.output and "--overwrite" in result.output
        assert len(ImageFolderDataset(dest)) == 3
        ok("--source", str(src), "--dest", str(dest), "--max-images", "1", "--overwrite")
        assert len(ImageFolderDataset(dest)) == 1
        assert no_leftovers(tmp_path)


# --- several resolutions, filters, transforms ----------------------------------------------------------------
def test_several_resolutions_same_images_same_order(tmp_path):
    src = tmp_path / "src"
    sizes = [(40, 30), (30, 50), (64, 64), (33, 47)] * 3
    names = [f"{i:02d}.png" for i in range(len(sizes))]
    for i, (name, (w, h)) in enumerate(zip(names, sizes)):
        save(src / name, smooth(i, h, w))
    (src / "dataset.json").write_text(json.dumps({"labels": [[n, i % 4] for i, n in enumerate(names)]}))
    ok("--source", str(src), "--dest", str(tmp_path / "data-{res}.zip"), "--transform", "center-crop",
       "--resolution", "32x32", "--resolution", "8x8", "--workers", "2")
    _, high, high_labels = read_zip(tmp_path / "data-32x32.zip")
    _, low, low_labels = read_zip(tmp_path / "data-8x8.zip")
    assert high_labels == low_labels == [[f"00000/img{i:08d}.png", i % 4] for i in range(len(names))]
    means_high = np.array([x.reshape(-1, 3).mean(0) for x in high])
    means_low = np.array([x.reshape(-1, 3).mean(0) for x in low])
    dist = np.abs(means_high[:, None] - means_low[None]).sum(-1)
    np.testing.assert_array_equal(dist.argmin(axis=1), np.arange(len(names)))  # image i matches image i
    assert np.diag(dist).max() < 3
    assert ImageFolderDataset(tmp_path / "data-8x8.zip", resolution=8, use_labels=True).label_dim == 4


def test_box_filter_is_the_block_mean():
    x = noise(0, 64, 48)
    exact = np.floor(x.reshape(16, 4, 12, 4, 3).astype(np.float64).mean(axis=(1, 3)) + 0.5)
    np.testing.assert_array_equal(resize(x, (12, 16), "box"), exact)
    np.testing.assert_array_equal(block_mean(x, 4, 4), exact)
    pil_box = np.asarray(PIL.Image.fromarray(x).resize((12, 16), PIL.Image.Resampling.BOX))
    assert np.abs(pil_box.astype(int) - exact).max() <= 1  # PIL rounds twice (rows, then columns)


def test_box_filter_low_resolution_is_block_mean_of_high(tmp_path):
    src = tmp_path / "src"
    save(src / "a.png", noise(0, 45, 50))
    save(src / "b.png", noise(1, 70, 37, 1))
    ok("--source", str(src), "--dest", str(tmp_path / "d.zip"), "--filter", "box", "--transform", "center-crop",
       "--resolution", "32x32", "--resolution", "8x8", "--channels", "3", "--workers", "1")
    _, high, _ = read_zip(tmp_path / "d-32x32.zip")
    _, low, _ = read_zip(tmp_path / "d-8x8.zip")
    for h, lo in zip(high, low):
        np.testing.assert_array_equal(lo, block_mean(h, 4, 4))


def test_center_crop_wide_to_folder(tmp_path):
    src = tmp_path / "src"
    save(src / "a.png", np.full((30, 60, 3), 200, np.uint8))
    dest = tmp_path / "wide"
    ok("--source", str(src), "--dest", str(dest), "--transform", "center-crop-wide", "--resolution", "16x8")
    ds = ImageFolderDataset(dest)
    assert ds.image_shape == [3, 16, 16] and ds.image_fnames == ["00000/img00000000.png"]
    image, _ = ds[0]
    assert (image[:, :4] == 0).all() and (image[:, 12:] == 0).all() and (image[:, 4:12] == 200).all()
    assert center_crop(np.zeros((30, 60, 3)), (16, 8)).shape == (30, 60, 3)


# --- other sources -------------------------------------------------------------------------------------------
def _cifar_tarball(path: Path, per_batch: int = 2) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5 * per_batch, 3, 32, 32), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, 5 * per_batch)]
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, obj: dict) -> None:
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for k in range(5):
            sl = slice(k * per_batch, (k + 1) * per_batch)
            add(f"data_batch_{k + 1}", {b"data": images[sl].reshape(per_batch, -1), b"labels": labels[sl],
                                        b"batch_label": b"training batch"})
        add("batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]})
    return images.transpose(0, 2, 3, 1), labels


def test_cifar10_tarball(tmp_path):
    images, labels = _cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    dest = tmp_path / "cifar10-32x32.zip"
    ok("--source", str(tmp_path / "cifar-10-python.tar.gz"), "--dest", str(dest), "--workers", "1")
    _, out, out_labels = read_zip(dest)
    np.testing.assert_array_equal(np.stack(out), images)
    assert [lab for _, lab in out_labels] == labels
    assert report(dest)["class_names"][:2] == ["class0", "class1"]


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar10_pickles_cannot_run_code(tmp_path):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        data = pickle.dumps({b"data": _Payload()})
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    result = rdm("--source", str(path), "--dest", str(tmp_path / "x.zip"))
    assert result.exit_code == 2 and "refusing to load posix.getcwd" in result.output


def test_mnist_idx_files(tmp_path):
    src = tmp_path / "mnist"
    src.mkdir()
    images = noise(0, 3 * 28, 28, 1).reshape(3, 28, 28)
    with gzip.open(src / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, 3, 28, 28) + images.tobytes())
    with gzip.open(src / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, 3) + bytes([7, 0, 3]))
    dest = tmp_path / "mnist.zip"
    ok("--source", str(src), "--dest", str(dest), "--workers", "1")
    _, out, labels = read_zip(dest)
    np.testing.assert_array_equal(np.stack(out), images)
    assert [lab for _, lab in labels] == [7, 0, 3]
    result = rdm("--source", str(src), "--dest", str(tmp_path / "y.zip"), "--labels-from-folders")
    assert result.exit_code == 2 and "--labels-from-folders applies to image folders" in result.output


def test_lsun_lmdb(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    src = tmp_path / "bedroom_train_lmdb"
    images = [noise(i, 6, 6) for i in range(3)]
    with lmdb.open(str(src), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i, image in enumerate(images):
            buf = io.BytesIO()
            PIL.Image.fromarray(image).save(buf, format="WEBP", lossless=True)
            txn.put(f"key{i}".encode(), buf.getvalue())
        txn.put(b"key9", b"garbage")
    dest = tmp_path / "lsun.zip"
    ok("--source", str(src), "--dest", str(dest), "--workers", "1")
    _, out, labels = read_zip(dest)
    np.testing.assert_array_equal(np.stack(out), np.stack(images))
    assert labels is None and [s["name"] for s in report(dest)["skipped"]] == ["key9"]


# --- option errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, option, text",
    [
        (["--resolution", "64by64"], "--resolution", "WIDTHxHEIGHT"),
        (["--resolution", "0x8"], "--resolution", "WIDTHxHEIGHT"),
        (["--transform", "center-crop"], "--transform", "needs --resolution"),
        (["--transform", "center-crop-wide", "--resolution", "8x16"], "--resolution", "width >= height"),
        (["--resolution", "8x8", "--resolution", "8"], "--resolution", "twice"),
        (["--background", "notacolour"], "--background", "colour"),
        (["--filter", "nearest"], "--filter", "nearest"),
        (["--dest-pattern"], "--dest-pattern", "No such option"),
    ],
)
def test_option_errors_name_the_option(tmp_path, args, option, text):
    save(tmp_path / "src" / "a.png", noise(0, 4, 4))
    result = rdm("--source", str(tmp_path / "src"), "--dest", str(tmp_path / "out.zip"), *args)
    assert result.exit_code == 2 and option in result.output and text in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out.zip").exists()


def test_source_and_dest_errors(tmp_path):
    result = rdm("--source", str(tmp_path / "missing"), "--dest", str(tmp_path / "o.zip"))
    assert result.exit_code == 2 and "--source" in result.output and "does not exist" in result.output
    (tmp_path / "empty").mkdir()
    result = rdm("--source", str(tmp_path / "empty"), "--dest", str(tmp_path / "o.zip"))
    assert result.exit_code == 2 and "no image files" in result.output
    save(tmp_path / "src" / "a.png", noise(0, 4, 4))
    result = rdm("--source", str(tmp_path / "src"), "--dest", str(tmp_path / "o-{res}.zip"))
    assert result.exit_code == 2 and "--dest" in result.output and "{res}" in result.output
    (tmp_path / "junk.dat").write_bytes(b"x")
    result = rdm("--source", str(tmp_path / "junk.dat"), "--dest", str(tmp_path / "o.zip"))
    assert result.exit_code == 2 and "is not an image folder" in result.output


def test_dest_paths_and_resolutions():
    assert parse_resolution("64x32") == (64, 32) and parse_resolution("16") == (16, 16)
    assert dest_paths("d.zip", [(64, 64)]) == {(64, 64): "d.zip"}
    assert dest_paths("d.zip", [None]) == {None: "d.zip"}
    assert dest_paths("out/d.zip", [(64, 64), (256, 256)]) == {
        (64, 64): "out/d-64x64.zip", (256, 256): "out/d-256x256.zip"}
    assert dest_paths("data/{res}/", [(8, 4), (4, 2)]) == {(8, 4): "data/8x4", (4, 2): "data/4x2"}
    assert dest_paths("folder/", [(8, 8), (4, 4)]) == {(8, 8): "folder-8x8", (4, 4): "folder-4x4"}
    with pytest.raises(DatasetToolError, match="twice"):
        dest_paths("d.zip", [(8, 8), (8, 8)])
