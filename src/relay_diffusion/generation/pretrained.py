"""A whole relay pipeline as one folder: ``pipeline.json`` names the stages, their sampler defaults and
forward processes, next to each stage's network (safetensors + JSON). Written by ``rdm export`` /
:meth:`RelayPipeline.save_pretrained`, read by :meth:`RelayPipeline.from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.sr import SRCondition
from relay_diffusion.generation.configs import EDMStageConfig, Enhancement, RelayStageConfig, SRStageConfig
from relay_diffusion.generation.pipeline import RelayPipeline
from relay_diffusion.generation.stages import EDMStage, RelayStage, SRStage, stage_extras
from relay_diffusion.utils import accel
from relay_diffusion.utils.jsonio import dumps_strict, restore_non_finite

FORMAT = "relay-diffusion/pipeline-1"
FILE = "pipeline.json"


def _decode_config(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown settings {unknown}")
    floats = [f.name for f in dataclasses.fields(cls) if "float" in str(f.type)]
    values = restore_non_finite(d, floats)
    if isinstance(values.get("guidance_interval"), list):
        values["guidance_interval"] = tuple(values["guidance_interval"])
    return cls(**values)


def _network_dtype(path: str | None) -> torch.dtype | None:
    """float16 when the source snapshot stores its floating-point tensors that way (kept compact), else None."""
    if not path or not str(path).endswith(".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            if t.get_dtype() in ("F16", "BF16"):
                return torch.float16
            if t.get_dtype() in ("F32", "F64"):
                return None
    return None


def save_pretrained(pipeline: RelayPipeline, folder: str | os.PathLike) -> Path:
    """Write every stage's network and ``pipeline.json`` into ``folder``; returns the JSON's path."""
    from relay_diffusion.checkpoints.snapshot import read_config, save_network
    from relay_diffusion.utils.fileio import atomic_write_text

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    stages = []
    for i, stage in enumerate(pipeline.stages):
        res = stage.resolution
        name = f"stage{i + 1}-{res}x{res}.safetensors"
        extra: dict[str, Any] = {}
        if stage.source and str(stage.source).endswith(".safetensors"):
            extra = {k: v for k, v in read_config(stage.source).items()
                     if k not in ("format", "precond", "init_kwargs")}
        extra["stage_kind"] = stage.kind
        for key, value in stage_extras(stage).items():
            extra.setdefault(key, value)  # the training value when the file had one
        save_network(stage.net, folder / name, extra=extra, dtype=_network_dtype(stage.source))
        stages.append(name)
    path = folder / FILE
    atomic_write_text(path, pipeline_json(pipeline, stages))
    return path


def pipeline_json(pipeline: RelayPipeline, networks: list[str]) -> str:
    """The text of ``pipeline.json`` for ``pipeline`` whose stages' networks are the files ``networks``."""
    stages = []
    for stage, name in zip(pipeline.stages, networks):
        entry: dict[str, Any] = {"kind": stage.kind, "network": name, "sampler": dataclasses.asdict(stage.config),
                                 **stage_extras(stage)}
        stages.append(entry)
    doc = {"format": FORMAT, "stages": stages, "enhancement": dataclasses.asdict(pipeline.enhancement),
           "net_batch": pipeline.net_batch}
    return dumps_strict(doc, indent=2) + "\n"


def load_pretrained(folder: str | os.PathLike, device: torch.device | str = "cpu") -> RelayPipeline:
    """The pipeline of ``folder/pipeline.json``; errors name the file and the entry."""
    from relay_diffusion.checkpoints.loading import load_network_file

    folder = Path(folder)
    path = folder / FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a pipeline folder is written by `rdm export`)")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("stages"), list):
        raise ValueError(f"{path}: not a relay-diffusion pipeline file (format {FORMAT!r} with a list of stages)")
    stages = []
    for i, entry in enumerate(doc["stages"]):
        where = f"{path}: stage {i + 1}"
        if not isinstance(entry, dict) or entry.get("kind") not in ("edm", "relay", "sr") or "network" not in entry:
            raise ValueError(f"{where}: expected kind 'edm', 'relay' or 'sr' and a network file")
        file = load_network_file(folder / str(entry["network"]), device)
        if file.kind is not None and file.kind != entry["kind"]:
            raise ValueError(f"{where}: {file.path} is a {file.kind} network, not {entry['kind']}")
        if entry["kind"] == "edm":
            stages.append(EDMStage(file.net, _decode_config(EDMStageConfig, entry.get("sampler", {}), where),
                                   source=file.path))
        elif entry["kind"] == "sr":
            condition = (SRCondition.from_dict(entry["condition"]) if "condition" in entry
                         else file.condition or SRCondition())
            stages.append(SRStage(file.net, _decode_config(SRStageConfig, entry.get("sampler", {}), where),
                                  condition, source=file.path))
        else:
            process = BlurProcess.from_dict(entry["process"]) if "process" in entry else file.process or BlurProcess()
            stages.append(RelayStage(file.net, _decode_config(RelayStageConfig, entry.get("sampler", {}), where),
                                     process, source=file.path))
    enhancement = _decode_config(Enhancement, doc.get("enhancement", {}), f"{path}: enhancement")
    tf32 = accel.set_numerics(device, accel.network_precision(s.net for s in stages))
    return RelayPipeline(stages, enhancement=enhancement, net_batch=_net_batch(doc.get("net_batch"), path), tf32=tf32)


def _net_batch(value: Any, path: Path) -> int | None:
    """``net_batch`` of ``pipeline.json``: a positive integer, or null / absent for the automatic choice."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: net_batch must be a positive integer or null, got {value!r}")
    return value
