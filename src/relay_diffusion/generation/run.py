"""``generate_images``: this process's share of the seeds, in batches, written as PNG files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from relay_diffusion.generation.configs import PRESETS
from relay_diffusion.generation.files import check_images, image_path, is_valid_image, load_images, save_images
from relay_diffusion.generation.manifest import FILE as MANIFEST
from relay_diffusion.generation.manifest import ManifestMismatch, check_manifest, describe, write_manifest
from relay_diffusion.generation.pipeline import ClassLabels, RelayPipeline
from relay_diffusion.generation.stages import net_info
from relay_diffusion.core.rng import parse_int_list
from relay_diffusion.utils import distributed


def rank_batches(seeds: Sequence[int], max_batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The reference's split of ``seeds`` into batches, every ``world_size``-th batch for process ``rank``."""
    seeds = list(seeds)
    if not seeds:
        return []
    num_batches = ((len(seeds) - 1) // (max_batch_size * world_size) + 1) * world_size
    batches = [b.tolist() for b in torch.as_tensor(seeds).tensor_split(num_batches)]
    return [b for b in batches[rank::world_size] if b]


class NonFiniteSamplesError(ValueError):
    """The sampler produced NaN or infinite values; no image was written for those seeds."""


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
    manifest: dict[str, Any] | None = None,
) -> list[Path]:
    """Generate and save this process's share of ``seeds``. Files do not depend on ``max_batch_size`` or
    ``world_size`` (with a fixed ``net_batch``: always on the CPU, see :class:`FixedBatchDenoiser`). Returns the
    written paths.

    A seed whose PNG exists (complete, of the right size) is skipped unless ``overwrite``; a zero-byte or
    truncated one is rendered again. ``manifest`` (see :mod:`relay_diffusion.generation.manifest`, default:
    :func:`describe` of the pipeline) is kept beside the images: a folder made with other networks or
    settings is refused (:class:`ManifestMismatch`), as is one with PNGs but no manifest. Every process
    writes the (identical) manifest just before its first image. Samples that are
    not finite raise :class:`NonFiniteSamplesError` after the batch's finite ones are written."""
    from tqdm import tqdm

    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"--outdir {outdir} exists and is not a folder")
    manifest = describe(pipeline, subdirs=subdirs, class_labels=_labels_key(class_labels)) if manifest is None \
        else manifest
    if not overwrite and not check_manifest(outdir, manifest):
        existing = next((p for p in outdir.rglob("*.png") if p.name != "grid.png"), None) if outdir.is_dir() else None
        if existing is not None:
            raise ManifestMismatch(f"{outdir} holds PNG images (e.g. {existing.name}) but no {MANIFEST}, so their "
                                   "networks and settings are unknown: use another --outdir, or --overwrite")
    if pipeline.input_shape is not None:
        if indir is None:
            raise ValueError("the pipeline starts with a relay stage: give the input folder (--indir)")
        check_images(indir, seeds)  # all seeds, so that every process stops alike before sampling
    if seeds and isinstance(class_labels, int):
        pipeline.class_labels(seeds[:1], class_labels)  # an out-of-range class fails before any file is written
    shape = (pipeline.resolution, pipeline.resolution, net_info(pipeline.stages[-1].net)[1])
    mine = [s for batch in rank_batches(seeds, max_batch_size, rank, world_size) for s in batch]
    todo = [s for s in mine if overwrite or not is_valid_image(image_path(outdir, s, subdirs), shape)]
    batches = [todo[i : i + max_batch_size] for i in range(0, len(todo), max_batch_size)]
    written: list[Path] = []
    with tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True) as bar:
        # Every process takes part in the same number of rounds, so that an error in one process ends all of
        # them at the end of that batch (one small collective per batch) instead of at a later barrier.
        for i in range(distributed.all_max(len(batches))):
            error = None
            if i < len(batches):
                try:
                    _render(pipeline, batches[i], class_labels, indir, outdir, subdirs, manifest, written)
                except Exception as exc:  # raised below, once the other processes know
                    error = exc
                bar.update(len(batches[i]))
            if distributed.any_failed(error is not None):
                if error is not None:
                    raise error
                raise distributed.PeerFailure("another process failed (its error is reported by that process)",
                                              reported=True)
    return written


def _render(pipeline: RelayPipeline, batch: list[int], class_labels: ClassLabels, indir: Any, outdir: Path,
            subdirs: bool, manifest: dict[str, Any], written: list[Path]) -> None:
    """Sample and save one batch, appending the paths to ``written``; samples that are not finite raise
    :class:`NonFiniteSamplesError` after the finite ones are saved."""
    inputs = load_images(indir, batch) if pipeline.input_shape is not None else None
    out = pipeline(batch, class_labels=class_labels, inputs=inputs)
    finite = torch.isfinite(out.samples).flatten(1).all(1).tolist()
    good = [i for i, ok in enumerate(finite) if ok]
    if good and not written:  # just before the first image: a run that fails first leaves no file
        write_manifest(outdir, manifest)
    written += save_images(out.array[good], [batch[i] for i in good], outdir, subdirs)
    if len(good) < len(batch):
        bad = [batch[i] for i, ok in enumerate(finite) if not ok]
        raise NonFiniteSamplesError(
            f"{len(bad)} of {len(batch)} samples are not finite (NaN or Inf), seeds "
            f"{', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''}; no image was written for "
            "them. Check the networks' weights and the sampler settings (noise levels, S_noise)")


def _labels_key(class_labels: ClassLabels) -> Any:
    if class_labels is None or isinstance(class_labels, int):
        return class_labels
    return "custom"


def preset_seeds(preset: str) -> list[int]:
    return parse_int_list(PRESETS[preset].seeds)
