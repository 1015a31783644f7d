"""The manifest beside generated images: which networks and settings made them.

A rerun into the same ``--outdir`` resumes only when the manifest matches (the same network files, sampler
settings, forward processes, post-processing and network batch); otherwise it stops with the differences
instead of mixing images of two configurations. Files are identified by their SHA-256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from relay_diffusion.generation.pipeline import RelayPipeline
from relay_diffusion.generation.stages import stage_extras, stage_nfe
from relay_diffusion.utils.jsonio import dumps_strict, to_strict
from relay_diffusion.utils.naming import Namer, field_name

FILE = "generation.json"
FORMAT = "relay-diffusion/generation-1"


class ManifestMismatch(ValueError):
    """The output folder holds images made with other networks or settings."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_sha256(net: Any) -> str:
    h = hashlib.sha256()
    if hasattr(net, "state_dict"):
        for k, v in net.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(net).encode())
    return h.hexdigest()


def _guide_entry(stage: Any) -> dict[str, Any]:
    """How a stage's autoguidance guide is recorded: the in-situ variant by name, a network by its file."""
    from relay_diffusion.generation.guides import SELF_DROPOUT

    source = stage.guide_source
    if source and source != SELF_DROPOUT and Path(source).is_file():
        return {"file": Path(source).name, "sha256": file_sha256(source)}
    return {"kind": source} if source else {"state_sha256": _state_sha256(stage.guide)}


def describe(pipeline: RelayPipeline, **settings: Any) -> dict[str, Any]:
    """What determines the images of ``pipeline`` (plus ``settings`` such as the class and the layout)."""
    stages = []
    for stage in pipeline.stages:
        network = ({"file": Path(stage.source).name, "sha256": file_sha256(stage.source)} if stage.source
                   else {"state_sha256": _state_sha256(stage.net)})
        entry = {"kind": stage.kind, "resolution": stage.resolution, "network": network,
                 "sampler": dataclasses.asdict(stage.config)}
        entry.update(stage_extras(stage))
        if stage.guide is not None:
            entry["guide"] = _guide_entry(stage)
        if hasattr(stage.net, "precision"):
            entry["precision"] = stage.net.precision
        stages.append(entry)
    nfe = [stage_nfe(stage) for stage in pipeline.stages]
    return to_strict({"format": FORMAT, "stages": stages, "enhancement": dataclasses.asdict(pipeline.enhancement),
                       "net_batch": pipeline.resolved_net_batch, "tf32": getattr(pipeline, "tf32", None),
                       "nfe": nfe, **settings})


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{prefix}[{i}]")]
    return [] if old == new else [f"{prefix}: {json.dumps(old)} before, {json.dumps(new)} now"]


def check_manifest(outdir: str | os.PathLike, manifest: dict[str, Any], optional: Sequence[str] = (),
                   names: Namer = field_name) -> bool:
    """True when ``outdir`` has a manifest equal to ``manifest``, False when it has none; raises
    :class:`ManifestMismatch` listing the differences otherwise (or when the manifest is unreadable). The
    top-level keys in ``optional`` are compared only when the folder's manifest has them (settings recorded
    since a later version that cannot have changed its images, such as ``tf32`` on the CPU). ``names``: how the
    messages name the ``outdir`` and ``overwrite`` arguments."""
    path = Path(outdir) / FILE
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deeply
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise ManifestMismatch(f"{path} is not readable ({reason}); remove it or use another "
                               f"{names('', 'outdir')}") from None
    if isinstance(old, dict):
        manifest = {k: v for k, v in manifest.items() if k in old or k not in optional}
    diffs = _differences(old, manifest)
    if diffs:
        shown = "\n  ".join(diffs[:12]) + (f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else "")
        raise ManifestMismatch(f"{outdir} holds images made with other networks or settings ({path}):\n  {shown}\n"
                               f"use another {names('', 'outdir')}, or {names('', 'overwrite')} to regenerate "
                               "every seed with these")
    return True


def write_manifest(outdir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    from relay_diffusion.utils.fileio import atomic_write_text

    path = Path(outdir) / FILE
    atomic_write_text(path, dumps_strict(manifest, indent=2) + "\n")
    return path
