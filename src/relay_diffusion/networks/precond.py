"""Preconditioning D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (docs/math.md §7; EDM Table 1).

``EDMPrecond``, ``VPPrecond``, ``VEPrecond`` and ``iDDPMPrecond`` wrap a backbone of ``networks``
as the submodule ``model`` (parameter names start with ``model.``, as in reference checkpoints).
Each instance records its JSON-serialisable constructor arguments in ``init_kwargs``, and
``build_network(type(net).__name__, **net.init_kwargs)`` rebuilds it. ``float('inf')`` (the EDM
default ``sigma_max``) is stored in JSON as the string ``"inf"`` under one of :data:`FLOAT_KWARGS`
(``utils.jsonio``, docs/math.md §10).

Precision: ``use_fp16`` (reference name) or ``precision`` ('fp32' | 'fp16' | 'bf16'; it wins when
given). Reduced precision applies only to inputs on CUDA (bf16 also on the CPU when the run-time switch
``reduced_on_cpu`` is set); the output is always float32.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .layers import Initialisable
from .unets import NETWORKS

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(use_fp16: bool, precision: str | None) -> str:
    """The precision name from the reference flag and the explicit option."""
    if precision is None:
        return "fp16" if use_fp16 else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision


class _Precond(Initialisable):
    """Shared plumbing: the backbone, label handling, precision and ``init_kwargs``. ``precond_kwargs`` are the
    wrapper's own arguments (``sigma_min`` ...): recorded in ``init_kwargs`` and set as attributes."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        use_fp16: bool,
        precision: str | None,
        model_type: str,
        precond_kwargs: dict[str, Any],
        model_kwargs: dict[str, Any],
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        if model_type not in NETWORKS:
            raise ValueError(f"model_type must be one of {list(NETWORKS)}, got {model_type!r}")
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = bool(use_fp16)
        self.precision = resolve_precision(self.use_fp16, precision)
        self.model = NETWORKS[model_type](
            img_resolution=img_resolution,
            in_channels=self.input_channels(img_channels),
            out_channels=out_channels if out_channels is not None else img_channels,
            label_dim=label_dim,
            **model_kwargs,
        )
        own = ("img_resolution", "in_channels", "out_channels", "label_dim")
        resolved_model = {k: v for k, v in self.model.init_kwargs.items() if k not in own}
        self.init_kwargs: dict[str, Any] = dict(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
            use_fp16=self.use_fp16, precision=self.precision, **precond_kwargs,
            model_type=model_type, **resolved_model,
        )
        for name, value in precond_kwargs.items():  # sigma_min, sigma_max, ... as attributes
            setattr(self, name, value)

    def input_channels(self, img_channels: int) -> int:
        """Channels of the backbone's input: the image's (conditional wrappers add theirs)."""
        return img_channels

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Nothing of its own to draw; ``layers.init_weights`` resets the backbone."""

    def round_sigma(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """Noise levels the network supports; identity except for iDDPM."""
        return torch.as_tensor(sigma)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(c_skip, c_out, c_in, c_noise)`` for float32 ``sigma [N, 1, 1, 1]``."""
        raise NotImplementedError

    #: bf16 also on the CPU: a run-time opt-in, never saved (``relay_diffusion.utils.accel.allow_cpu_bf16``).
    reduced_on_cpu = False

    def compute_dtype(self, x: torch.Tensor, force_fp32: bool = False) -> torch.dtype:
        """Network dtype for input ``x``: reduced precision only on CUDA (or bf16 on the CPU when
        ``reduced_on_cpu``) and unless forced to fp32."""
        cpu_bf16 = x.device.type == "cpu" and self.reduced_on_cpu and self.precision == "bf16"
        if force_fp32 or not (x.device.type == "cuda" or cpu_bf16):
            return torch.float32
        return PRECISIONS[self.precision]

    def forward(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        class_labels: torch.Tensor | None = None,
        force_fp32: bool = False,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoised float32 ``[N, C, H, W]`` from ``x [N, C, H, W]`` and ``sigma`` (scalar or ``[N]``).

        ``class_labels [N, label_dim]``; None on a conditional network means "no label" (zeros).
        """
        return self._denoise(x, sigma, class_labels, force_fp32, augment_labels)

    def _denoise(self, x, sigma, class_labels, force_fp32, augment_labels, extra: torch.Tensor | None = None):
        """:meth:`forward`, with ``extra [N, K, H, W]`` concatenated after the scaled input (conditioning)."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        sigma = sigma.reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros(x.shape[0], self.label_dim, dtype=torch.float32, device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        if augment_labels is not None:
            augment_labels = augment_labels.to(torch.float32)

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        dtype = self.compute_dtype(x, force_fp32)
        model_in = c_in * x
        if extra is not None:
            model_in = torch.cat([model_in, extra.to(torch.float32)], dim=1)
        f_x = self.model(model_in.to(dtype), c_noise.flatten(), class_labels, augment_labels=augment_labels)
        if f_x.dtype != dtype:
            raise RuntimeError(f"network returned {f_x.dtype}, expected {dtype}")
        return c_skip * x + c_out * f_x[:, : self.img_channels].to(torch.float32)


class EDMPrecond(_Precond):
    """EDM: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(sd^2+s^2), c_noise = ln(s)/4."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0.0,
        sigma_max: float = float("inf"),
        sigma_data: float = 0.5,
        model_type: str = "DhariwalUNet",
        precision: str | None = None,
        **model_kwargs: Any,
    ) -> None:
        precond_kwargs = dict(sigma_min=float(sigma_min), sigma_max=float(sigma_max), sigma_data=float(sigma_data))
        super().__init__(
            img_resolution, img_channels, label_dim, use_fp16, precision, model_type, precond_kwargs, model_kwargs
        )

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class SRPrecond(EDMPrecond):
    """A super-resolution stage (:mod:`relay_diffusion.core.sr`): EDM preconditioning of the noisy image, with
    the conditioning image (the nearest-upsampled low-resolution input, ``cond_channels`` channels, default
    ``img_channels``) and, when ``level_channel``, a constant channel holding the noise-augmentation level
    concatenated to the scaled input. Every other argument is :class:`EDMPrecond`'s."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, cond_channels: int | None = None,
                 level_channel: bool = False, **kwargs: Any) -> None:
        self._extra_inputs = (img_channels if cond_channels is None else int(cond_channels), bool(level_channel))
        super().__init__(img_resolution, img_channels, label_dim, **kwargs)
        self.cond_channels, self.level_channel = self._extra_inputs
        self.init_kwargs.update(cond_channels=self.cond_channels, level_channel=self.level_channel)

    def input_channels(self, img_channels: int) -> int:
        cond_channels, level_channel = self._extra_inputs
        return img_channels + cond_channels + int(level_channel)

    def forward(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        class_labels: torch.Tensor | None = None,
        force_fp32: bool = False,
        augment_labels: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        cond_level: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`EDMPrecond.forward` given ``cond [N, cond_channels, H, W]`` (required) and ``cond_level``
        (scalar or ``[N]``, the augmentation level of ``cond``; 0 when not given)."""
        if cond is None:
            raise ValueError("a super-resolution network needs its conditioning image (cond=)")
        n, _, h, w = x.shape
        if tuple(cond.shape) != (n, self.cond_channels, h, w):
            raise ValueError(f"cond must have shape {(n, self.cond_channels, h, w)}, got {tuple(cond.shape)}")
        extra = cond.to(torch.float32)
        if self.level_channel:
            level = torch.as_tensor(0.0 if cond_level is None else cond_level, dtype=torch.float32,
                                    device=x.device).reshape(-1)
            level = level.expand(n) if level.numel() == 1 else level
            extra = torch.cat([extra, level.reshape(-1, 1, 1, 1).expand(n, 1, h, w)], dim=1)
        return self._denoise(x, sigma, class_labels, force_fp32, augment_labels, extra=extra.to(x.device))


class VPPrecond(_Precond):
    """VP: c_skip 1, c_out -s, c_in 1/sqrt(s^2+1), c_noise = (M-1) t(s)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        beta_d: float = 19.9,                   # extent of the noise level schedule
        beta_min: float = 0.1,                  # initial slope of the schedule
        M: int = 1000,                          # original number of timesteps of the DDPM formulation
        epsilon_t: float = 1e-5,                # minimum t
        model_type: str = "SongUNet",
        precision: str | None = None,
        **model_kwargs: Any,
    ) -> None:
        precond_kwargs = dict(beta_d=float(beta_d), beta_min=float(beta_min), M=int(M), epsilon_t=float(epsilon_t))
        super().__init__(
            img_resolution, img_channels, label_dim, use_fp16, precision, model_type, precond_kwargs, model_kwargs
        )
        # Evaluated in float32 like the reference, so samplers clamp to the same range (at t = 1e-5 this
        # gives 0.000977 where float64 would give 0.001).
        with torch.device("cpu"):  # also when the module is being built on the meta device
            self.sigma_min = float(self.sigma(self.epsilon_t))
            self.sigma_max = float(self.sigma(1.0))

    def sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c_in = 1 / (sigma**2 + 1).sqrt()
        return torch.ones_like(sigma), -sigma, c_in, (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(_Precond):
    """VE: c_skip 1, c_out s, c_in 1, c_noise = ln(s/2)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0.02,
        sigma_max: float = 100.0,
        model_type: str = "SongUNet",
        precision: str | None = None,
        **model_kwargs: Any,
    ) -> None:
        precond_kwargs = dict(sigma_min=float(sigma_min), sigma_max=float(sigma_max))
        super().__init__(
            img_resolution, img_channels, label_dim, use_fp16, precision, model_type, precond_kwargs, model_kwargs
        )

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


def iddpm_grid(C_1: float, C_2: float, M: int) -> torch.Tensor:
    """The noise levels u_0 > ... > u_M = 0 of improved DDPM's cosine schedule, float32 ``[M + 1]``.

    u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1),
    alpha_bar(j) = sin(pi j / (2 M (C_2 + 1)))^2.
    Evaluated in float32 on the CPU, step by step, which reproduces bit for bit the grid stored in
    reference checkpoints (a float64 evaluation differs from it by up to 5e-4 relative).
    """
    j = torch.arange(M + 1, device="cpu")
    alpha_bar = (0.5 * math.pi * j / M / (C_2 + 1)).sin() ** 2
    ratio = (alpha_bar[:-1] / alpha_bar[1:]).clip(min=C_1)  # alpha_bar(j-1) / alpha_bar(j), j = 1..M
    u = torch.zeros(M + 1, device="cpu")
    for i in range(M, 0, -1):
        u[i - 1] = ((u[i] ** 2 + 1) / ratio[i - 1] - 1).sqrt()
    return u


class iDDPMPrecond(_Precond):
    """iDDPM: sigma on the grid u_j, c_noise = M-1-j, c_skip 1, c_out -s, c_in 1/sqrt(s^2+1).

    The backbone predicts ``2 * img_channels`` channels (mean and variance); the first half is used.
    The grid is the buffer ``u`` (float32, as stored in reference checkpoints).
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        C_1: float = 0.001,                     # timestep adjustment at low noise levels
        C_2: float = 0.008,                     # timestep adjustment at high noise levels
        M: int = 1000,                          # original number of timesteps of the DDPM formulation
        model_type: str = "DhariwalUNet",
        precision: str | None = None,
        **model_kwargs: Any,
    ) -> None:
        precond_kwargs = dict(C_1=float(C_1), C_2=float(C_2), M=int(M))
        super().__init__(
            img_resolution, img_channels, label_dim, use_fp16, precision, model_type, precond_kwargs, model_kwargs,
            out_channels=img_channels * 2,
        )
        self.register_buffer("u", torch.empty(self.M + 1))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Refill the (deterministic) grid buffer ``u``."""
        with torch.no_grad():
            self.u.copy_(iddpm_grid(self.C_1, self.C_2, self.M))

    @property
    def sigma_min(self) -> float:
        return float(self.u[self.M - 1])

    @property
    def sigma_max(self) -> float:
        return float(self.u[0])

    def round_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index j of the nearest grid level u_j, same shape as ``sigma``."""
        sigma = torch.as_tensor(sigma)
        dist = (sigma.to(self.u.device, torch.float32).reshape(-1, 1) - self.u.reshape(1, -1)).abs()
        return dist.argmin(dim=1).reshape(sigma.shape).to(sigma.device)

    def round_sigma(self, sigma: float | torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        index = self.round_index(sigma).to(self.u.device)
        return self.u[index.flatten()].to(sigma.dtype).reshape(sigma.shape).to(sigma.device)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_index(sigma).to(torch.float32)
        return torch.ones_like(sigma), -sigma, c_in, c_noise


PRECONDS: dict[str, type[nn.Module]] = {
    "EDMPrecond": EDMPrecond, "SRPrecond": SRPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond,
    "iDDPMPrecond": iDDPMPrecond,
    "edm": EDMPrecond, "sr": SRPrecond, "vp": VPPrecond, "ve": VEPrecond, "iddpm": iDDPMPrecond,
}


def _float_kwargs() -> frozenset[str]:
    """Names of the constructor arguments, of every wrapper and backbone, annotated ``float``."""
    names = set()
    for cls in (*PRECONDS.values(), *NETWORKS.values()):
        for name, param in inspect.signature(cls).parameters.items():
            if param.annotation in (float, "float"):
                names.add(name)
    return frozenset(names)


#: The init kwargs that are floats, so may be non-finite (``sigma_max`` = inf): a network's JSON holds them
#: as ``"inf"`` / ``"-inf"`` / ``"nan"`` when they are (``utils.jsonio``).
FLOAT_KWARGS = _float_kwargs()


def build_network(precond: str, **init_kwargs: Any) -> nn.Module:
    """A preconditioned network from its class name (or short name) and constructor arguments."""
    if precond not in PRECONDS:
        raise ValueError(f"precond must be one of {list(PRECONDS)}, got {precond!r}")
    return PRECONDS[precond](**init_kwargs)


@dataclass(frozen=True)
class SongUNetArch:
    """A DDPM++ / NCSN++ preset (EDM's ``--arch ddpmpp`` / ``ncsnpp``): :class:`SongUNet`'s arguments."""

    embedding_type: str
    encoder_type: str
    decoder_type: str
    channel_mult_noise: int
    resample_filter: tuple[int, ...]
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (2, 2, 2)

    def kwargs(self) -> dict[str, Any]:
        return dict(model_type="SongUNet", embedding_type=self.embedding_type, encoder_type=self.encoder_type,
                    decoder_type=self.decoder_type, channel_mult_noise=self.channel_mult_noise,
                    resample_filter=list(self.resample_filter), model_channels=self.model_channels,
                    channel_mult=list(self.channel_mult))


@dataclass(frozen=True)
class DhariwalUNetArch:
    """An ADM preset: :class:`DhariwalUNet`'s width, levels and (when not the class default) blocks per level."""

    model_channels: int
    channel_mult: tuple[int, ...]
    num_blocks: Optional[int] = None

    def kwargs(self) -> dict[str, Any]:
        out = dict(model_type="DhariwalUNet", model_channels=self.model_channels, channel_mult=list(self.channel_mult))
        if self.num_blocks is not None:
            out["num_blocks"] = self.num_blocks
        return out


#: The architecture presets by name. ``adm-imagenet256`` is RDM's ImageNet-256 stage-2 network.
ARCH_PRESETS: dict[str, SongUNetArch | DhariwalUNetArch] = {
    "ddpmpp": SongUNetArch("positional", "standard", "standard", 1, (1, 1)),
    "ncsnpp": SongUNetArch("fourier", "residual", "standard", 2, (1, 3, 3, 1)),
    "adm": DhariwalUNetArch(192, (1, 2, 3, 4)),
    "adm-imagenet256": DhariwalUNetArch(256, (1, 1, 2, 2, 4, 4), num_blocks=2),
}
#: Where the reference's ``--arch`` means another preset at one resolution: its ``adm`` at 256x256 is the
#: ImageNet-256 stage-2 network.
ARCH_AT_RESOLUTION: dict[tuple[str, int], str] = {("adm", 256): "adm-imagenet256"}


def arch_preset(arch: str, resolution: int) -> SongUNetArch | DhariwalUNetArch:
    """The preset that ``--arch arch`` names for a network of ``resolution`` x ``resolution``."""
    if arch not in ARCH_PRESETS:
        raise ValueError(f"arch must be one of {sorted(ARCH_PRESETS)}, got {arch!r}")
    return ARCH_PRESETS[ARCH_AT_RESOLUTION.get((arch, resolution), arch)]


def arch_config(arch: str, resolution: int) -> dict[str, Any]:
    """Backbone kwargs of the named preset (EDM's ``--arch``) at ``resolution``: :func:`arch_preset`'s."""
    return arch_preset(arch, resolution).kwargs()
