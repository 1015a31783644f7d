"""The relay pipeline: stages run in order with one generator per seed (docs/math.md §8).

A :class:`RelayPipeline` is a list of stages: an :class:`EDMStage` (or, for second-stage-only runs, a
:class:`RelayStage` fed with images) followed by :class:`RelayStage` s, e.g. 16 -> 64 -> 256 (or, for the
cascaded baseline, :class:`SRStage` s). Calling it
with seeds returns images that depend on their seed only: one generator per seed, shared by all stages in
draw order, and, on the CPU, a network that always sees batches of the same size (:class:`FixedBatchDenoiser`;
on CUDA one call per batch by default, so the last float bits may depend on the batch).
Every command that samples (``rdm generate``, ``rdm demo``, ``rdm smoke``, the training sample grids) goes
through :meth:`RelayPipeline.run`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.generation.configs import Enhancement
from relay_diffusion.generation.stages import (DEFAULT_NET_BATCH, Stage, auto_net_batch, check_stages, net_info,
                                               takes_input)
from relay_diffusion.utils import accel
from relay_diffusion.utils.images import to_uint8

#: ``None`` (``seed % label_dim``, the reference's choice), one class for all, one class per seed, or one-hot
#: ``[N, label_dim]``.
ClassLabels = Union[None, int, Sequence[int], torch.Tensor]
#: Called after every sampler step with the sampler's info dict plus ``stage`` (0-based).
StageCallback = Optional[Callable[[dict[str, Any]], None]]


class RelayPipeline:
    """Stages run in order with one generator per seed. ``pipeline(seeds)`` -> :class:`RelayOutput`.

    ``enhancement`` (post-processing) applies to the uint8 images only. ``net_batch``: samples per network
    call, see :class:`FixedBatchDenoiser`; None (the default) is 8 on the CPU, the whole batch elsewhere.
    ``tf32``: the TF32 setting the pipeline was loaded with (:func:`relay_diffusion.utils.accel.set_numerics`),
    recorded beside generated images; None when the loader left torch's setting alone.
    """

    def __init__(self, stages: Sequence[Stage], enhancement: Enhancement | None = None,
                 net_batch: int | None = DEFAULT_NET_BATCH, tf32: bool | None = None) -> None:
        check_stages(stages)
        self.stages = list(stages)
        self.enhancement = enhancement or Enhancement()
        self.net_batch = net_batch
        self.tf32 = tf32

    # --- properties --------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        net = self.stages[0].net
        tensor = next(iter(net.parameters()), None) if hasattr(net, "parameters") else None
        return tensor.device if tensor is not None else torch.device("cpu")

    @property
    def resolved_net_batch(self) -> int | None:
        """Samples per network call on this pipeline's device (None: the whole batch in one call)."""
        return auto_net_batch(self.net_batch, self.device)

    @property
    def fixed_shapes(self) -> bool:
        """Whether a compiled network must be kept on one batch shape: some stage's network is compiled and
        calls take the whole batch (accelerators; padded chunks of ``net_batch`` are one shape already).
        Then every network call of a stage is padded to the largest the stage makes (:meth:`stage_net_batch`)
        and :func:`~relay_diffusion.generation.run.generate_images` pads a short last batch of seeds."""
        return self.resolved_net_batch is None and any(accel.is_compiled(s.net) for s in self.stages)

    def stage_net_batch(self, stage: Stage, n: int, labels: torch.Tensor | None) -> int | None:
        """Samples per network call of ``stage`` for ``n`` seeds: ``net_batch``, except with
        :attr:`fixed_shapes`, where every call is padded to ``2n`` when guidance can apply in the stage (also
        outside its interval) and to ``n`` otherwise, so that a compiled network is never recompiled."""
        if not self.fixed_shapes:
            return self.net_batch
        return 2 * n if labels is not None and stage.config.cfg_scale > 1 else n

    @property
    def label_dim(self) -> int:
        return net_info(self.stages[0].net)[2]

    @property
    def resolution(self) -> int:
        return self.stages[-1].resolution

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` of the input images when the first stage refines inputs (relay, SR), else None."""
        first = self.stages[0]
        if not takes_input(first):
            return None
        channels = net_info(first.net)[1]
        return channels, first.input_resolution, first.input_resolution

    def to(self, device: torch.device | str) -> "RelayPipeline":
        """Move every stage's network to ``device`` (in place); returns the pipeline."""
        for stage in self.stages:
            if hasattr(stage.net, "to"):
                stage.net.to(device)
        return self

    # --- sampling ----------------------------------------------------------------------------------------
    def class_labels(self, seeds: Sequence[int], class_labels: ClassLabels = None) -> torch.Tensor | None:
        """One-hot ``[N, label_dim]``: of ``seed % label_dim`` by default (docs/math.md §8), of one class for
        all (an int), of one class per seed (a sequence) or as given (a tensor)."""
        label_dim, n = self.label_dim, len(seeds)
        if class_labels is None:
            if not label_dim:
                return None
            index = [s % label_dim for s in seeds]
        elif isinstance(class_labels, torch.Tensor) and class_labels.ndim == 2:
            if tuple(class_labels.shape) != (n, label_dim):
                raise ValueError(f"class_labels must have shape {(n, label_dim)}, got {tuple(class_labels.shape)}")
            return class_labels.to(self.device, torch.float32)
        else:
            index = [int(class_labels)] * n if isinstance(class_labels, (int, np.integer)) else [int(c) for c in class_labels]
            if not label_dim:
                raise ValueError(f"class {index[0] if index else ''} was given but the network is unconditional "
                                 "(label_dim 0)")
            if len(index) != n:
                raise ValueError(f"{len(index)} class labels for {n} seeds")
            bad = [c for c in index if not 0 <= c < label_dim]
            if bad:
                raise ValueError(f"class {bad[0]} is out of range: the network has {label_dim} classes")
        return torch.eye(label_dim, device=self.device)[torch.tensor(index, dtype=torch.long, device=self.device)]

    @torch.no_grad()
    def run(self, seeds: Sequence[int], class_labels: ClassLabels = None, inputs: torch.Tensor | None = None,
            callback: StageCallback = None) -> list[torch.Tensor]:
        """Every stage's float64 output ``[N, C, H, W]`` (about [-1, 1]) for ``seeds``, in stage order.

        ``inputs`` (``[N, C, h, w]`` in [-1, 1]) feed a pipeline that starts with a relay stage; its
        generators start fresh from the seeds. ``callback`` sees each sampler step (with ``stage``)."""
        seeds = [int(s) for s in seeds]
        expected = self.input_shape
        if expected is None and inputs is not None:
            raise ValueError("this pipeline starts with an EDM stage and takes no input images")
        if expected is not None:
            if inputs is None or tuple(inputs.shape) != (len(seeds), *expected):
                got = None if inputs is None else tuple(inputs.shape)
                raise ValueError(f"input images must have shape {(len(seeds), *expected)}, got {got}")
            inputs = inputs.to(self.device, torch.float64)
        rng = SeedGenerators(seeds, self.device)
        labels = self.class_labels(seeds, class_labels)
        outputs, x = [], inputs
        for i, stage in enumerate(self.stages):
            step = None if callback is None else (lambda info, i=i: callback({**info, "stage": i}))
            x = stage.sample(rng, labels, x, self.stage_net_batch(stage, len(seeds), labels), step)
            outputs.append(x)
        return outputs

    def __call__(self, seeds: Sequence[int], class_labels: ClassLabels = None, inputs: torch.Tensor | None = None,
                 callback: StageCallback = None) -> "RelayOutput":
        """Images for ``seeds`` (one per seed, each depending on its seed only) as a :class:`RelayOutput`:
        ``.images`` (PIL), ``.array`` (uint8 after the post-processing), ``.samples`` (float64). See :meth:`run`."""
        seeds = [int(s) for s in seeds]
        stages = self.run(seeds, class_labels, inputs, callback)
        return RelayOutput(seeds, stages[-1], stages, self.enhancement.apply(to_uint8(stages[-1])))

    # --- files ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: torch.device | str = "cpu") -> "RelayPipeline":
        """A pipeline saved by :meth:`save_pretrained` or ``rdm export`` (``folder/pipeline.json`` + networks)."""
        from relay_diffusion.generation.pretrained import load_pretrained

        return load_pretrained(folder, device)

    @classmethod
    def from_bundled(cls, device: torch.device | str = "cpu") -> "RelayPipeline":
        """The bundled tiny emoji models (16x16 -> 64x64) with their sampler defaults."""
        from relay_diffusion.checkpoints.bundled import ASSETS

        return cls.from_pretrained(ASSETS, device)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/pipeline.json`` and each stage's network (safetensors + JSON); returns the JSON path."""
        from relay_diffusion.generation.pretrained import save_pretrained

        return save_pretrained(self, folder)


@dataclass
class RelayOutput:
    """What a :class:`RelayPipeline` call returns."""

    seeds: list[int]
    samples: torch.Tensor                       # float64 [N, C, H, W], about [-1, 1], the last stage's output
    stages: list[torch.Tensor]                  # every stage's float64 output, in stage order
    array: np.ndarray                           # uint8 [N, H, W, C] (docs/math.md §8), after the post-processing

    @property
    def images(self) -> list[Any]:
        """The images as ``PIL.Image`` objects (RGB, or L for one channel)."""
        from PIL import Image

        return [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in self.array]

    def __len__(self) -> int:
        return len(self.seeds)
