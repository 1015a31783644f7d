"""A whole relay pipeline as one folder: ``pipeline.json`` names the stages, their sampler defaults and
forward processes, next to each stage's network (safetensors + JSON). Written by ``rdm export`` /
:meth:`RelayPipeline.save_pretrained`, read by :meth:`RelayPipeline.from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.sr import SRCondition
from relay_diffusion.generation.configs import EDMStageConfig, Enhancement, RelayStageConfig, SRStageConfig
from relay_diffusion.generation.stages import EDMStage, RelayStage, SRStage, stage_extras
from relay_diffusion.utils import accel
from relay_diffusion.utils.jsonio import dumps_strict
from relay_diffusion.utils.strict import decode

if TYPE_CHECKING:  # pipeline.py imports this module (lazily); a run-time import back would make a circle
    from relay_diffusion.generation.pipeline import RelayPipeline

FORMAT = "relay-diffusion/pipeline-1"
FILE = "pipeline.json"
#: Bounds on what a pipeline folder from elsewhere may ask for: the size of pipeline.json, the number of
#: stages, and the samples per network call (every call is padded to it, so it sizes the first allocation).
MAX_FILE_BYTES = 1 << 20
MAX_STAGES = 8
MAX_NET_BATCH = 4096
#: The keys pipeline.json and each of its stages may hold (a misspelt key is an error, not a silent default).
TOP_KEYS = frozenset({"format", "stages", "enhancement", "net_batch"})
STAGE_KEYS = frozenset({"kind", "network", "sampler", "process", "condition", "guide"})


def _decode_config(cls: type, d: Any, where: str) -> Any:
    """A sampler or enhancement config of ``pipeline.json`` (strict: :func:`relay_diffusion.utils.strict.decode`;
    the noise-level bounds may be ``"inf"``)."""
    floats = [f.name for f in dataclasses.fields(cls) if "float" in str(f.type)]
    return decode(cls, d, where, non_finite=floats)


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


def save_pretrained(pipeline: "RelayPipeline", folder: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write every stage's network and ``pipeline.json`` into ``folder``; returns the JSON's path.

    Everything is written into a temporary folder beside ``folder`` first and moved in only when complete, so
    a failure (a full disk, say) leaves ``folder`` as it was. Only the pipeline's own files are replaced; other
    files in ``folder`` stay. ``overwrite=False`` refuses, before writing anything, when any of them exists."""
    import shutil
    import tempfile

    from relay_diffusion.checkpoints.snapshot import read_config, save_network
    from relay_diffusion.utils.fileio import atomic_write_text

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    names = [f"stage{i + 1}-{stage.resolution}x{stage.resolution}" for i, stage in enumerate(pipeline.stages)]
    guides = {i: f"{names[i]}-guide" for i, stage in enumerate(pipeline.stages) if _guide_file(stage)}
    ours = [FILE] + [f"{n}{ext}" for n in names + list(guides.values()) for ext in (".safetensors", ".json")]
    existing = [n for n in ours if (folder / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{folder} already holds {', '.join(existing)} (overwrite to replace them)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for stage, name in zip(pipeline.stages, names):
            extra: dict[str, Any] = {}
            if stage.source and str(stage.source).endswith(".safetensors"):
                extra = {k: v for k, v in read_config(stage.source).items()
                         if k not in ("format", "precond", "init_kwargs")}
            extra["stage_kind"] = stage.kind
            for key, value in stage_extras(stage).items():
                extra.setdefault(key, value)  # the training value when the file had one
            save_network(stage.net, tmp / f"{name}.safetensors", extra=extra, dtype=_network_dtype(stage.source))
        for i, name in guides.items():
            guide = pipeline.stages[i]
            save_network(guide.guide, tmp / f"{name}.safetensors", extra={"stage_kind": guide.kind,
                                                                           **stage_extras(guide)},
                         dtype=_network_dtype(guide.guide_source))
        atomic_write_text(tmp / FILE, pipeline_json(pipeline, [f"{n}.safetensors" for n in names],
                                                    {i: f"{n}.safetensors" for i, n in guides.items()}))
        folder.mkdir(exist_ok=True)
        for name in ours[1:] + ours[:1]:  # renames within one file system; pipeline.json last
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / FILE


def _guide_file(stage: Any) -> bool:
    """Whether the stage's autoguidance guide is a network of its own (saved beside the stage's)."""
    from relay_diffusion.generation.guides import SELF_DROPOUT

    return stage.guide is not None and stage.guide_source != SELF_DROPOUT


def pipeline_json(pipeline: "RelayPipeline", networks: list[str], guides: dict[int, str] | None = None) -> str:
    """The text of ``pipeline.json`` for ``pipeline`` whose stages' networks are the files ``networks`` (and
    whose guides, by stage index, ``guides``; a self-dropout guide is recorded by name)."""
    from relay_diffusion.generation.guides import SELF_DROPOUT

    stages = []
    for i, (stage, name) in enumerate(zip(pipeline.stages, networks)):
        entry: dict[str, Any] = {"kind": stage.kind, "network": name, "sampler": dataclasses.asdict(stage.config),
                                 **stage_extras(stage)}
        if stage.guide is not None:
            entry["guide"] = SELF_DROPOUT if stage.guide_source == SELF_DROPOUT else (guides or {})[i]
        stages.append(entry)
    doc = {"format": FORMAT, "stages": stages, "enhancement": dataclasses.asdict(pipeline.enhancement),
           "net_batch": pipeline.net_batch}
    return dumps_strict(doc, indent=2) + "\n"


def load_pretrained(folder: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, Any]:
    """What ``folder/pipeline.json`` describes, as the keyword arguments of :class:`RelayPipeline` (``stages``,
    ``enhancement``, ``net_batch``); errors name the file and the entry."""
    from relay_diffusion.checkpoints.loading import load_network_file

    folder = Path(folder)
    path = folder / FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a pipeline folder is written by `rdm export`)")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, more than a pipeline file holds ({MAX_FILE_BYTES})")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ValueError(f"{path}: not valid JSON ({reason})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("stages"), list):
        raise ValueError(f"{path}: not a relay-diffusion pipeline file (format {FORMAT!r} with a list of stages)")
    _known_keys(doc, TOP_KEYS, str(path))
    if not 1 <= len(doc["stages"]) <= MAX_STAGES:
        raise ValueError(f"{path}: {len(doc['stages'])} stages; a pipeline has 1 to {MAX_STAGES}")
    stages = []
    for i, entry in enumerate(doc["stages"]):
        where = f"{path}: stage {i + 1}"
        if not isinstance(entry, dict) or entry.get("kind") not in ("edm", "relay", "sr") or "network" not in entry:
            raise ValueError(f"{where}: expected kind 'edm', 'relay' or 'sr' and a network file")
        _known_keys(entry, STAGE_KEYS, where)
        file = load_network_file(_inside(folder, entry["network"], where), device)
        if file.kind is not None and file.kind != entry["kind"]:
            raise ValueError(f"{where}: {file.path} is a {file.kind} network, not {entry['kind']}")
        if entry["kind"] == "edm":
            stages.append(EDMStage(file.net, _decode_config(EDMStageConfig, entry.get("sampler", {}), where),
                                   source=file.path))
        elif entry["kind"] == "sr":
            condition = (SRCondition.from_dict(entry["condition"], f"{where}: condition") if "condition" in entry
                         else file.condition or SRCondition())
            stages.append(SRStage(file.net, _decode_config(SRStageConfig, entry.get("sampler", {}), where),
                                  condition, source=file.path))
        else:
            process = (BlurProcess.from_dict(entry["process"], f"{where}: process") if "process" in entry
                       else file.process or BlurProcess())
            stages.append(RelayStage(file.net, _decode_config(RelayStageConfig, entry.get("sampler", {}), where),
                                     process, source=file.path))
        if "guide" in entry:
            _attach_guide(stages[-1], entry["guide"], folder, where, device)
    enhancement = _decode_config(Enhancement, doc.get("enhancement", {}), f"{path}: enhancement")
    tf32 = accel.set_numerics(device, accel.network_precision(s.net for s in stages))
    return {"stages": stages, "enhancement": enhancement, "net_batch": _net_batch(doc.get("net_batch"), path),
            "tf32": tf32}


def _attach_guide(stage: Any, guide: Any, folder: Path, where: str, device: torch.device | str) -> None:
    """A stage's ``guide`` entry: ``"self-dropout"`` or a network file of the folder (of the stage's kind)."""
    from relay_diffusion.generation.guides import SELF_DROPOUT, load_guide

    spec = SELF_DROPOUT if guide == SELF_DROPOUT else str(_inside(folder, guide, f"{where}: guide"))
    try:
        stage.guide, stage.guide_source = load_guide(spec, stage, device)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{where}: guide: {exc}") from None


def _net_batch(value: Any, path: Path) -> int | None:
    """``net_batch`` of ``pipeline.json``: an integer from 1 to :data:`MAX_NET_BATCH`, or null / absent for the
    automatic choice."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NET_BATCH:
        raise ValueError(f"{path}: net_batch must be an integer from 1 to {MAX_NET_BATCH} or null, got {value!r}")
    return value


def _known_keys(entry: dict, known: frozenset[str], where: str) -> None:
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(known)}")


def _inside(folder: Path, name: Any, where: str) -> Path:
    """The stage file ``name`` of a pipeline folder: a relative path that stays inside the folder (after
    following links), never an absolute path or one that leaves it with ``..``."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{where}: the network must be a file name in the pipeline folder, got {name!r}")
    path = folder / name
    root = folder.resolve()
    if Path(name).is_absolute() or not path.resolve().is_relative_to(root):
        raise ValueError(f"{where}: the network {name!r} is outside the pipeline folder {folder}; a pipeline "
                         "folder only reads its own files")
    return path
