"""The Python API refuses values that would silently give wrong images (NaN labels, NaN enhancement)."""

from __future__ import annotations

import json

import pytest
import torch

from relay_diffusion.generation import RelayPipeline
from relay_diffusion.generation.configs import Enhancement


@pytest.fixture(scope="module")
def pipe() -> RelayPipeline:
    return RelayPipeline.from_bundled("cpu")


class Conditional:
    """Just enough of a pipeline for ``RelayPipeline.class_labels`` with 4 classes."""

    label_dim, device = 4, torch.device("cpu")


@pytest.mark.parametrize("labels", [torch.full((2, 4), float("nan")), [float("nan"), 1], [1.5, 2], ["a", 1]])
def test_class_labels_that_are_no_classes_are_refused(labels):
    with pytest.raises(ValueError, match="class"):
        RelayPipeline.class_labels(Conditional(), [0, 1], labels)


def test_whole_float_classes_and_one_hot_tensors_still_work():
    assert RelayPipeline.class_labels(Conditional(), [0, 1], [1.0, 3]).argmax(1).tolist() == [1, 3]
    one_hot = torch.eye(4)[[2, 0]]
    assert torch.equal(RelayPipeline.class_labels(Conditional(), [0, 1], one_hot), one_hot)


@pytest.mark.parametrize("value", [float("nan"), -1.0, 1e9, "1", True])
def test_enhancement_factors_are_bounded(value):
    with pytest.raises(ValueError, match="brightness"):
        Enhancement(brightness=value)


def test_pipeline_file_with_nan_brightness_is_refused(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "pipeline.json").read_text())
    doc["enhancement"]["brightness"] = "nan"
    (tmp_path / "pipeline.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="pipeline.json: enhancement: enhancement brightness"):
        RelayPipeline.from_pretrained(tmp_path)


def test_the_callers_default_dtype_changes_no_image(tmp_path):
    from PIL import Image

    from relay_diffusion.generation import generate_images

    def images(folder):
        generate_images(RelayPipeline.from_bundled("cpu"), [0, 1], str(folder), max_batch_size=2, progress=False)
        return [Image.open(folder / f"{s:06d}.png").tobytes() for s in (0, 1)]

    expected = images(tmp_path / "f32")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert images(tmp_path / "f64") == expected
        assert torch.get_default_dtype() == torch.float64  # the caller's setting is left as it was
    finally:
        torch.set_default_dtype(previous)
