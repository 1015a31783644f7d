"""RelayPipeline with diffusers' calling conventions, next to the seeds API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relay_diffusion.generation import RelayPipeline

STEPS = dict(num_inference_steps=4)


@pytest.fixture(scope="module")
def pipe() -> RelayPipeline:
    pipe = RelayPipeline.from_bundled()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_acceptance_example_is_reproducible(pipe):
    def call():
        return pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np", **STEPS).images

    first = call()
    assert first.shape == (2, 64, 64, 3) and first.dtype == np.float32 and 0 <= first.min() <= first.max() <= 1
    assert np.array_equal(first, call())
    assert not np.array_equal(first, pipe(batch_size=2, generator=torch.Generator().manual_seed(1),
                                          output_type="np", **STEPS).images)


def test_one_generator_per_image_gives_each_image_its_own(pipe):
    both = pipe(generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)], **STEPS)
    alone = pipe(generator=[torch.Generator().manual_seed(6)], **STEPS)
    assert len(both.seeds) == 2 and np.array_equal(both.array[1], alone.array[0])


def test_output_types_hold_the_same_images(pipe):
    out = pipe([0, 1], **STEPS)
    assert [im.size for im in out.images] == [(64, 64)] * 2 and np.array_equal(np.asarray(out.images[1]), out.array[1])
    np_images = pipe([0, 1], output_type="np", **STEPS).images
    pt_images = pipe([0, 1], output_type="pt", return_dict=False, **STEPS)[0]
    assert np.array_equal(np.round(np_images * 255).astype(np.uint8), out.array)
    assert pt_images.shape == (2, 3, 64, 64) and torch.equal(pt_images.permute(0, 2, 3, 1), torch.from_numpy(np_images))
    with pytest.raises(ValueError, match="output_type"):
        pipe([0], output_type="latent")


def test_call_settings_apply_to_the_call_only(pipe):
    before = [stage.config for stage in pipe.stages]
    fast = pipe([0], num_inference_steps=(3, 4)).array
    assert [stage.config for stage in pipe.stages] == before
    assert not np.array_equal(fast, pipe([0], num_inference_steps=(6, 4)).array)
    with pytest.raises(ValueError, match="num_inference_steps: 3 values for 2 stages"):
        pipe([0], num_inference_steps=(3, 4, 5))
    with pytest.raises(ValueError, match="cfg_scale"):
        pipe([0], guidance_scale=0.5, **STEPS)
    with pytest.raises(ValueError, match="not both"):
        pipe([0], batch_size=2)


def test_dtype_and_progress_bar(capsys):
    pipe = RelayPipeline.from_bundled(torch_dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16
    bf16 = pipe([0], **STEPS).array
    out = capsys.readouterr()
    assert "step" in out.err  # a progress bar by default
    pipe.set_progress_bar_config(disable=True)
    fp32 = pipe.to(torch.float32)([0], **STEPS).array
    assert pipe.dtype == torch.float32 and capsys.readouterr().err == ""
    assert 0 < np.abs(bf16.astype(int) - fp32).mean() < 20  # bfloat16 networks: close, not equal
    with pytest.raises(ValueError, match="float16 networks run on CUDA only"):
        pipe.to("cpu", torch.float16)


@pytest.mark.slow
def test_the_example_script_runs(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "pipeline_conventions.py"
    copy = tmp_path / script.name
    shutil.copy(script, copy)
    res = subprocess.run([sys.executable, str(copy)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert copy.with_suffix(".png").is_file()
