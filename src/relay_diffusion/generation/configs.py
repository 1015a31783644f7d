"""Sampler settings of the stages and the reference's presets (docs/math.md §6, §9).

Every knob is one dataclass field with its help text (``metadata['help']``); the command-line options of
``rdm generate`` are derived from these fields (:mod:`relay_diffusion.cli.options`). The stage-2 forward
process is not a sampler setting: it belongs to the network and lives in :class:`BlurProcess`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.registry import nfe_first, nfe_second, solver, solver_help, solver_names

__all__ = ["EDMStageConfig", "SRStageConfig", "RelayStageConfig", "Enhancement", "Preset", "PRESETS", "knob"]


def knob(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its help text (and optional CLI metadata such as ``min``)."""
    return field(default=default, metadata={"help": help, **metadata})


def _names(names: Mapping[str, str] | None, suffix: str) -> Any:
    return lambda k: (names or {}).get(k, f"{k}{suffix}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _interval(value: Any) -> Optional[tuple[float, float]]:
    return None if value is None else (float(value[0]), float(value[1]))


def _check_interval(name: str, value: Any) -> None:
    if value is None:
        return
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    _check(ok and 0 <= value[0] < value[1] and not math.isnan(value[1]),
           f"{name} must be two noise levels LO,HI with 0 <= LO < HI, got {value}")


def _check_common(n: Any, cfg: Any) -> None:
    """The checks both stages' sampler settings share: the grid, guidance scale and churn strength."""
    _check(isinstance(cfg.num_steps, int) and 1 <= cfg.num_steps <= 100_000,
           f"{n('num_steps')} must be an integer in [1, 100000], got {cfg.num_steps}")
    _finite_positive(n, cfg, "sigma_min", "sigma_max")
    _check(cfg.sigma_min < cfg.sigma_max, f"need {n('sigma_min')} < {n('sigma_max')}, got {cfg.sigma_min}, "
           f"{cfg.sigma_max}")
    _check(math.isfinite(cfg.rho) and 0.01 <= cfg.rho <= 1e4, f"{n('rho')} must be in [0.01, 10000], got {cfg.rho}")
    _check(math.isfinite(cfg.cfg_scale) and cfg.cfg_scale >= 1, f"{n('cfg_scale')} must be 1 (no guidance) or a "
           f"finite number above 1, got {cfg.cfg_scale} (a scale below 1 would be ignored)")
    _check(math.isfinite(cfg.S_churn) and cfg.S_churn >= 0, f"{n('S_churn')} must be a finite number >= 0")
    _check(math.isfinite(cfg.S_noise) and abs(cfg.S_noise) <= 100, f"{n('S_noise')} must be in [-100, 100], "
           f"got {cfg.S_noise}")


def _check_solver(n: Any, cfg: Any, kind: str) -> None:
    """The solver exists for this stage kind, and the settings it cannot honour are off."""
    found = solver(kind, cfg.solver, n("solver"))
    for name, allowed in found.refuses:
        value = getattr(cfg, name)
        _check(value == allowed, f"{n('solver')} {cfg.solver} takes no {n(name)} (got {value})")


def _solver_kwargs(cfg: Any, kind: str) -> dict[str, Any]:
    """The keyword arguments of the config's solver: its settings, less those the solver has no use for."""
    kwargs = dataclasses.asdict(cfg)
    kwargs.pop("solver")
    kwargs["guidance_interval"] = _interval(cfg.guidance_interval)
    for name in solver(kind, cfg.solver).unused:
        kwargs.pop(name, None)
    return kwargs


def _finite_positive(n: Any, cfg: Any, *keys: str) -> None:
    for k in keys:
        v = getattr(cfg, k)
        _check(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"{n(k)} must be a finite number > 0, got {v}")


@dataclass
class EDMStageConfig:
    """Stage-1 sampler settings: EDM's Heun sampler (docs/math.md §6a), or its SDE variant when ``sde_scale``
    is set (§6b)."""

    num_steps: int = knob(18, "Sampling steps N", min=1)
    sigma_min: float = knob(0.002, "Lowest noise level (clipped to the network's range)", min=0, min_open=True)
    sigma_max: float = knob(80.0, "Highest noise level", min=0, min_open=True)
    rho: float = knob(7.0, "Time step exponent", min=0, min_open=True)
    cfg_scale: float = knob(1.0, "Guidance scale (> 1 enables it): classifier-free, or autoguidance with a guide "
                                 "network", min=1)
    S_churn: float = knob(0.0, "Stochasticity strength", min=0)
    S_min: float = knob(0.0, "Churn only for noise levels >= S_min", min=0)
    S_max: float = knob(math.inf, "Churn only for noise levels <= S_max", min=0)
    S_noise: float = knob(1.0, "Churn noise inflation")
    sde_scale: Optional[float] = knob(None, "SDE steps with g = sde_scale * t (docs/math.md §6b); none = Heun steps",
                                      min=0)
    solver: str = knob(solver_names("edm")[0], solver_help("edm"), choices=solver_names("edm"))
    guidance_interval: Optional[tuple] = knob(None, "Guidance only for noise levels LO < t <= HI (LO,HI)",
                                              kind="interval")

    def validate(self, names: Mapping[str, str] | None = None, suffix: str = "") -> "EDMStageConfig":
        """Raise ``ValueError`` naming the setting as ``names[field]`` (default: the field + ``suffix``)."""
        n = _names(names, suffix)
        _check_common(n, self)
        _check(self.sde_scale is None or 0 <= self.sde_scale < 1, f"{n('sde_scale')} must be in [0, 1)")
        _check(self.sde_scale is None or self.cfg_scale <= 1,
               f"{n('cfg_scale')} > 1 is not available with {n('sde_scale')} (docs/math.md §6b has no guidance)")
        _check_solver(n, self, "edm")
        _check_interval(n("guidance_interval"), self.guidance_interval)
        return self

    def sampler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the chosen sampler: :func:`relay_diffusion.core.samplers.edm_sampler` (heun) or
        :func:`relay_diffusion.core.solvers.multistep_edm_sampler` (multistep)."""
        kwargs = _solver_kwargs(self, "edm")
        if "sde_scale" in kwargs and self.sde_scale is not None:
            kwargs["cfg_scale"] = 1.0
        return kwargs

    def nfe(self) -> int:
        """Denoiser evaluations per image (network calls double where guidance applies)."""
        return nfe_first(self.solver, self.num_steps)


@dataclass
class SRStageConfig(EDMStageConfig):
    """Super-resolution stage sampler settings (:mod:`relay_diffusion.core.sr`): EDM's samplers from pure noise,
    conditioned on the upsampled input. The default 7 Heun steps are 13 NFE, the relay stage's default budget."""

    num_steps: int = knob(7, "Sampling steps N", min=1)
    cond_level: float = knob(0.0, "Noise-conditioning augmentation level given to the low-resolution input "
                                  "(noise of this std is added to it and the network is told the level)", min=0)

    def validate(self, names: Mapping[str, str] | None = None, suffix: str = "") -> "SRStageConfig":
        super().validate(names, suffix)
        n = _names(names, suffix)
        _check(isinstance(self.cond_level, (int, float)) and math.isfinite(self.cond_level)
               and 0 <= self.cond_level <= 10, f"{n('cond_level')} must be in [0, 10], got {self.cond_level}")
        return self

    def sampler_kwargs(self) -> dict[str, Any]:
        kwargs = super().sampler_kwargs()
        kwargs.pop("cond_level")
        return kwargs


@dataclass
class RelayStageConfig:
    """Relay (blur diffusion) sampler settings (docs/math.md §6c); ``churn`` selects the CelebA-HQ variant.
    The forward process (relay factor, blur schedule, block noise) is the network's: :class:`BlurProcess`."""

    num_steps: int = knob(18, "Steps of the grid before truncation", min=1)
    sigma_min: float = knob(0.008, "Lowest noise level", min=0, min_open=True)
    sigma_max: float = knob(80.0, "Highest noise level of the grid", min=0, min_open=True)
    rho: float = knob(7.0, "Time step exponent", min=0, min_open=True)
    # truncation_sigma (where sampling starts) is not the training loss's ``truncate_sigma`` (the lowest trained
    # noise level, core/losses.py); both names are the reference's. Likewise ``s_noise`` (the relay sampler's
    # stochasticity, the reference's ``s_noise``) and ``S_noise`` (EDM churn's noise inflation) are two settings.
    truncation_sigma: float = knob(0.9, "Truncation point of the noise schedule: start below this level",
                                   min=0, min_open=True)
    s_noise: float = knob(0.2, "Strength of stochasticity", min=0, max=1)
    cfg_scale: float = knob(1.0, "Guidance scale (> 1 enables it): classifier-free, or autoguidance with a guide "
                                 "network", min=1)
    churn: bool = knob(False, "EDM churn inside the relay sampler (CelebA-HQ)")
    S_churn: float = knob(0.0, "Churn strength (with churn)", min=0)
    S_min: float = knob(0.0, "Churn min noise level", min=0)
    S_max: float = knob(math.inf, "Churn max noise level", min=0)
    S_noise: float = knob(1.0, "Churn noise inflation")
    solver: str = knob(solver_names("relay")[0], solver_help("relay"), choices=solver_names("relay"))
    guidance_interval: Optional[tuple] = knob(None, "Guidance only for noise levels LO < t <= HI (LO,HI)",
                                              kind="interval")

    def validate(self, names: Mapping[str, str] | None = None, suffix: str = "") -> "RelayStageConfig":
        n = _names(names, suffix)
        _check_common(n, self)
        _finite_positive(n, self, "truncation_sigma")
        _check(0 <= self.s_noise <= 1, f"{n('s_noise')} must be in [0, 1], got {self.s_noise}")
        _check_solver(n, self, "relay")
        _check_interval(n("guidance_interval"), self.guidance_interval)
        return self

    def sampler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments (without ``process``) of the chosen sampler:
        :func:`relay_diffusion.core.samplers.relay_sampler` (reference) or
        :func:`relay_diffusion.core.solvers.multistep_relay_sampler` (multistep)."""
        return _solver_kwargs(self, "relay")

    def nfe(self, net: Any = None) -> int:
        """Denoiser evaluations per image of this stage (after truncation)."""
        return nfe_second(self.solver, self.num_steps, self.sigma_min, self.sigma_max, self.rho,
                          self.truncation_sigma, net)


@dataclass
class Enhancement:
    """PIL ``ImageEnhance`` post-processing, applied in the reference's order: contrast, brightness, colour.

    The published FIDs were computed on images processed this way (docs/math.md §9); all factors 1 = off.
    """

    contrast: float = 1.0
    brightness: float = 1.0
    color: float = 1.0

    def __post_init__(self) -> None:
        for name in ("contrast", "brightness", "color"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                # NaN would turn every image black, a negative factor inverts it
                raise ValueError(f"enhancement {name} must be a number from 0 to 100, got {value!r}")

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
    """The settings of one of the reference's generation scripts (docs/math.md §9), or of the bundled models.
    ``process`` is used for relay networks whose file does not record their forward process (reference
    checkpoints). ``guide_first`` / ``guide_second``: autoguidance networks, file names in the bundled models'
    folder (only the ``emoji`` preset, which applies to the bundled networks alone)."""

    seeds: str
    first: EDMStageConfig
    second: RelayStageConfig
    process: BlurProcess = field(default_factory=BlurProcess)
    enhancement: Enhancement = field(default_factory=Enhancement)
    guide_first: Optional[str] = None
    guide_second: Optional[str] = None

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
    # generate_celebahq.py: CelebA-HQ 256x256, FID 3.15 (sampled with truncation_t 1.05 and blur 2.0)
    "celebahq256": Preset(
        seeds="80000-109999",
        first=EDMStageConfig(num_steps=120, sde_scale=0.05),
        second=RelayStageConfig(num_steps=150, truncation_sigma=0.95, churn=True),
        process=BlurProcess(blur_sigma_max=2.0, prob_length=1.05),
        enhancement=Enhancement(contrast=0.9, brightness=1.05, color=0.99),
    ),
    # the bundled emoji models (the default when they stand in): multistep solvers, both stages autoguided by
    # the bundled guide networks at weight 2; 18 + 14 NFE. FID and the search behind it: docs/guidance.
    "emoji": Preset(
        seeds="0-63",
        first=EDMStageConfig(solver="multistep", num_steps=9, cfg_scale=2.0),
        second=RelayStageConfig(solver="multistep", num_steps=18, cfg_scale=2.0),
        guide_first="stage1-16x16-guide.safetensors", guide_second="stage2-64x64-guide.safetensors",
    ),
}
BUNDLED_PRESET = "emoji"  # the preset of the bundled networks; "default" (the reference's generate.py) otherwise


def from_reference_kwargs(kwargs: Mapping[str, Any], **process: Any) -> tuple[RelayStageConfig, BlurProcess]:
    """The reference's relay-sampler keyword arguments (``truncation_t``, ``s_block``, ``up_scale``...) as a
    :class:`RelayStageConfig` and the :class:`BlurProcess` they imply (``process`` adds fields)."""
    from relay_diffusion.core.process import REFERENCE_SAMPLING_NAMES

    proc = {REFERENCE_SAMPLING_NAMES[k]: v for k, v in kwargs.items() if k in REFERENCE_SAMPLING_NAMES}
    rest = {k: v for k, v in kwargs.items() if k not in REFERENCE_SAMPLING_NAMES}
    return RelayStageConfig(**rest), BlurProcess(**{**proc, **process})
