"""``generate_images``: this process's share of the seeds, in batches, written as PNG files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from relay_diffusion.generation.configs import PRESETS
from relay_diffusion.generation.files import check_images, image_path, load_images, save_images
from relay_diffusion.generation.pipeline import ClassLabels, RelayPipeline
from relay_diffusion.core.rng import parse_int_list


def rank_batches(seeds: Sequence[int], max_batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The reference's split of ``seeds`` into batches, every ``world_size``-th batch for process ``rank``."""
    seeds = list(seeds)
    if not seeds:
        return []
    num_batches = ((len(seeds) - 1) // (max_batch_size * world_size) + 1) * world_size
    batches = [b.tolist() for b in torch.as_tensor(seeds).tensor_split(num_batches)]
    return [b for b in batches[rank::world_size] if b]


def generate_images(
    pipeline: RelayPipeline,
    seeds: Sequence[int],
    outdir: str | os.PathLike,
    *,
    max_batch_size: int = 64,
    class_labels: ClassLabels = None,
    indir: str | os.PathLike | None = None,
    subdirs: bool = False,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> list[Path]:
    """Generate and save this process's share of ``seeds``; seeds whose PNG exists are skipped unless
    ``overwrite``. Files do not depend on ``max_batch_size`` or ``world_size``. Returns the written paths."""
    from tqdm import tqdm

    mine = [s for batch in rank_batches(seeds, max_batch_size, rank, world_size) for s in batch]
    todo = [s for s in mine if overwrite or not image_path(outdir, s, subdirs).is_file()]
    if pipeline.input_shape is not None:
        if indir is None:
            raise ValueError("the pipeline starts with a relay stage: give the input folder (--indir)")
        check_images(indir, seeds)  # all seeds, so that every process stops alike before sampling
    written: list[Path] = []
    with tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), max_batch_size):
            batch = todo[start : start + max_batch_size]
            inputs = load_images(indir, batch) if pipeline.input_shape is not None else None
            images = pipeline(batch, class_labels=class_labels, inputs=inputs).array
            written += save_images(images, batch, outdir, subdirs)
            bar.update(len(batch))
    return written


def preset_seeds(preset: str) -> list[int]:
    return parse_int_list(PRESETS[preset].seeds)
