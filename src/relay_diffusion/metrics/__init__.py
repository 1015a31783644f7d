"""Evaluation metrics as the reference reports them (docs/math.md §11): Inception-v3 (2015-12-05
graph) activations, FID, sFID, Inception Score, precision/recall and KID.

``inception``    the network, in the TF graph's layer names
``detector``     preprocessing and loaders for its weight formats (TorchScript, StyleGAN3/EDM pickle, .pth)
``activations``  activations of an image set; activation and statistics ``.npz`` files
``scores``       the metrics as pure functions of features
``calc``         metrics of a sample file against a reference file
"""

from .activations import (
    ActivationFile,
    check_finite,
    compute_activations,
    save_activations,
    save_npz,
    statistics_arrays,
)
from .calc import METRICS, CalcOptions, calc_metrics
from .detector import (
    Detector,
    DetectorError,
    default_detector_path,
    detector_path,
    find_detector,
    hub_checkpoints_dir,
    hub_detector_paths,
    load_detector,
    resize_like_reference,
)
from .inception import InceptionV3
from .scores import (
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    knn_radii,
    precision_recall,
    trace_sqrt_product,
)

__all__ = [
    "METRICS",
    "ActivationFile",
    "CalcOptions",
    "Detector",
    "DetectorError",
    "InceptionV3",
    "calc_metrics",
    "check_finite",
    "compute_activations",
    "default_detector_path",
    "detector_path",
    "feature_statistics",
    "find_detector",
    "frechet_distance",
    "hub_checkpoints_dir",
    "hub_detector_paths",
    "inception_score",
    "kernel_inception_distance",
    "knn_radii",
    "load_detector",
    "precision_recall",
    "resize_like_reference",
    "save_activations",
    "save_npz",
    "statistics_arrays",
    "trace_sqrt_product",
]
