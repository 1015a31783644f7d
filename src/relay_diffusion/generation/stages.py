"""Stages of a relay chain: stage 1 (EDM), relay stages (blur diffusion) and cascaded super-resolution stages
(an EDM stage conditioned on the upsampled input, the baseline relaying is measured against), and their
compatibility check.

A stage is one self-describing unit: its network, its sampler settings and, for a relay stage, the forward
process the network was trained on (:class:`BlurProcess`), for a super-resolution stage its
:class:`SRCondition`, both read from its file (:mod:`relay_diffusion.generation.build`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import torch
import torch.nn.functional as F

from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.core.registry import solver
from relay_diffusion.core.samplers import Callback
from relay_diffusion.core.sr import SRCondition, condition_input
from relay_diffusion.generation.batching import DEFAULT_NET_BATCH, FixedBatchDenoiser, carry_denoiser_attributes
from relay_diffusion.generation.configs import EDMStageConfig, RelayStageConfig, SRStageConfig

def net_info(net: Any) -> tuple[int, int, int]:
    """``(resolution, channels, label_dim)`` of a network (or a toy denoiser)."""
    return int(net.img_resolution), int(net.img_channels), int(getattr(net, "label_dim", 0))


class _StageBase:
    """What every stage derives from its network: the resolution it samples at."""

    @property
    def resolution(self) -> int:
        return net_info(self.net)[0]


class _RefiningStage(_StageBase):
    """A stage that refines a previous stage's output, ``up_scale`` times smaller."""

    @property
    def input_resolution(self) -> int:
        return self.resolution // self.up_scale


@dataclass
class EDMStage(_StageBase):
    """Stage 1: samples ``[N, C, R, R]`` from per-seed latents (docs/math.md §6a / §6b)."""

    net: Any
    config: EDMStageConfig = field(default_factory=EDMStageConfig)
    source: str | None = None                   # the network's file, for messages
    guide: Any = None                           # autoguidance (generation/guides.py), used when cfg_scale > 1
    guide_source: str | None = None             # its file, or "self-dropout"

    kind = "edm"

    def sample(self, rng: SeedGenerators, labels: torch.Tensor | None, inputs: torch.Tensor | None,
               net_batch: int | None = DEFAULT_NET_BATCH, callback: Callback = None) -> torch.Tensor:
        _, channels, _ = net_info(self.net)
        if inputs is not None:
            raise ValueError("a stage-1 (EDM) stage takes no input images")
        latents = rng.randn([channels, self.resolution, self.resolution])  # float32, like the reference
        sampler = solver("edm", self.config.solver).sampler
        return sampler(FixedBatchDenoiser(self.net, net_batch, guide=self.guide), latents, rng, labels, callback=callback,
                       **self.config.sampler_kwargs())


@dataclass
class RelayStage(_RefiningStage):
    """A relay stage: refines the nearest-upsampled ``[N, C, R/p, R/p]`` input into ``[N, C, R, R]``
    (docs/math.md §6c) under the forward process ``process`` its network was trained on."""

    net: Any
    config: RelayStageConfig = field(default_factory=RelayStageConfig)
    process: BlurProcess = field(default_factory=BlurProcess)
    source: str | None = None
    guide: Any = None
    guide_source: str | None = None

    kind = "relay"

    @property
    def up_scale(self) -> int:
        return self.process.up_scale

    def sample(self, rng: SeedGenerators, labels: torch.Tensor | None, inputs: torch.Tensor | None,
               net_batch: int | None = DEFAULT_NET_BATCH, callback: Callback = None) -> torch.Tensor:
        if inputs is None:
            raise ValueError("a relay stage needs input images (a previous stage's output, or inputs)")
        latents = F.interpolate(inputs.to(torch.float64), scale_factor=self.up_scale, mode="nearest")
        sampler = solver("relay", self.config.solver).sampler
        return sampler(FixedBatchDenoiser(self.net, net_batch, guide=self.guide), latents, rng, labels,
                       process=self.process, callback=callback, **self.config.sampler_kwargs())


@dataclass
class SRStage(_RefiningStage):
    """A cascaded super-resolution stage (:mod:`relay_diffusion.core.sr`): EDM sampling from pure noise at
    ``[N, C, R, R]``, conditioned on the nearest-upsampled ``[N, C, R/p, R/p]`` input (plus, with
    ``config.cond_level > 0``, noise of that level added to the input and the level told to the network).

    Draws per seed: the latents, then (``cond_level > 0``) the input's augmentation noise, then the sampler's."""

    net: Any
    config: SRStageConfig = field(default_factory=SRStageConfig)
    condition: SRCondition = field(default_factory=SRCondition)
    source: str | None = None
    guide: Any = None
    guide_source: str | None = None

    kind = "sr"

    @property
    def up_scale(self) -> int:
        return self.condition.up_scale

    def sample(self, rng: SeedGenerators, labels: torch.Tensor | None, inputs: torch.Tensor | None,
               net_batch: int | None = DEFAULT_NET_BATCH, callback: Callback = None) -> torch.Tensor:
        if inputs is None:
            raise ValueError("a super-resolution stage needs input images (a previous stage's output, or inputs)")
        _, channels, _ = net_info(self.net)
        latents = rng.randn([channels, self.resolution, self.resolution])
        low = inputs.to(torch.float32)
        level = torch.full([low.shape[0]], float(self.config.cond_level), device=low.device)
        eps = rng.randn(low.shape[1:]).to(low.device) if self.config.cond_level > 0 else None
        cond = condition_input(low, level, eps, self.up_scale)
        denoiser = FixedBatchDenoiser(self.net, net_batch, extra={"cond": cond, "cond_level": level}, guide=self.guide)
        sampler = solver("edm", self.config.solver).sampler
        return sampler(denoiser, latents, rng, labels, callback=callback, **self.config.sampler_kwargs())


Stage = Union[EDMStage, RelayStage, SRStage]
#: Display names of the stage kinds.
KIND_NAMES = {"edm": "EDM", "relay": "relay", "sr": "super-resolution"}


def stage_nfe(stage: Stage) -> int:
    """Denoiser evaluations per image of the stage with its sampler settings (a relay stage's grid after
    truncation depends on its network's noise levels), its guide's evaluations included."""
    nfe = stage.config.nfe(stage.net) if stage.kind == "relay" else stage.config.nfe()
    return nfe + guide_evaluations(stage)


class _Counter:
    """A stand-in network that counts its calls and returns zeros (see :func:`guide_evaluations`)."""

    def __init__(self, net: Any) -> None:
        carry_denoiser_attributes(net, self)
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: Any = None, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return torch.zeros_like(x)


def guide_evaluations(stage: Stage) -> int:
    """Guide evaluations per image: counted on one tiny sampling run with stand-in networks, since which steps
    the guidance interval covers depends on the solver's evaluation levels."""
    if stage.guide is None or stage.config.cfg_scale <= 1:
        return 0
    import copy

    counted = copy.copy(stage)
    counted.net, counted.guide = _Counter(stage.net), _Counter(stage.net)
    _, channels, label_dim = net_info(stage.net)
    labels = torch.zeros([1, label_dim]) if label_dim else None
    inputs = None
    if takes_input(stage):
        inputs = torch.zeros([1, channels, stage.input_resolution, stage.input_resolution], dtype=torch.float64)
    with torch.no_grad():
        counted.sample(SeedGenerators([0]), labels, inputs, net_batch=1)
    return counted.guide.calls


def stage_extras(stage: Stage) -> dict[str, Any]:
    """What the stage's network was trained with, as files record it: ``{"process": ...}`` for a relay
    stage, ``{"condition": ...}`` for a super-resolution stage, nothing for stage 1."""
    if isinstance(stage, RelayStage):
        return {"process": stage.process.to_dict()}
    if isinstance(stage, SRStage):
        return {"condition": stage.condition.to_dict()}
    return {}


def takes_input(stage: Stage) -> bool:
    """Whether the stage refines a previous stage's output (relay and super-resolution stages)."""
    return stage.kind in ("relay", "sr")


def stage_name(i: int, stage: Stage) -> str:
    res = stage.resolution
    where = f", {stage.source}" if stage.source else ""
    return f"stage {i + 1} ({KIND_NAMES[stage.kind]}, {res}x{res}{where})"


def check_stages(stages: Sequence[Stage]) -> None:
    """Raise one ``ValueError`` listing every incompatibility of a stage chain, before any sampling."""
    problems = []
    if not stages:
        problems.append("no stages")
    for i, stage in enumerate(stages):
        res, channels, label_dim = net_info(stage.net)
        name = stage_name(i, stage)
        try:
            stage.config.validate()
            if isinstance(stage, RelayStage):
                stage.process.validate()
            if isinstance(stage, SRStage):
                stage.condition.validate()
                if stage.config.cond_level > 0 and not getattr(stage.net, "level_channel", True):
                    raise ValueError(f"cond_level {stage.config.cond_level} needs a network trained with noise "
                                     "augmentation (noise_aug > 0); this one has no input for the level")
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
        if i > 0 and not takes_input(stage):
            problems.append(f"{name}: only the first stage may be an EDM stage")
        if takes_input(stage):
            p = stage.up_scale
            if res % p:
                problems.append(f"{name}: resolution {res} is not divisible by up_scale {p}")
        if i == 0:
            continue
        prev_res, prev_channels, prev_labels = net_info(stages[i - 1].net)
        if takes_input(stage) and prev_res * stage.up_scale != res:
            problems.append(f"{name}: resolution {res} != previous stage resolution {prev_res} x up_scale "
                            f"{stage.up_scale} = {prev_res * stage.up_scale}")
        if channels != prev_channels:
            problems.append(f"{name}: {channels} channels, previous stage has {prev_channels}")
        if label_dim != prev_labels:
            problems.append(f"{name}: label_dim {label_dim}, previous stage has {prev_labels}")
    if problems:
        raise ValueError("incompatible stages:\n  - " + "\n  - ".join(problems))
