"""Build EDM-format datasets (``rdm dataset``), one per output resolution, from the same images in the same order.

``build_datasets`` reads a source (``data.sources``), decodes, converts, crops, resizes and PNG-encodes its
images in a process pool (``data.transforms``), and writes each output atomically (``data.writer``) with a
JSON report beside it that lists every skipped file. Which destinations are allowed: ``data.destinations``.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np
import PIL
import PIL.ImageColor
import tqdm

from relay_diffusion.data.transforms import (
    RESAMPLE,
    TRANSFORMS,
    WHITE,
    ImageSpec,
    Size,
    decode,
    encode_png,
    make_outputs,
    to_array,
)
from relay_diffusion.data.destinations import DatasetToolError, check_dests, report_path_of
from relay_diffusion.data.sources import Source, SourceItem, open_source
from relay_diffusion.data.writer import (
    DatasetWriter,
    WriteError,
    image_name,
    remove_stale_temporaries,
)
from relay_diffusion.utils.fileio import atomic_write_text, write_error_message

RES_PLACEHOLDER = "{res}"
_BATCH = 32  # images per task sent to a worker process (at most)
MAX_SIDE = 16384  # largest output width or height: one such RGB image is 768 MB before resampling


@dataclass(frozen=True)
class BuildOptions:
    transform: str = "none"  # none | center-crop | center-crop-wide
    resample: str = "lanczos"  # lanczos | box | bicubic (--filter)
    background: tuple[int, int, int] = WHITE  # RGB behind transparent pixels
    channels: int | None = None  # 1 or 3; None: those of the first readable image
    max_images: int | None = None  # stop after writing this many images
    labels_from_folders: bool = False  # class = first sub-folder of an image folder or zip
    workers: int | None = None  # decoding processes; None: all available cores
    strict: bool = False  # the first unreadable file is an error instead of being skipped
    overwrite: bool = False  # replace existing outputs
    progress: bool = True  # show a progress bar


@dataclass
class BuildReport:
    """What a build did; written as ``<dest>.report.json`` beside each output."""

    source: str
    source_kind: str
    outputs: dict[str, list[int] | None]  # dest -> [width, height], None: the images' own size
    num_images: int  # written to each output
    channels: int
    label_origin: str | None  # "dataset.json", "folders", "cifar-10", "mnist" or None (no labels)
    class_names: list[str] | None  # class_names[label], when known
    skipped: list[dict[str, str]]  # unreadable files: {"name": ..., "reason": ...}
    ignored: list[str]  # files of the source that are not images
    expanded_to_rgb: int  # grayscale images written as RGB because the dataset is RGB
    options: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def parse_resolution(text: str) -> Size:
    """``"64x64"`` (or ``"64"``) -> (64, 64): width x height."""
    parts = text.lower().split("x")
    try:
        size = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else None
    except ValueError:
        size = None
    if size is None or min(size) < 1:
        raise ValueError(f"{text!r} is not WIDTHxHEIGHT, e.g. 64x64")
    if max(size) > MAX_SIDE:
        raise ValueError(f"{text!r} is larger than the largest supported size {MAX_SIDE}x{MAX_SIDE}")
    return size


def parse_background(text: str) -> tuple[int, int, int]:
    """A colour name or ``#RRGGBB`` -> (r, g, b)."""
    try:
        return tuple(PIL.ImageColor.getrgb(text)[:3])  # type: ignore[return-value]
    except ValueError:
        raise ValueError(f"{text!r} is not a colour name (white, black, ...) or #RRGGBB") from None


def dest_paths(dest: str, sizes: Sequence[Size | None]) -> dict[Size | None, str]:
    """One output path per size. ``{res}`` in ``dest`` becomes ``WxH``; otherwise, with several sizes, ``-WxH`` is
    inserted before ``.zip`` (``data.zip`` -> ``data-64x64.zip``) or appended to a folder name."""
    if not os.fspath(dest).strip():
        raise DatasetToolError("the output path is empty", option="--dest")
    if len(set(sizes)) != len(sizes):
        raise DatasetToolError("the same resolution is given twice", option="--resolution")
    dest = dest.rstrip("/\\") or dest
    if RES_PLACEHOLDER not in dest and len(sizes) == 1:
        return {sizes[0]: dest}
    paths = {}
    for size in sizes:
        if size is None:
            raise DatasetToolError(f"{RES_PLACEHOLDER} in --dest needs --resolution", option="--dest")
        res = f"{size[0]}x{size[1]}"
        if RES_PLACEHOLDER in dest:
            paths[size] = dest.replace(RES_PLACEHOLDER, res)
        elif dest.lower().endswith(".zip"):
            paths[size] = f"{dest[:-4]}-{res}{dest[-4:]}"
        else:
            paths[size] = f"{dest}-{res}"
    return paths


class _Outcome(NamedTuple):
    pngs: list[bytes] | None  # one per output size; None when unreadable or of the wrong channel count
    reason: str | None  # why the item is unreadable
    size: Size | None  # (width, height) of the decoded image
    channels: int  # channels of the decoded image (before any expansion to RGB)


def _decode_item(data: Any, background: Sequence[int]) -> np.ndarray:
    return data if isinstance(data, np.ndarray) else to_array(decode(data), background)


def _process_item(spec: ImageSpec, data: Any, error: str | None) -> _Outcome:
    if error is not None:
        return _Outcome(None, error, None, 0)
    if isinstance(data, bytes) and not data:
        return _Outcome(None, "empty file (0 bytes)", None, 0)
    try:
        x = _decode_item(data, spec.background)
    except PIL.UnidentifiedImageError:
        return _Outcome(None, "not an image (unrecognised format)", None, 0)
    except Exception as exc:  # any failure to decode untrusted bytes means "unreadable file", reported by name
        return _Outcome(None, f"{type(exc).__name__}: {exc}", None, 0)
    size, channels = (x.shape[1], x.shape[0]), x.shape[2]
    if spec.channels == 1 and channels == 3:
        return _Outcome(None, None, size, channels)
    return _Outcome([encode_png(y) for y in make_outputs(x, spec)], None, size, channels)


def _process_batch(spec: ImageSpec, batch: list[tuple[Any, str | None]]) -> list[_Outcome]:
    return [_process_item(spec, data, error) for data, error in batch]


def _batches(items: Iterable[SourceItem], n: int) -> Iterator[list[SourceItem]]:
    batch: list[SourceItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _process(
    source: Source, spec: ImageSpec, pool: Any, workers: int, batch_size: int
) -> Iterator[tuple[SourceItem, _Outcome]]:
    """Items of ``source`` with their outcomes, in source order. With a pool, work is sent in batches, at most a
    few per worker ahead of the consumer, so memory stays bounded for any dataset size."""
    if pool is None:
        for item in source:
            yield item, _process_item(spec, item.data, item.error)
        return
    pending: deque = deque()
    for batch in _batches(source, batch_size):
        task = pool.apply_async(_process_batch, (spec, [(it.data, it.error) for it in batch]))
        pending.append((batch, task))
        while len(pending) > 2 * workers or (pending and pending[0][1].ready()):
            done, task = pending.popleft()
            yield from zip(done, task.get())
    while pending:
        done, task = pending.popleft()
        yield from zip(done, task.get())


def _first_channels(source: Source, background: Sequence[int]) -> int:
    """Channels of the first readable image (3 when none is readable: the build then fails anyway)."""
    items = iter(source)
    try:
        for item in items:
            if item.error is None:
                try:
                    return _decode_item(item.data, background).shape[2]
                except Exception:  # unreadable: the build reports it in order
                    continue
    finally:
        getattr(items, "close", lambda: None)()
    return 3


def _ignore_interrupts() -> None:
    """In a decoding worker: Ctrl-C (sent to the whole process group) is the main process's to handle. It
    stops the build, the pool is terminated and the outputs' temporary files removed; without this, every
    worker printed its own KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_context() -> Any:
    """Worker processes started from a clean server process, not forked from this one: a fork of a process
    whose other threads hold locks (torch's or OpenBLAS's pools, in a library caller) can hang in the child."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _check_options(sizes: Sequence[Size | None], options: BuildOptions) -> None:
    if options.transform not in TRANSFORMS:
        raise DatasetToolError(f"{options.transform!r} is not one of {', '.join(TRANSFORMS)}", option="--transform")
    if options.resample not in RESAMPLE:
        raise DatasetToolError(f"{options.resample!r} is not one of {', '.join(RESAMPLE)}", option="--filter")
    if options.channels not in (None, 1, 3):
        raise DatasetToolError(f"{options.channels!r} is not 1 or 3", option="--channels")
    if not sizes:
        raise DatasetToolError("no output", option="--dest")
    if None in sizes and options.transform != "none":
        raise DatasetToolError(f"--transform={options.transform} needs --resolution=WxH", option="--transform")
    if options.transform == "center-crop-wide":
        for size in sizes:
            if size is not None and size[0] < size[1]:
                raise DatasetToolError(
                    f"center-crop-wide needs a wide resolution (width >= height), not {size[0]}x{size[1]}",
                    option="--resolution",
                )


def _size_mismatch(first: tuple[str, Size], name: str, size: Size) -> DatasetToolError:
    return DatasetToolError(
        f"images have different sizes: {first[0]!r} is {first[1][0]}x{first[1][1]} but {name!r} is "
        f"{size[0]}x{size[1]}; pass --resolution=WxH (and --transform=center-crop to keep their aspect ratios) to "
        "resize them all",
        usage=True,
    )


def _write_images(
    source: Source, spec: ImageSpec, writers: list[DatasetWriter], results: Iterable[tuple[SourceItem, _Outcome]],
    options: BuildOptions, bar: tqdm.tqdm,
) -> tuple[list[list[Any]], list[dict[str, str]], int]:
    """Add every readable image to every writer, in order. Returns ``[name, label]`` pairs of the written
    images, the skipped items and how many grayscale images were expanded to RGB."""
    labels: list[list[Any]] = []
    skipped: list[dict[str, str]] = []
    expanded = 0
    first: tuple[str, Size] | None = None
    for item, outcome in results:
        bar.update(1)
        if outcome.reason is not None:
            if options.strict:
                raise DatasetToolError(
                    f"cannot read {item.name!r} in {source.path!r}: {outcome.reason} (--strict stops at the first "
                    "unreadable file; without it, such files are skipped and listed in the report)"
                )
            skipped.append({"name": item.name, "reason": outcome.reason})
            continue
        if outcome.pngs is None:
            raise DatasetToolError(
                f"{item.name!r} is a colour image but the dataset is grayscale (like its first image); pass "
                "--channels=3 to write all images as RGB",
                usage=True,
            )
        if spec.sizes == (None,):
            first = first or (item.name, outcome.size)
            if outcome.size != first[1]:
                raise _size_mismatch(first, item.name, outcome.size)
        name = image_name(len(labels))
        for writer, png in zip(writers, outcome.pngs):
            writer.add(name, png)
        labels.append([name, item.label])
        expanded += outcome.channels == 1 and spec.channels == 3
        if len(labels) == options.max_images:
            break
    if not labels:
        reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped[:3])
        raise DatasetToolError(f"no readable images in {source.path!r} ({reasons})", option="--source")
    return labels, skipped, expanded


def build_datasets(
    source: str, dests: Mapping[Size | None, str], options: BuildOptions = BuildOptions(),
    log: Callable[[str], None] = lambda line: None,
) -> BuildReport:
    """Write one EDM-format dataset per entry of ``dests`` (``{(width, height) or None: path}``; None keeps the
    images' own size, which must then be the same for all) from the images of ``source``, with the same images
    in the same order and the same labels in every output. Returns the report (also written beside each output).

    Raises ``DatasetToolError`` for bad input and for failed writes (the message names the file: "no space left on
    device" when the disk is full); nothing is left at the destinations then, and nothing the tool did not write
    is ever removed (``destinations.check_dests``). Temporary files of earlier killed runs for the same destinations are
    removed first, one ``log`` line each.
    """
    start, started = time.perf_counter(), time.time()
    sizes = list(dests)
    _check_options(sizes, options)
    if len({os.path.realpath(p) for p in dests.values()}) != len(dests):
        raise DatasetToolError("two outputs have the same path", option="--dest")
    if not os.path.exists(source):
        raise DatasetToolError(f"{os.fspath(source)!r} does not exist", option="--source")
    check_dests(os.fspath(source), list(dests.values()), options.overwrite)
    for path in dests.values():
        for stale in remove_stale_temporaries(path, before=started):
            log(f"removed {stale!r}, a temporary file left by an interrupted earlier run")
    try:
        src = open_source(source, options.labels_from_folders)
    except ValueError as exc:
        raise DatasetToolError(str(exc), option="--source") from None
    try:
        return _build(src, dests, options, start)
    except WriteError as exc:
        raise DatasetToolError(str(exc)) from None


def _build(src: Source, dests: Mapping[Size | None, str], options: BuildOptions, start: float) -> BuildReport:
    source, sizes = src.path, list(dests)
    channels = options.channels or _first_channels(src, options.background)
    spec = ImageSpec(tuple(sizes), options.transform, options.resample, options.background, channels)
    workers = min(max(1, options.workers or available_cpus()), len(src))
    batch = min(_BATCH, max(1, len(src) // (4 * workers)))  # small datasets still keep every worker busy
    total = len(src) if options.max_images is None else min(len(src), options.max_images)

    with ExitStack() as stack:
        writers = [stack.enter_context(DatasetWriter(dests[s], options.overwrite)) for s in sizes]
        # The pool starts before the progress bar's thread exists; leaving the block terminates it.
        pool = stack.enter_context(_pool_context().Pool(workers, initializer=_ignore_interrupts)) \
            if workers > 1 else None
        bar = stack.enter_context(tqdm.tqdm(total=total, unit="img", disable=not options.progress or None))
        results = _process(src, spec, pool, workers, batch)
        stack.callback(results.close)  # closes the source
        labels, skipped, expanded = _write_images(src, spec, writers, results, options, bar)
        for writer in writers:
            writer.commit(labels if src.label_origin is not None else None)

    report = BuildReport(
        source=os.fspath(source),
        source_kind=src.kind,
        outputs={dests[s]: (list(s) if s is not None else None) for s in sizes},
        num_images=len(labels),
        channels=channels,
        label_origin=src.label_origin,
        class_names=src.class_names,
        skipped=skipped,
        ignored=src.ignored,
        expanded_to_rgb=expanded,
        options={k: v for k, v in dataclasses.asdict(options).items() if k != "progress"},
        elapsed_s=round(time.perf_counter() - start, 3),
    )
    for path in dests.values():
        report_path = report_path_of(path)
        try:
            atomic_write_text(report_path, report.to_json() + "\n")
        except OSError as exc:
            raise WriteError(write_error_message(exc, report_path) + " (the datasets themselves were written)") from None
    return report
