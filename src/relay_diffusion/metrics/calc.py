"""Metrics of a sample activations file against a reference one (``rdm evaluate calc``)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import scores
from .activations import ActivationFile, TooFewRows, check_same_detector
from .detector import Detector, DetectorError, detector_path, load_detector

METRICS = ("fid", "sfid", "is", "pr", "kid")


@dataclass
class CalcOptions:
    is_split_size: int = 5000          # images per Inception Score split (the reference: 5000)
    pr_k: int = 3                      # k of the k-NN manifolds of precision / recall
    kid_subsets: int = 100             # KID: number of random subsets (torch-fidelity's default)
    kid_subset_size: int = 1000        # KID: images per subset
    kid_seed: int = 2020               # KID: seed of the subset generator (torch-fidelity's default)
    block: int = scores.DEFAULT_BLOCK  # rows per block of the distance / covariance computations
    device: str = "cpu"                # where the computations run

    def validate(self) -> None:
        for name in ("is_split_size", "pr_k", "kid_subsets", "block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kid_subset_size < 2:
            raise ValueError(f"kid_subset_size must be at least 2, got {self.kid_subset_size}")


def _check_dims(a: int, b: int, what: str, sample: ActivationFile, ref: ActivationFile) -> None:
    if a != b:
        raise ValueError(f"{what}: feature dimensions differ: {sample.path} has {a}, {ref.path} has {b}")


def _check_finite(out: dict[str, float], sample: ActivationFile, ref: ActivationFile) -> None:
    """The inputs are checked to be finite; should a figure still overflow, it is an error, never a result."""
    bad = [name for name, value in out.items() if not math.isfinite(value)]
    if bad:
        raise ValueError(f"{', '.join(bad)} of {sample.path} against {ref.path} is not finite "
                         f"({', '.join(f'{k} = {out[k]}' for k in bad)})")


def _check_inputs(sample: ActivationFile, ref: ActivationFile, metrics: Sequence[str],
                  options: CalcOptions) -> None:
    """Read every input the metrics need and check it (numbers, shapes, finite, enough rows, the same feature
    dimensions in both files) before the first figure is computed or printed."""
    rows = {"fid": (2, "FID (a covariance)"), "sfid": (2, "sFID (a covariance)"),
            "pr": (options.pr_k + 1, f"precision/recall (k = {options.pr_k} neighbours)"),
            "kid": (options.kid_subset_size, f"KID (subsets of {options.kid_subset_size})")}
    for metric, key, label in (("fid", "feat", "FID"), ("sfid", "s_feat", "sFID"), ("pr", "feat", "feat"),
                               ("kid", "feat", "feat")):
        if metric in metrics:
            dims = [(f.features(key, *rows[metric]) if metric in ("pr", "kid") or key in f
                     else f.statistics(key)[1]).shape[1] for f in (sample, ref)]
            _check_dims(*dims, label, sample, ref)


def _sample_logits(sample: ActivationFile, detector: Detector | str | os.PathLike | None, device: torch.device,
                   log: Callable[[str], None]) -> np.ndarray:
    """The sample's stored logits, else its ``feat`` through a classifier head (loaded only then)."""
    if "logits" in sample or "feat" not in sample or detector is None or isinstance(detector, Detector):
        return sample.logits(detector if isinstance(detector, Detector) else None)
    det = load_detector(detector, device, need_head=True)
    log(f"IS: logits from the classifier head of {det.source}")
    return sample.logits(det)


def _available(metrics: Sequence[str], skipped: dict[str, str] | None, check: Callable[[str], None]) -> list[str]:
    """The metrics whose inputs pass ``check``; with ``skipped`` (a dict) a metric that cannot be computed from
    these files (too few images, no classifier head for IS) is recorded there with its reason instead of
    stopping the others."""
    kept = []
    for metric in metrics:
        try:
            check(metric)
        except (TooFewRows, DetectorError) as exc:
            if skipped is None:
                raise
            skipped[metric] = str(exc)
            continue
        kept.append(metric)
    return kept


def calc_metrics(sample_path: str, ref_path: str, metrics: Sequence[str], options: CalcOptions | None = None,
                 detector: Detector | str | os.PathLike | None = None,
                 log: Callable[[str], None] = lambda s: None,
                 skipped: dict[str, str] | None = None) -> dict[str, float]:
    """FID, sFID, IS, precision/recall and KID (as asked in ``metrics``) of the sample activations at
    ``sample_path`` against the reference at ``ref_path``. FID and sFID also take files holding only
    statistics. IS uses the sample's ``logits``, or a classifier head on its ``feat``: ``detector``'s (a
    :class:`Detector`, or a weight file / ``auto`` loaded only when the logits are not stored). ``log``
    receives one line per figure (and which head IS used). Returns {fid, sfid, is, is_std, precision,
    recall, kid, kid_std} restricted to the metrics asked for. With ``skipped`` (a dict), the metrics these files
    cannot give are left out and recorded there with the reason; an error if none is left."""
    options = options or CalcOptions()
    options.validate()
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    if isinstance(detector, (str, os.PathLike)) and str(detector) != "auto":
        detector_path(detector)  # a file named must exist, even where stored logits make it unnecessary
    sample, ref = ActivationFile(str(sample_path)), ActivationFile(str(ref_path))
    check_same_detector([sample, ref])
    dev = torch.device(options.device)
    found: dict[str, np.ndarray] = {}

    def check(metric: str) -> None:
        if metric == "is":  # fail (or skip) before long computations
            found["logits"] = _sample_logits(sample, detector, dev, log)
        else:
            _check_inputs(sample, ref, [metric], options)

    asked = list(dict.fromkeys(metrics))
    metrics = _available(asked, skipped, check)
    if not metrics:
        raise ValueError(f"none of {asked} can be computed from {sample.path} and {ref.path}: "
                         + "; ".join(f"{m}: {r}" for m, r in (skipped or {}).items()))
    logits = found.get("logits")
    out: dict[str, float] = {}
    lines: list[str] = []  # printed once every figure is computed and finite: never a figure, then an error
    for metric, key, label in (("fid", "feat", "FID"), ("sfid", "s_feat", "sFID")):
        if metric in metrics:
            mu1, sigma1 = sample.statistics(key, options.block, dev)
            mu2, sigma2 = ref.statistics(key, options.block, dev)
            _check_dims(mu1.shape[0], mu2.shape[0], label, sample, ref)
            out[metric] = scores.frechet_distance(mu1, sigma1, mu2, sigma2)
            _check_finite(out, sample, ref)
            lines.append(f"{label}: {out[metric]:g}")
    if "is" in metrics:
        out["is"], out["is_std"] = scores.inception_score(logits, options.is_split_size)
        _check_finite(out, sample, ref)
        lines.append(f"Inception Score: {out['is']:g} (std over splits {out['is_std']:g})")
    if "pr" in metrics or "kid" in metrics:
        feat_s, feat_r = sample.features("feat"), ref.features("feat")
        _check_dims(feat_s.shape[1], feat_r.shape[1], "feat", sample, ref)
        if "pr" in metrics:
            out["precision"], out["recall"] = scores.precision_recall(feat_r, feat_s, options.pr_k, options.block, dev)
            _check_finite(out, sample, ref)
            lines += [f"Precision: {out['precision']:g}", f"Recall: {out['recall']:g}"]
        if "kid" in metrics:
            out["kid"], out["kid_std"] = scores.kernel_inception_distance(
                feat_s, feat_r, options.kid_subsets, options.kid_subset_size, options.kid_seed, device=dev)
            _check_finite(out, sample, ref)
            lines.append(f"KID: {out['kid']:g} (std over subsets {out['kid_std']:g})")
    for line in lines:
        log(line)
    return out
