"""The compact zip index: the same bytes as zipfile, checked the same way, at ~30 bytes per member."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

from relay_diffusion.data.dataset import ImageFolderDataset
from relay_diffusion.data.zipindex import ZipIndex


def make_zip(path, n: int, compression=zipfile.ZIP_DEFLATED):
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(buf, format="PNG")
            zf.writestr(f"{i // 1000:05d}/img{i:08d}.png", buf.getvalue())
    return path


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2])
def test_members_read_by_position_are_zipfile_s_bytes(tmp_path, compression):
    path = make_zip(tmp_path / "d.zip", 20, compression)
    with zipfile.ZipFile(path) as zf:
        names = sorted(zf.namelist())
        expected = [zf.read(n) for n in names]
    index = ZipIndex(path, names)
    with open(path, "rb") as f:
        assert [index.read(f, i, n) for i, n in enumerate(names)] == expected


def test_a_damaged_member_fails_its_crc(tmp_path):
    path = make_zip(tmp_path / "d.zip", 3, zipfile.ZIP_STORED)
    with zipfile.ZipFile(path) as zf:
        names = sorted(zf.namelist())
        info = zf.getinfo(names[1])
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    index = ZipIndex(path, names)
    with open(path, "rb") as f:
        index.read(f, 0, names[0])
        with pytest.raises(zipfile.BadZipFile, match="CRC"):
            index.read(f, 1, names[1])


def _retained_bytes(path) -> tuple[int, ImageFolderDataset]:
    """Memory the dataset keeps once it has read an image (what every loader process pays)."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    dataset = ImageFolderDataset(path)
    dataset[0]
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return kept, dataset


def test_the_dataset_holds_no_python_object_per_image(tmp_path):
    small, _ = _retained_bytes(make_zip(tmp_path / "small.zip", 200))
    large, dataset = _retained_bytes(make_zip(tmp_path / "large.zip", 4000))
    per_image = (large - small) / 3800
    assert per_image < 150, per_image  # names and positions in arrays; zipfile's member list was ~600 B each
    assert len(pickle.dumps(dataset)) < 4000 * 100
    assert dataset.image_fnames[1234] == "00001/img00001234.png"
    assert dataset[1234][0].shape == (3, 4, 4)
