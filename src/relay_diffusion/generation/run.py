"""``generate_images``: this process's share of the seeds, in batches, written as PNG files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from relay_diffusion.generation.files import ImageWriter, check_images, image_path, is_valid_image, load_images
from relay_diffusion.generation.manifest import FILE as MANIFEST
from relay_diffusion.generation.manifest import ManifestMismatch, check_manifest, describe, write_manifest
from relay_diffusion.generation.pipeline import ClassLabels, RelayPipeline
from relay_diffusion.generation.stages import net_info
from relay_diffusion.utils import distributed
from relay_diffusion.utils.dtypes import float32_default
from relay_diffusion.utils.locks import FolderLock
from relay_diffusion.utils.naming import Namer, field_name


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


@float32_default
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
    names: Namer = field_name,
) -> list[Path]:
    """Generate and save this process's share of ``seeds``. Files do not depend on ``max_batch_size`` or
    ``world_size`` (with a fixed ``net_batch``: always on the CPU, see :class:`FixedBatchDenoiser`). Returns the
    written paths.

    A seed whose PNG exists (complete, of the right size) is skipped unless ``overwrite``; a zero-byte or
    truncated one is rendered again. ``manifest`` (see :mod:`relay_diffusion.generation.manifest`, default:
    :func:`describe` of the pipeline) is kept beside the images: a folder made with other networks or
    settings is refused (:class:`ManifestMismatch`), as is one with PNGs but no manifest. Every process
    writes the (identical) manifest just before its first image. Samples that are
    not finite raise :class:`NonFiniteSamplesError` after the batch's finite ones are written.

    PNGs are encoded and written on a background thread (:class:`ImageWriter`) while the next batch samples;
    the function returns once every image is on disk, and a write error is raised at the next batch or at
    the end. Errors name the arguments by ``names`` (the command line passes its flags)."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"{names('', 'outdir')} {outdir} exists and is not a folder")
    if indir is not None and outdir.resolve() == Path(indir).resolve():
        # the outputs would replace the inputs (or, without overwrite, the inputs would pass for outputs)
        raise ValueError(f"{names('', 'outdir')} {outdir} is the input folder {names('', 'indir')}: write the "
                         "outputs to another folder")
    args = (pipeline, seeds, outdir, max_batch_size, class_labels, indir, subdirs, overwrite, rank, world_size,
            progress, manifest, names)
    if rank != 0:  # the first process holds the folder for the whole job
        return _generate(*args)
    created = not outdir.exists()
    outdir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(outdir, "rdm-generate", "generation (rdm generate): two with other settings would mix "
                                              "their images")
    lock_was_there, manifest_before = lock.path.exists(), _stat(outdir / MANIFEST)
    try:
        with lock:
            return _generate(*args)
    finally:
        # the manifest is (re)written before a run's first image: unchanged, the run wrote nothing, and the
        # folder is left as it was
        if not lock_was_there and _stat(outdir / MANIFEST) == manifest_before:
            lock.path.unlink(missing_ok=True)
            if created and not any(outdir.iterdir()):
                outdir.rmdir()


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def _generate(pipeline: RelayPipeline, seeds: Sequence[int], outdir: Path, max_batch_size: int,
              class_labels: ClassLabels, indir: str | os.PathLike | None, subdirs: bool, overwrite: bool, rank: int,
              world_size: int, progress: bool, manifest: dict[str, Any] | None, names: Namer) -> list[Path]:
    """:func:`generate_images` once the output folder is this job's."""
    from tqdm import tqdm

    manifest = describe(pipeline, subdirs=subdirs, class_labels=_labels_key(class_labels)) if manifest is None \
        else manifest
    # Recorded since a later version without changing the images: "nfe" (the network evaluations per image of
    # each stage follow from the sampler settings, which are compared), and "tf32" on the CPU (it has no TF32)
    optional = ("nfe", "tf32") if pipeline.device.type == "cpu" else ("nfe",)
    if not overwrite and not check_manifest(outdir, manifest, optional, names):
        existing = next((p for p in outdir.rglob("*.png") if p.name != "grid.png"), None) if outdir.is_dir() else None
        if existing is not None:
            raise ManifestMismatch(f"{outdir} holds PNG images (e.g. {existing.name}) but no {MANIFEST}, so their "
                                   f"networks and settings are unknown: use another {names('', 'outdir')}, or "
                                   f"{names('', 'overwrite')}")
    if pipeline.input_shape is not None:
        if indir is None:
            raise ValueError(f"the pipeline starts with a relay stage: give the input folder ({names('', 'indir')})")
        check_images(indir, seeds)  # all seeds, so that every process stops alike before sampling
    if seeds and isinstance(class_labels, int):
        pipeline.class_labels(seeds[:1], class_labels)  # an out-of-range class fails before any file is written
    shape = (pipeline.resolution, pipeline.resolution, net_info(pipeline.stages[-1].net)[1])
    mine = [s for batch in rank_batches(seeds, max_batch_size, rank, world_size) for s in batch]
    todo = [s for s in mine if overwrite or not is_valid_image(image_path(outdir, s, subdirs), shape)]
    batches = [todo[i : i + max_batch_size] for i in range(0, len(todo), max_batch_size)]
    written: list[Path] = []
    full = min(max_batch_size, len(todo)) if pipeline.fixed_shapes else 0
    with tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True) as bar, \
            ImageWriter(outdir, subdirs) as writer:
        # Every process takes part in the same number of rounds, so that an error in one process ends all of
        # them at the end of that batch (one small collective per batch) instead of at a later barrier.
        for i in range(distributed.all_max(len(batches))):
            error = None
            if i < len(batches):
                try:
                    _render(pipeline, batches[i], full, class_labels, indir, outdir, manifest, writer, written)
                except Exception as exc:  # raised below, once the other processes know
                    error = exc
                bar.update(len(batches[i]))
            if distributed.any_failed(error is not None):
                if error is not None:
                    raise error
                raise distributed.PeerFailure("another process failed (its error is reported by that process)",
                                              reported=True)
    return written


def _render(pipeline: RelayPipeline, batch: list[int], full: int, class_labels: ClassLabels, indir: Any,
            outdir: Path, manifest: dict[str, Any], writer: ImageWriter, written: list[Path]) -> None:
    """Sample one batch (padded to ``full`` seeds for a compiled network) and hand its images to ``writer``,
    appending their paths to ``written``; samples that are not finite raise :class:`NonFiniteSamplesError`
    once the finite ones are on disk."""
    inputs = load_images(indir, batch, pipeline.input_shape) if pipeline.input_shape is not None else None
    seeds, inputs = _padded(batch, inputs, full)
    out = pipeline.output(seeds, pipeline.run(seeds, class_labels=class_labels, inputs=inputs))
    samples, array = out.samples[: len(batch)], out.array[: len(batch)]
    finite = torch.isfinite(samples).flatten(1).all(1).tolist()
    good = [i for i, ok in enumerate(finite) if ok]
    if good and not written:  # just before the first image: a run that fails first leaves no file
        write_manifest(outdir, manifest)
    written += writer.submit(array[good], [batch[i] for i in good])
    if len(good) < len(batch):
        writer.flush()
        bad = [batch[i] for i, ok in enumerate(finite) if not ok]
        raise NonFiniteSamplesError(
            f"{len(bad)} of {len(batch)} samples are not finite (NaN or Inf), seeds "
            f"{', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''}; no image was written for "
            "them. Check the networks' weights and the sampler settings (noise levels, S_noise)")


def _padded(batch: list[int], inputs: torch.Tensor | None, size: int) -> tuple[list[int], torch.Tensor | None]:
    """``batch`` (and its input images) padded to ``size`` seeds with copies of its last seed, whose images
    are dropped: a compiled network then sees the short last batch in the shape of the others. A seed's
    images depend on that seed only, so the real seeds' images do not change."""
    pad = size - len(batch)
    if pad <= 0:
        return batch, inputs
    if inputs is not None:
        inputs = torch.cat([inputs, inputs[-1:].expand(pad, *inputs.shape[1:])])
    return batch + [batch[-1]] * pad, inputs


def _labels_key(class_labels: ClassLabels) -> Any:
    if class_labels is None or isinstance(class_labels, int):
        return class_labels
    return "custom"

