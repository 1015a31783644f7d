"""Stages from network files: the stage kind is checked and a relay stage's forward process (a super-resolution
stage's condition) comes from its file.

A relay snapshot records the :class:`BlurProcess` it was trained with; generation uses it unless a setting is
given explicitly (then a note says where it differs from the training value). Files that record nothing
(reference checkpoints) take the preset's process, with the relay factor inferred from the resolutions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch

from relay_diffusion.checkpoints.loading import NetworkFile, load_network_file
from relay_diffusion.core.process import BlurProcess
from relay_diffusion.generation.configs import EDMStageConfig, Enhancement, RelayStageConfig, SRStageConfig
from relay_diffusion.generation.pipeline import RelayPipeline
from relay_diffusion.utils import accel
from relay_diffusion.generation.batching import DEFAULT_NET_BATCH
from relay_diffusion.generation.stages import EDMStage, RelayStage, SRStage, Stage, net_info


class StageFileError(ValueError):
    """A network file that cannot serve as the stage it was given for; ``index`` is the stage (0-based)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


@dataclass
class Built:
    """A pipeline and the notes worth telling the user (settings that override the files' values)."""

    pipeline: RelayPipeline
    notes: list[str] = field(default_factory=list)


def relay_process(file: NetworkFile, default: BlurProcess, overrides: Mapping[str, Any],
                  prev_resolution: Optional[int], label: str) -> tuple[BlurProcess, list[str]]:
    """The forward process to sample ``file`` with: the file's own, else ``default`` (with the relay factor
    inferred from ``prev_resolution`` when it divides the network's), then ``overrides`` (given settings)."""
    notes = []
    base = file.process
    if base is None:
        base = default
        res = net_info(file.net)[0]
        if "up_scale" not in overrides and prev_resolution and res % prev_resolution == 0:
            base = dataclasses.replace(base, up_scale=res // prev_resolution)
    process = dataclasses.replace(base, **dict(overrides))
    if file.process is not None:
        for k, (mine, trained) in process.differences(file.process).items():
            notes.append(f"{label}: {k} = {mine} overrides the value {trained} the network was trained with")
    return process, notes


def load_stage(file: NetworkFile, index: int, first: EDMStageConfig, relay: RelayStageConfig, *,
               as_relay: bool, default_process: BlurProcess, process_overrides: Mapping[str, Any],
               prev_resolution: Optional[int], sr: SRStageConfig | None = None) -> tuple[Stage, list[str]]:
    """One stage from a loaded file; refuses a stage-1 file as a relay (or super-resolution) stage and the
    reverse. ``as_relay``: the stage refines its input; a super-resolution file becomes an :class:`SRStage`
    sampled with ``sr``."""
    label = f"stage {index + 1} ({file.path})"
    if as_relay and file.kind == "edm":
        raise StageFileError(index, f"{file.path} is a stage-1 (EDM) network; it cannot be the relay stage {index + 1}")
    if not as_relay and file.kind in ("relay", "sr"):
        what = "relay (stage-2)" if file.kind == "relay" else "super-resolution"
        raise StageFileError(index, f"{file.path} is a {what} network; it cannot be stage 1")
    if not as_relay:
        return EDMStage(file.net, first, source=file.path), []
    if file.kind == "sr":
        return SRStage(file.net, sr or SRStageConfig(), file.condition, source=file.path), []
    process, notes = relay_process(file, default_process, process_overrides, prev_resolution, label)
    return RelayStage(file.net, relay, process, source=file.path), notes


def build_pipeline(
    paths: Sequence[str],
    *,
    first: EDMStageConfig | None = None,
    relay: RelayStageConfig | None = None,
    sr: SRStageConfig | None = None,
    first_is_relay: bool = False,
    default_process: BlurProcess | None = None,
    process_overrides: Mapping[str, Any] | None = None,
    enhancement: Enhancement | None = None,
    net_batch: int | None = DEFAULT_NET_BATCH,
    precision: str | None = None,
    device: torch.device | str = "cpu",
    compile: bool = False,
    channels_last: bool = False,
    tf32: bool | None = None,
) -> Built:
    """A :class:`RelayPipeline` from network files: ``paths[0]`` is stage 1 (or, with ``first_is_relay``, a
    relay stage fed with images), every later path a relay stage sampled with ``relay`` (a super-resolution
    network's file makes it a super-resolution stage sampled with ``sr``). ``process_overrides``
    (explicit forward-process settings) apply to every relay stage. Raises :class:`StageFileError` (a file)
    or ``ValueError`` (an incompatible chain). ``precision`` sets every network's precision (an explicit
    ``'bf16'`` also applies on the CPU); ``compile`` / ``channels_last``: :mod:`relay_diffusion.utils.accel`.
    ``tf32``: :func:`~relay_diffusion.utils.accel.set_numerics` (None: on when a network computes in fp16/bf16)."""
    first, relay = first or EDMStageConfig(), relay or RelayStageConfig()
    default_process = default_process or BlurProcess()
    stages: list[Stage] = []
    notes: list[str] = []
    prev_resolution = None
    for i, path in enumerate(paths):
        try:
            file = load_network_file(path, device)
        except (ValueError, OSError) as exc:
            raise StageFileError(i, str(exc)) from exc
        if precision is not None:
            if not hasattr(file.net, "precision"):
                raise StageFileError(i, f"{path}: this network has no precision setting")
            file.net.precision = precision
        accel.prepare_network(file.net, compile=compile, channels_last=channels_last,
                              cpu_bf16=precision == "bf16" and torch.device(device).type == "cpu")
        stage, stage_notes = load_stage(file, i, first, relay, as_relay=i > 0 or first_is_relay,
                                        default_process=default_process, process_overrides=process_overrides or {},
                                        prev_resolution=prev_resolution, sr=sr)
        stages.append(stage)
        notes += stage_notes
        prev_resolution = stage.resolution
    tf32 = accel.set_numerics(device, accel.network_precision(s.net for s in stages), tf32)
    return Built(RelayPipeline(stages, enhancement=enhancement, net_batch=net_batch, tf32=tf32), notes)
