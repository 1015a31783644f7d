"""The training data loader ``ImageFolderDataset`` and ``iter_image_files`` on small generated datasets."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from relay_diffusion.data.dataset import ImageFolderDataset, iter_image_files, list_image_files


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _images(n: int, h: int = 6, w: int = 6, c: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8) for _ in range(n)]


def make_dataset(root: Path, images: list[np.ndarray], labels: list | None = None, as_zip: bool = True) -> Path:
    """An EDM-format dataset of ``images`` (names 00000/img00000000.png ...), with ``labels`` if given."""
    files = {f"{i // 1000:05d}/img{i:08d}.png": _png(x) for i, x in enumerate(images)}
    table = None if labels is None else [[name, lab] for name, lab in zip(files, labels)]
    files["dataset.json"] = json.dumps({"labels": table}).encode()
    if as_zip:
        path = root / "data.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return path
    path = root / "data"
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


@pytest.mark.parametrize("as_zip", [True, False])
def test_items_labels_and_properties(tmp_path, as_zip):
    images = _images(5)
    path = make_dataset(tmp_path, images, labels=[3, 0, 1, 3, 2], as_zip=as_zip)
    ds = ImageFolderDataset(path, resolution=6, use_labels=True)
    assert len(ds) == 5 and ds.name == "data" and ds.resolution == 6 and ds.num_channels == 3
    assert ds.image_shape == [3, 6, 6] and ds.label_dim == 4 and ds.has_labels
    assert ds.image_fnames == [f"00000/img{i:08d}.png" for i in range(5)]
    image, label = ds[3]
    assert image.dtype == np.uint8 and image.shape == (3, 6, 6) and image.flags.c_contiguous
    np.testing.assert_array_equal(image, images[3].transpose(2, 0, 1))
    assert label.dtype == np.float32 and label.tolist() == [0, 0, 0, 1]

    unlabelled = ImageFolderDataset(path)
    assert unlabelled[0][1].shape == (0,) and unlabelled.label_dim == 0 and not unlabelled.has_labels


def test_xflip_max_size_and_cache(tmp_path):
    images = _images(10)
    path = make_dataset(tmp_path, images)
    ds = ImageFolderDataset(path, xflip=True)
    assert len(ds) == 20
    np.testing.assert_array_equal(ds[13][0], ds[3][0][:, :, ::-1])
    np.testing.assert_array_equal(ds[3][0], images[3].transpose(2, 0, 1))

    sub = ImageFolderDataset(path, max_size=4, cache=True, cache_dir=tmp_path / "cache")
    again = ImageFolderDataset(path, max_size=4)
    firsts = [tuple(sub[i][0][:, 0, 0]) for i in range(4)]
    assert len(sub) == 4 and firsts == [tuple(again[i][0][:, 0, 0]) for i in range(4)]
    order = [next(k for k, x in enumerate(images) if tuple(x[0, 0]) == f) for f in firsts]
    assert order == sorted(order) and len(set(order)) == 4  # a subset, in dataset order
    sub[0][0][:] = 0  # items are copies: the cache is not modified
    assert tuple(sub[0][0][:, 0, 0]) == firsts[0]


def test_grayscale_rgba_and_vector_labels(tmp_path):
    gray = _images(2, c=1)
    ds = ImageFolderDataset(make_dataset(tmp_path, gray))
    assert ds.image_shape == [1, 6, 6]
    np.testing.assert_array_equal(ds[1][0][0], gray[1])

    folder = tmp_path / "rgba"
    folder.mkdir()
    rgba = np.zeros((4, 4, 4), np.uint8)
    PIL.Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    (folder / "dataset.json").write_text(json.dumps({"labels": [["a.png", [0.25, -1.0]]]}))
    ds = ImageFolderDataset(folder, use_labels=True)
    assert (ds[0][0] == 255).all()  # transparent pixels on white
    assert ds.label_dim == 2 and ds[0][1].tolist() == [0.25, -1.0]


def test_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing.zip")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="no image files in .*empty"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "fake.zip").write_text("not a zip")
    with pytest.raises(ValueError, match="not a valid zip"):
        ImageFolderDataset(tmp_path / "fake.zip")

    path = make_dataset(tmp_path, _images(2, 4, 4) + _images(1, 5, 4))
    with pytest.raises(ValueError, match=r"data\.zip.*4x4, not the requested resolution 8x8"):
        ImageFolderDataset(path, resolution=8)
    ds = ImageFolderDataset(path)
    with pytest.raises(ValueError, match=r"'00000/img00000002.png' has shape \[3, 5, 4\]"):
        ds[2]

    wide = tmp_path / "wide"
    wide.mkdir()
    PIL.Image.fromarray(np.zeros((4, 8, 3), np.uint8)).save(wide / "a.png")
    with pytest.raises(ValueError, match="8x4, not square"):
        _ = ImageFolderDataset(wide).resolution

    (wide / "dataset.json").write_text(json.dumps({"labels": [["b.png", 1]]}))
    with pytest.raises(ValueError, match="no label for 'a.png'"):
        ImageFolderDataset(wide, use_labels=True)


def test_zip_works_in_dataloader_workers(tmp_path):
    images = _images(12)
    ds = ImageFolderDataset(make_dataset(tmp_path, images, labels=list(range(12))), use_labels=True)
    ds[0]  # opens the zip in this process before the workers fork
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[5][0], ds[5][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    got = torch.cat([b[0] for b in batches]).numpy()
    np.testing.assert_array_equal(got, np.stack(images).transpose(0, 3, 1, 2))
    assert torch.cat([b[1] for b in batches]).argmax(1).tolist() == list(range(12))


def test_iter_image_files_zip_and_folder_agree(tmp_path):
    images = _images(3)
    zipped = make_dataset(tmp_path, images)
    folder = make_dataset(tmp_path, images, as_zip=False)
    (folder / ".DS_Store").write_bytes(b"junk")
    (folder / "00000" / "._img00000000.png").write_bytes(b"junk")
    from_zip, from_folder = list(iter_image_files(zipped)), list(iter_image_files(folder))
    assert from_zip == from_folder and [n for n, _ in from_zip] == list_image_files(folder)
    assert [n for n, _ in from_zip] == [f"00000/img{i:08d}.png" for i in range(3)]
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(io.BytesIO(from_zip[1][1]))), images[1])
