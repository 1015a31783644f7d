"""Relay generation (SPEC 6, 8, 9): a stage-1 EDM sampler relayed into one or more blur-diffusion stages.

A :class:`RelayPipeline` is a list of stages: an :class:`EDMStage` (or, for second-stage-only runs, a
:class:`RelayStage` fed with images) followed by :class:`RelayStage` s, e.g. 16 -> 64 -> 256. Calling it
with seeds returns images that depend on their seed only (SPEC 8): one generator per seed, shared by all
stages in draw order, and a network that always sees batches of the same size (:class:`FixedBatchDenoiser`).
:func:`generate_images` adds files, resuming and progress; ``rdm generate`` is a thin wrapper around it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from relay_diffusion.utils.images import from_uint8, save_grid, save_png, to_uint8
from relay_diffusion.core.rng import SeedGenerators, parse_int_list
from relay_diffusion.core.samplers import Callback, edm_sampler, relay_sampler

#: Samples per network call. Every call is padded to exactly this size so that a sample's result never
#: depends on how many samples share its batch: CPU and GPU kernels pick different code paths (and
#: summation orders) for different batch sizes, which changes results in the last float bits.
DEFAULT_NET_BATCH = 8


# ----------------------------------------------------------------------------------------------------------
# Configs (SPEC 6, 9)


@dataclass
class EDMStageConfig:
    """Stage-1 sampler settings: EDM's Heun sampler (SPEC 6a), or its SDE variant when ``sde_scale`` is set (6b)."""

    num_steps: int = 18                         # N, time steps
    sigma_min: float = 0.002                    # lowest noise level (clipped to the network's range)
    sigma_max: float = 80.0                     # highest noise level
    rho: float = 7.0                            # time step exponent
    cfg_scale: float = 1.0                      # classifier-free guidance; > 1 enables it (not with sde_scale)
    S_churn: float = 0.0                        # stochasticity strength
    S_min: float = 0.0                          # churn only for S_min <= t <= S_max
    S_max: float = math.inf
    S_noise: float = 1.0                        # churn noise inflation
    sde_scale: float | None = None              # g = sde_scale * t_next (SPEC 6b); None = Heun steps

    def validate(self, suffix: str = "") -> None:
        """Raise ``ValueError`` naming the setting (``suffix`` is appended, e.g. ``'_first'``)."""
        _check(self.num_steps >= 1, f"num_steps{suffix} must be >= 1, got {self.num_steps}")
        _check(0 < self.sigma_min < self.sigma_max, f"need 0 < sigma_min{suffix} < sigma_max{suffix}, "
               f"got {self.sigma_min}, {self.sigma_max}")
        _check(self.rho > 0, f"rho{suffix} must be > 0, got {self.rho}")
        _check(self.sde_scale is None or 0 <= self.sde_scale < 1, f"sde_scale{suffix} must be in [0, 1)")
        _check(self.sde_scale is None or self.cfg_scale <= 1,
               f"cfg_scale{suffix} > 1 is not available with sde_scale{suffix} (SPEC 6b has no guidance)")

    def sampler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`relay_diffusion.core.samplers.edm_sampler`."""
        kwargs = dataclasses.asdict(self)
        if self.sde_scale is not None:
            kwargs["cfg_scale"] = 1.0
        return kwargs


@dataclass
class RelayStageConfig:
    """Relay (blur diffusion) sampler settings (SPEC 6c); ``churn`` selects the CelebA-HQ variant."""

    up_scale: int = 4                           # relay factor p: resolution of this stage / previous stage
    num_steps: int = 18                         # grid size before truncation
    sigma_min: float = 0.008
    sigma_max: float = 80.0
    rho: float = 7.0
    blur_sigma_max: float = 3.0                 # blur strength at the start of the blur schedule
    truncation_sigma: float = 0.9               # start at the first grid level below this
    truncation_t: float = 0.93                  # time-schedule truncation of the blur
    s_block: float = 0.15                       # block-noise strength (SPEC 4)
    s_noise: float = 0.2                        # stochasticity of the steps
    cfg_scale: float = 1.0
    churn: bool = False                         # EDM-style churn before every network call
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0

    def validate(self, suffix: str = "") -> None:
        _check(self.up_scale >= 1, f"up_scale{suffix} must be >= 1, got {self.up_scale}")
        _check(self.num_steps >= 1, f"num_steps{suffix} must be >= 1, got {self.num_steps}")
        _check(0 < self.sigma_min < self.sigma_max, f"need 0 < sigma_min{suffix} < sigma_max{suffix}, "
               f"got {self.sigma_min}, {self.sigma_max}")
        _check(self.truncation_sigma > 0, f"truncation_sigma{suffix} must be > 0")
        _check(self.truncation_t > 0, f"truncation_t{suffix} must be > 0")
        _check(0 <= self.s_noise <= 1, f"s_noise{suffix} must be in [0, 1], got {self.s_noise}")

    def sampler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`relay_diffusion.core.samplers.relay_sampler`."""
        return dataclasses.asdict(self)


@dataclass
class Enhancement:
    """PIL ``ImageEnhance`` post-processing, applied in the reference's order: contrast, brightness, colour.

    The published FIDs were computed on images processed this way (SPEC 9); all factors 1 = off.
    """

    contrast: float = 1.0
    brightness: float = 1.0
    color: float = 1.0

    @property
    def enabled(self) -> bool:
        return (self.contrast, self.brightness, self.color) != (1.0, 1.0, 1.0)

    def apply(self, images: np.ndarray) -> np.ndarray:
        """``[N, H, W, C]`` uint8 -> ``[N, H, W, C]`` uint8."""
        if not self.enabled:
            return images
        from PIL import Image, ImageEnhance

        out = []
        for a in images:
            img = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a, "L" if a.shape[2] == 1 else "RGB")
            for enhancer, factor in ((ImageEnhance.Contrast, self.contrast),
                                     (ImageEnhance.Brightness, self.brightness), (ImageEnhance.Color, self.color)):
                if factor != 1.0:
                    img = enhancer(img).enhance(factor)
            out.append(np.asarray(img).reshape(a.shape))
        return np.stack(out)


@dataclass
class Preset:
    """The settings of one of the reference's generation scripts (SPEC 9)."""

    seeds: str
    first: EDMStageConfig
    second: RelayStageConfig
    enhancement: Enhancement = field(default_factory=Enhancement)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, Preset] = {
    # generate.py
    "default": Preset(seeds="0-63", first=EDMStageConfig(), second=RelayStageConfig()),
    # generate_imagenet.py: ImageNet 256x256, class-conditional, FID 1.87
    "imagenet256": Preset(
        seeds="10000-59999",
        first=EDMStageConfig(num_steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003),
        second=RelayStageConfig(num_steps=200, rho=100, cfg_scale=3.5),
        enhancement=Enhancement(brightness=1.06),
    ),
    # generate_celebahq.py: CelebA-HQ 256x256, FID 3.15
    "celebahq256": Preset(
        seeds="80000-109999",
        first=EDMStageConfig(num_steps=120, sde_scale=0.05),
        second=RelayStageConfig(num_steps=150, truncation_sigma=0.95, truncation_t=1.05, blur_sigma_max=2.0,
                                churn=True),
        enhancement=Enhancement(contrast=0.9, brightness=1.05, color=0.99),
    ),
}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# ----------------------------------------------------------------------------------------------------------
# Stages


class FixedBatchDenoiser:
    """Calls ``net`` on chunks of exactly ``net_batch`` samples (the last one padded with copies of its
    last sample), so a sample's result does not depend on the batch it arrives in.

    This is exact when the kernels compute a sample alike at every position of a batch of fixed size:
    always for ``net_batch = 1``; for the CPU GEMMs measured here, for multiples of 4 (other batch sizes
    give position-dependent last bits). Other hardware is not guaranteed: use ``net_batch = 1`` to be sure.
    """

    def __init__(self, net: Callable, net_batch: int = DEFAULT_NET_BATCH) -> None:
        if net_batch < 1:
            raise ValueError(f"net_batch must be >= 1, got {net_batch}")
        self.net, self.net_batch = net, net_batch
        self.sigma_min = getattr(net, "sigma_min", 0.0)
        self.sigma_max = getattr(net, "sigma_max", math.inf)
        if hasattr(net, "round_sigma"):
            self.round_sigma = net.round_sigma

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``x [N, C, H, W]``, ``sigma [N]``, ``class_labels [N, L]`` or None -> ``[N, C, H, W]``."""
        k, n = self.net_batch, x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(n)
        outs = []
        for start in range(0, n, k):
            index = torch.arange(start, start + k, device=x.device).clamp(max=n - 1)
            labels = None if class_labels is None else class_labels[index]
            outs.append(self.net(x[index], sigma[index], labels)[: min(k, n - start)])
        return torch.cat(outs)


def _net_info(net: Any) -> tuple[int, int, int]:
    return int(net.img_resolution), int(net.img_channels), int(getattr(net, "label_dim", 0))


@dataclass
class EDMStage:
    """Stage 1: samples ``[N, C, R, R]`` from per-seed latents (SPEC 6a / 6b)."""

    net: Any
    config: EDMStageConfig = field(default_factory=EDMStageConfig)

    @property
    def resolution(self) -> int:
        return _net_info(self.net)[0]

    def sample(self, rng: SeedGenerators, labels: torch.Tensor | None, inputs: torch.Tensor | None,
               net_batch: int = DEFAULT_NET_BATCH, callback: Callback = None) -> torch.Tensor:
        _, channels, _ = _net_info(self.net)
        if inputs is not None:
            raise ValueError("a stage-1 (EDM) stage takes no input images")
        latents = rng.randn([channels, self.resolution, self.resolution])  # float32, like the reference
        return edm_sampler(FixedBatchDenoiser(self.net, net_batch), latents, rng, labels,
                           callback=callback, **self.config.sampler_kwargs())


@dataclass
class RelayStage:
    """A relay stage: refines the nearest-upsampled ``[N, C, R/p, R/p]`` input into ``[N, C, R, R]`` (SPEC 6c)."""

    net: Any
    config: RelayStageConfig = field(default_factory=RelayStageConfig)

    @property
    def resolution(self) -> int:
        return _net_info(self.net)[0]

    @property
    def input_resolution(self) -> int:
        return self.resolution // self.config.up_scale

    def sample(self, rng: SeedGenerators, labels: torch.Tensor | None, inputs: torch.Tensor | None,
               net_batch: int = DEFAULT_NET_BATCH, callback: Callback = None) -> torch.Tensor:
        if inputs is None:
            raise ValueError("a relay stage needs input images (a previous stage's output or --indir)")
        latents = F.interpolate(inputs.to(torch.float64), scale_factor=self.config.up_scale, mode="nearest")
        return relay_sampler(FixedBatchDenoiser(self.net, net_batch), latents, rng, labels,
                             callback=callback, **self.config.sampler_kwargs())


Stage = Union[EDMStage, RelayStage]


def check_stages(stages: Sequence[Stage]) -> None:
    """Raise one ``ValueError`` listing every incompatibility of a stage chain, before any sampling."""
    problems = []
    if not stages:
        problems.append("no stages")
    for i, stage in enumerate(stages):
        res, channels, label_dim = _net_info(stage.net)
        name = f"stage {i + 1} ({type(stage).__name__}, {res}x{res})"
        try:
            stage.config.validate()
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
        if i > 0 and not isinstance(stage, RelayStage):
            problems.append(f"{name}: only the first stage may be an EDM stage")
        if isinstance(stage, RelayStage):
            p = stage.config.up_scale
            if res % p:
                problems.append(f"{name}: resolution {res} is not divisible by up_scale {p}")
        if i == 0:
            continue
        prev_res, prev_channels, prev_labels = _net_info(stages[i - 1].net)
        if isinstance(stage, RelayStage) and prev_res * stage.config.up_scale != res:
            problems.append(f"{name}: resolution {res} != previous stage resolution {prev_res} x up_scale "
                            f"{stage.config.up_scale} = {prev_res * stage.config.up_scale}")
        if channels != prev_channels:
            problems.append(f"{name}: {channels} channels, previous stage has {prev_channels}")
        if label_dim != prev_labels:
            problems.append(f"{name}: label_dim {label_dim}, previous stage has {prev_labels}")
    if problems:
        raise ValueError("incompatible stages:\n  - " + "\n  - ".join(problems))


class RelayPipeline:
    """Stages run in order with one generator per seed (SPEC 8). ``pipeline(seeds)`` -> images.

    ``enhancement`` applies to ``output='uint8'`` only. ``net_batch``: see :class:`FixedBatchDenoiser`.
    """

    def __init__(self, stages: Sequence[Stage], enhancement: Enhancement | None = None,
                 net_batch: int = DEFAULT_NET_BATCH) -> None:
        check_stages(stages)
        self.stages = list(stages)
        self.enhancement = enhancement or Enhancement()
        self.net_batch = net_batch

    @property
    def device(self) -> torch.device:
        net = self.stages[0].net
        tensor = next(iter(net.parameters()), None) if hasattr(net, "parameters") else None
        return tensor.device if tensor is not None else torch.device("cpu")

    @property
    def label_dim(self) -> int:
        return _net_info(self.stages[0].net)[2]

    @property
    def resolution(self) -> int:
        return self.stages[-1].resolution

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` of the input images when the first stage is a relay stage, else None."""
        first = self.stages[0]
        if not isinstance(first, RelayStage):
            return None
        channels = _net_info(first.net)[1]
        return channels, first.input_resolution, first.input_resolution

    def class_labels(self, seeds: Sequence[int], class_idx: int | None = None) -> torch.Tensor | None:
        """One-hot ``[N, label_dim]`` of ``seed % label_dim``, or of ``class_idx`` for all (SPEC 8)."""
        label_dim = self.label_dim
        if class_idx is not None and not label_dim:
            raise ValueError(f"class {class_idx} was given but the network is unconditional (label_dim 0)")
        if class_idx is not None and not 0 <= class_idx < label_dim:
            raise ValueError(f"class {class_idx} is out of range: the network has {label_dim} classes")
        if not label_dim:
            return None
        index = torch.tensor([class_idx if class_idx is not None else s % label_dim for s in seeds])
        return torch.eye(label_dim, device=self.device)[index.to(self.device)]

    @torch.no_grad()
    def __call__(self, seeds: Sequence[int], class_idx: int | None = None, inputs: torch.Tensor | None = None,
                 output: str = "float") -> torch.Tensor | np.ndarray:
        """Images for ``seeds``: ``output='float'`` -> float64 ``[N, C, H, W]`` in about [-1, 1];
        ``'uint8'`` -> ``[N, H, W, C]`` uint8 after the enhancement. ``inputs`` (``[N, C, h, w]`` in [-1, 1])
        feed a pipeline that starts with a relay stage; its generators start fresh from the seeds."""
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
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
        labels = self.class_labels(seeds, class_idx)
        x = inputs
        for stage in self.stages:
            x = stage.sample(rng, labels, x, self.net_batch)
        if output == "float":
            return x
        return self.enhancement.apply(to_uint8(x))


# ----------------------------------------------------------------------------------------------------------
# Files (SPEC 8)


def image_path(outdir: str | os.PathLike, seed: int, subdirs: bool = False) -> Path:
    """``outdir/{seed:06d}.png``, or ``outdir/{seed - seed % 1000:06d}/{seed:06d}.png`` with ``subdirs``."""
    outdir = Path(outdir)
    return (outdir / f"{seed - seed % 1000:06d}" if subdirs else outdir) / f"{seed:06d}.png"


def find_image(indir: str | os.PathLike, seed: int) -> Path | None:
    """The stage input for ``seed`` in the reference's layout (thousands sub-folders) or flat, else None."""
    for subdirs in (True, False):
        path = image_path(indir, seed, subdirs)
        if path.is_file():
            return path
    return None


def check_images(indir: str | os.PathLike, seeds: Sequence[int]) -> None:
    """Raise one ``FileNotFoundError`` listing every seed whose input image is missing from ``indir``."""
    missing = [str(image_path(indir, s, True)) for s in seeds if find_image(indir, s) is None]
    if missing:
        raise FileNotFoundError(f"{len(missing)} input image(s) missing from {indir} (looked for "
                                f"<thousands>/<seed>.png and <seed>.png):\n  " + "\n  ".join(missing))


def load_images(indir: str | os.PathLike, seeds: Sequence[int]) -> torch.Tensor:
    """Read the PNGs of ``seeds`` from ``indir`` as float64 ``[N, C, H, W]``: ``v / 127.5 - 1`` (SPEC 8).
    Every missing file is listed in one ``FileNotFoundError``."""
    from PIL import Image

    check_images(indir, seeds)
    paths = {s: find_image(indir, s) for s in seeds}
    images = []
    for seed, path in paths.items():
        with Image.open(path) as img:
            images.append(from_uint8(np.asarray(img)))
    shapes = {tuple(x.shape[1:]) for x in images}
    if len(shapes) > 1:
        raise ValueError(f"input images in {indir} have different shapes: {sorted(shapes)}")
    return torch.cat(images)


def save_images(images: np.ndarray, seeds: Sequence[int], outdir: str | os.PathLike, subdirs: bool = False) -> list[Path]:
    """Write ``[N, H, W, C]`` uint8 images as ``{seed:06d}.png`` (atomically; see :func:`image_path`)."""
    paths = []
    for seed, image in zip(seeds, images):
        paths.append(image_path(outdir, seed, subdirs))
        save_png(image, paths[-1])
    return paths


def rank_batches(seeds: Sequence[int], max_batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The reference's split of ``seeds`` into batches, every ``world_size``-th batch for process ``rank``."""
    seeds = list(seeds)
    if not seeds:
        return []
    num_batches = ((len(seeds) - 1) // (max_batch_size * world_size) + 1) * world_size
    batches = [b.tolist() for b in torch.as_tensor(seeds).tensor_split(num_batches)]
    return [b for b in batches[rank::world_size] if b]


def generate_images(
    pipeline: RelayPipeline,
    seeds: Sequence[int],
    outdir: str | os.PathLike,
    *,
    max_batch_size: int = 64,
    class_idx: int | None = None,
    indir: str | os.PathLike | None = None,
    subdirs: bool = False,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> list[Path]:
    """Generate and save this process's share of ``seeds``; seeds whose PNG exists are skipped unless
    ``overwrite``. Files do not depend on ``max_batch_size`` or ``world_size``. Returns the written paths."""
    from tqdm import tqdm

    mine = [s for batch in rank_batches(seeds, max_batch_size, rank, world_size) for s in batch]
    todo = [s for s in mine if overwrite or not image_path(outdir, s, subdirs).is_file()]
    if pipeline.input_shape is not None:
        if indir is None:
            raise ValueError("the pipeline starts with a relay stage: give the input folder (--indir)")
        check_images(indir, seeds)  # all seeds, so that every process stops alike before sampling
    written: list[Path] = []
    with tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), max_batch_size):
            batch = todo[start : start + max_batch_size]
            inputs = load_images(indir, batch) if pipeline.input_shape is not None else None
            images = pipeline(batch, class_idx=class_idx, inputs=inputs, output="uint8")
            written += save_images(images, batch, outdir, subdirs)
            bar.update(len(batch))
    return written


def save_seed_grid(outdir: str | os.PathLike, seeds: Sequence[int], subdirs: bool = False,
                   path: str | os.PathLike | None = None, max_images: int = 256) -> Path:
    """One grid PNG (default ``outdir/grid.png``) of the saved images of the first ``max_images`` seeds."""
    from PIL import Image

    images = []
    for seed in list(seeds)[:max_images]:
        with Image.open(image_path(outdir, seed, subdirs)) as img:
            a = np.asarray(img)
        images.append(a[:, :, None] if a.ndim == 2 else a)
    return save_grid(np.stack(images), path or Path(outdir) / "grid.png")


def preset_seeds(preset: str) -> list[int]:
    return parse_int_list(PRESETS[preset].seeds)
