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
from relay_diffusion.generation.batching import DEFAULT_NET_BATCH, auto_net_batch
from relay_diffusion.generation.stages import Stage, check_stages, net_info, takes_input
from relay_diffusion.utils import accel
from relay_diffusion.utils.dtypes import float32_default
from relay_diffusion.utils.images import to_uint8

#: ``None`` (``seed % label_dim``, the reference's choice), one class for all, one class per seed, or one-hot
#: ``[N, label_dim]``.
ClassLabels = Union[None, int, Sequence[int], torch.Tensor]
#: ``pipe.to(dtype)`` -> the networks' precision.
DTYPE_PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
#: What ``output_type`` asks ``pipe(...)`` for: PIL images, a float array in [0, 1] ``[N, H, W, C]``, or a float
#: tensor in [0, 1] ``[N, C, H, W]`` (diffusers' conventions).
OUTPUT_TYPES = ("pil", "np", "pt")
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
        self._progress_bar_config: dict[str, Any] = {}  # options of __call__'s tqdm bar

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
        :attr:`fixed_shapes`, where every call is padded to ``2n`` when classifier-free guidance can apply in
        the stage (also outside its interval) and to ``n`` otherwise (autoguidance calls its guide apart), so
        that a compiled network is never recompiled."""
        if not self.fixed_shapes:
            return self.net_batch
        return 2 * n if labels is not None and stage.config.cfg_scale > 1 and stage.guide is None else n

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

    def to(self, *args: Any, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "RelayPipeline":
        """Move every stage's network to ``device`` and/or set the dtype its layers compute in (in place, as
        diffusers' ``pipe.to("cuda", torch.float16)``); returns the pipeline.

        The weights stay float32 and the samplers float64; ``dtype`` float16 / bfloat16 is the networks'
        reduced precision (``--precision``): on CUDA, and bfloat16 also on the CPU."""
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        if dtype is not None and dtype not in DTYPE_PRECISIONS:
            raise ValueError(f"dtype must be one of {list(DTYPE_PRECISIONS)}, got {dtype}")
        for stage in self.stages:
            if device is not None and hasattr(stage.net, "to"):
                stage.net.to(device)
        if dtype is not None:
            precision = DTYPE_PRECISIONS[dtype]
            if self.device.type == "cpu" and precision == "fp16":
                raise ValueError("float16 networks run on CUDA only; on the CPU use torch.bfloat16")
            for stage in self.stages:
                for module in stage.net.modules():
                    if hasattr(module, "precision") and hasattr(module, "compute_dtype"):
                        module.precision = precision
                accel.allow_cpu_bf16(stage.net, enabled=precision == "bf16")
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the first stage's network computes in on this pipeline's device."""
        net = next((m for m in self.stages[0].net.modules() if hasattr(m, "compute_dtype")), None)
        if net is None:
            return torch.float32
        return net.compute_dtype(torch.empty(0, device=self.device))

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options of the tqdm bar of :meth:`__call__` (e.g. ``disable=True``), as in diffusers."""
        self._progress_bar_config = dict(kwargs)

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
            if class_labels.is_floating_point() and not bool(torch.isfinite(class_labels).all()):
                raise ValueError("class_labels must be finite (a NaN label makes every image of its sample NaN)")
            return class_labels.to(self.device, torch.float32)
        else:
            try:  # int(nan) and int(inf) raise; 3.7 is no class index either
                values = [class_labels] * n if isinstance(class_labels, (int, np.integer)) else list(class_labels)
                index = [int(c) for c in values]
                if any(int(c) != c for c in values):
                    raise ValueError
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"class labels must be whole class indices, got {class_labels!r}") from None
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
    @float32_default
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

    def __call__(self, seeds: Sequence[int] | None = None, class_labels: ClassLabels = None,
                 inputs: torch.Tensor | None = None, callback: StageCallback = None, *,
                 batch_size: int | None = None, generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 num_inference_steps: int | Sequence[int] | None = None,
                 guidance_scale: float | Sequence[float] | None = None, output_type: str = "pil",
                 return_dict: bool = True) -> "RelayOutput | tuple":
        """Images as a :class:`RelayOutput` (``.images`` as ``output_type`` asks), one per seed, each depending
        on its seed only. See :meth:`run`.

        The images are named by ``seeds`` (the reference's API), or, with diffusers' conventions, drawn from
        ``generator`` (one ``torch.Generator`` for all, or one per image: the same generator state gives the
        same images) or else from torch's global generator, ``batch_size`` of them (default: one per class
        label given, else one per generator, else 1). ``num_inference_steps`` and ``guidance_scale`` override
        the stages' sampler settings for this call (one value for every stage, or one per stage);
        ``output_type``: ``"pil"`` (PIL images), ``"np"`` (float ``[N, H, W, C]`` in [0, 1]) or ``"pt"`` (float
        tensor ``[N, C, H, W]`` in [0, 1]); ``return_dict=False`` returns ``(images,)``."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        seeds = self._call_seeds(seeds, class_labels, batch_size, generator)
        stages = self.stages
        try:
            self.stages = self._call_stages(num_inference_steps, guidance_scale)
            with self._progress_bar() as bar:
                def step(info: dict[str, Any]) -> None:
                    bar.set_description(f"stage {info['stage'] + 1}/{len(self.stages)}", refresh=False)
                    bar.update(1)
                    if callback is not None:
                        callback(info)

                outputs = self.run(seeds, class_labels, inputs, step)
        finally:
            self.stages = stages
        out = self.output(seeds, outputs, output_type)
        return out if return_dict else (out.images,)

    def output(self, seeds: Sequence[int], outputs: list[torch.Tensor], output_type: str = "pil") -> "RelayOutput":
        """The :class:`RelayOutput` of :meth:`run`'s ``outputs`` for ``seeds`` (the post-processing applied)."""
        return RelayOutput(list(seeds), outputs[-1], outputs, self.enhancement.apply(to_uint8(outputs[-1])),
                           output_type)

    def _call_seeds(self, seeds: Sequence[int] | None, class_labels: ClassLabels, batch_size: int | None,
                    generator: torch.Generator | Sequence[torch.Generator] | None) -> list[int]:
        """The seeds of a call: given, or drawn (one per image) from the generator(s) or torch's global one."""
        if seeds is not None:
            if batch_size is not None or generator is not None:
                raise ValueError("give seeds, or batch_size / generator, not both")
            return [int(s) for s in seeds]
        generators = list(generator) if isinstance(generator, (list, tuple)) else None
        if batch_size is None:
            if isinstance(class_labels, (list, tuple)) or (isinstance(class_labels, torch.Tensor)
                                                            and class_labels.ndim >= 1):
                batch_size = len(class_labels)
            else:
                batch_size = len(generators) if generators else 1
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if generators is not None and len(generators) != batch_size:
            raise ValueError(f"{len(generators)} generators for a batch of {batch_size}")
        draw = lambda g, n: torch.randint(0, 2**31 - 1, (n,), generator=g).tolist()  # noqa: E731
        if generators is not None:
            return [draw(g, 1)[0] for g in generators]
        return draw(generator, batch_size)

    def _call_stages(self, num_inference_steps: Any, guidance_scale: Any) -> list[Stage]:
        """Copies of the stages with this call's step counts and guidance scales (the pipeline keeps its own)."""
        import copy
        import dataclasses

        def per_stage(value: Any, name: str) -> list[Any]:
            if value is None or isinstance(value, (int, float)):
                return [value] * len(self.stages)
            values = list(value)
            if len(values) != len(self.stages):
                raise ValueError(f"{name}: {len(values)} values for {len(self.stages)} stages")
            return values

        out = []
        for stage, steps, scale in zip(self.stages, per_stage(num_inference_steps, "num_inference_steps"),
                                       per_stage(guidance_scale, "guidance_scale")):
            changes = {k: v for k, v in (("num_steps", steps), ("cfg_scale", scale)) if v is not None}
            if changes:
                stage = copy.copy(stage)
                stage.config = dataclasses.replace(stage.config, **changes).validate()
            out.append(stage)
        return out

    def _progress_bar(self) -> Any:
        import tqdm

        options = {"unit": "step", "leave": False, **self._progress_bar_config}
        return tqdm.tqdm(**options)

    # --- files ---------------------------------------------------------------------------------------------
    @classmethod
    @float32_default
    def from_pretrained(cls, folder: str | os.PathLike, device: torch.device | str = "cpu",
                        torch_dtype: torch.dtype | None = None) -> "RelayPipeline":
        """A pipeline saved by :meth:`save_pretrained` or ``rdm export`` (``folder/pipeline.json`` + networks);
        ``torch_dtype`` as in :meth:`to`."""
        from relay_diffusion.generation.pretrained import load_pretrained

        pipeline = cls(**load_pretrained(folder, device))
        return pipeline.to(dtype=torch_dtype) if torch_dtype is not None else pipeline

    @classmethod
    @float32_default
    def from_bundled(cls, device: torch.device | str = "cpu", torch_dtype: torch.dtype | None = None
                     ) -> "RelayPipeline":
        """The bundled tiny emoji models (16x16 -> 64x64) with their sampler defaults."""
        from relay_diffusion.checkpoints.bundled import ASSETS

        return cls.from_pretrained(ASSETS, device, torch_dtype)

    def save_pretrained(self, folder: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write ``folder/pipeline.json`` and each stage's network (safetensors + JSON); returns the JSON path.
        Nothing in ``folder`` changes unless every file was written; ``overwrite=False`` refuses to replace any."""
        from relay_diffusion.generation.pretrained import save_pretrained

        return save_pretrained(self, folder, overwrite=overwrite)


@dataclass
class RelayOutput:
    """What a :class:`RelayPipeline` call returns."""

    seeds: list[int]
    samples: torch.Tensor                       # float64 [N, C, H, W], about [-1, 1], the last stage's output
    stages: list[torch.Tensor]                  # every stage's float64 output, in stage order
    array: np.ndarray                           # uint8 [N, H, W, C] (docs/math.md §8), after the post-processing
    output_type: str = "pil"                    # what .images holds: "pil", "np" or "pt"

    @property
    def images(self) -> Any:
        """The images (those of the PNG files, post-processing included) as ``output_type`` asks: a list of
        ``PIL.Image`` (RGB, or L for one channel), a float32 array ``[N, H, W, C]`` in [0, 1], or a float32
        tensor ``[N, C, H, W]`` in [0, 1]."""
        if self.output_type == "np":
            return self.array.astype(np.float32) / 255
        if self.output_type == "pt":
            return torch.from_numpy(self.array.astype(np.float32) / 255).permute(0, 3, 1, 2)
        from PIL import Image

        return [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in self.array]

    def __len__(self) -> int:
        return len(self.seeds)
