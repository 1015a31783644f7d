"""Building blocks of the U-Nets (docs/math.md §7).

Parameter and buffer names follow the reference layouts (``fixtures/reference.json`` -> ``layouts``),
so reference checkpoints load by name. Weights are kept in float32; every layer casts them to the
dtype of its input, which is how reduced precision runs (the embedding path stays float32).

Initialisation follows EDM: each layer scales a xavier/kaiming draw by ``init_weight`` /
``init_bias``. A fresh layer draws from torch's default generator, as ``torch.nn`` layers do; call
``init_weights(module, generator)`` for an initialisation that depends on the given generator only
(it also refills the deterministic buffers, so it completes a module built on the ``meta`` device
and moved with ``to_empty``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def weight_init(
    shape: Sequence[int],
    mode: str,
    fan_in: int,
    fan_out: int,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """A float32 draw of ``shape`` with standard deviation sqrt(2 / (fan_in + fan_out)) (xavier) or
    sqrt(1 / fan_in) (kaiming), uniform or normal. Drawn on the generator's device when one is given."""
    if mode not in INIT_MODES:
        raise ValueError(f"init_mode must be one of {INIT_MODES}, got {mode!r}")
    family, distribution = mode.split("_")
    std = math.sqrt(2 / (fan_in + fan_out)) if family == "xavier" else math.sqrt(1 / fan_in)
    device = generator.device if generator is not None else device
    if distribution == "uniform":
        uniform = torch.rand(tuple(shape), generator=generator, device=device) * 2 - 1  # std 1 / sqrt(3)
        return uniform * (math.sqrt(3) * std)
    return torch.randn(tuple(shape), generator=generator, device=device) * std


@torch.no_grad()
def _fill(param: torch.Tensor | None, value: torch.Tensor | float) -> None:
    """Copy ``value`` into ``param`` in place (no-op for a missing parameter)."""
    if param is None:
        return
    if isinstance(value, torch.Tensor):
        param.copy_(value.to(param.device, param.dtype))
    else:
        param.fill_(value)


class Initialisable(nn.Module):
    """A module whose parameters and buffers ``reset_parameters(generator)`` can redraw."""

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:  # pragma: no cover
        raise NotImplementedError


def init_weights(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Redraw every parameter and buffer of ``module`` in module order; returns ``module``."""
    for child in module.modules():
        if isinstance(child, Initialisable):
            child.reset_parameters(generator)
    return module


class _ScaledInit(Initialisable):
    """Shared EDM-style initialisation of a weight (fans from its shape) and a bias."""

    def _init_scaled(self, fan_in: int, fan_out: int, generator: torch.Generator | None) -> None:
        if self.init_mode not in INIT_MODES:
            raise ValueError(f"init_mode must be one of {INIT_MODES}, got {self.init_mode!r}")

        def draw(shape, scale):
            if scale == 0:
                return 0.0
            return weight_init(shape, self.init_mode, fan_in, fan_out, generator, self.weight_device) * scale

        if self.weight is not None:
            _fill(self.weight, draw(self.weight.shape, self.init_weight))
        if self.bias is not None:
            _fill(self.bias, draw(self.bias.shape, self.init_bias))

    @property
    def weight_device(self) -> torch.device:
        return next(t.device for t in (self.weight, self.bias) if t is not None)


class Linear(_ScaledInit):
    """Fully connected layer: ``[N, in_features] -> [N, out_features]``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.init_mode, self.init_weight, self.init_bias = init_mode, init_weight, init_bias
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self._init_scaled(self.in_features, self.out_features, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def resample_kernel(resample_filter: Sequence[float], device: torch.device | None = None) -> torch.Tensor:
    """Separable FIR filter ``f f^T / (sum f)^2`` as a ``[1, 1, k, k]`` float32 kernel."""
    f = torch.as_tensor(list(resample_filter), dtype=torch.float32, device=device)
    return (torch.outer(f, f) / f.sum().square()).reshape(1, 1, len(f), len(f))


class Conv2d(_ScaledInit):
    """2-D convolution with optional 2x up/down resampling through a FIR filter.

    ``[N, in_channels, H, W] -> [N, out_channels, H', W']`` with ``H' = 2H`` (up), ``H/2`` (down) or
    ``H``. ``kernel=0`` gives a pure resampling layer (then ``in_channels == out_channels``).
    ``fused_resample`` applies the filter with the convolution's stride (down) or before it at the
    new resolution (up), which changes the border handling exactly as the reference does.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ) -> None:
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        super().__init__()
        self.in_channels, self.out_channels, self.kernel = in_channels, out_channels, kernel
        self.up, self.down, self.fused_resample = up, down, fused_resample
        self.filter_taps = [float(v) for v in resample_filter]
        self.init_mode, self.init_weight, self.init_bias = init_mode, init_weight, init_bias
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.empty(out_channels)) if kernel and bias else None
        taps = len(self.filter_taps)
        self.register_buffer("resample_filter", torch.empty(1, 1, taps, taps) if up or down else None)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        k2 = self.kernel * self.kernel
        if self.weight is not None:
            self._init_scaled(self.in_channels * k2, self.out_channels * k2, generator)
        if self.resample_filter is not None:
            _fill(self.resample_filter, resample_kernel(self.filter_taps, device=self.resample_filter.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        cin, cout = self.in_channels, self.out_channels
        if self.fused_resample and self.up and w is not None:
            # The transposed filter gains 4 = 2x2 so that upsampling preserves the mean.
            x = F.conv_transpose2d(x, (f * 4).tile(cin, 1, 1, 1), groups=cin, stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(cout, 1, 1, 1), groups=cout, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile(cin, 1, 1, 1), groups=cin, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile(cin, 1, 1, 1), groups=cin, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(Initialisable):
    """Group normalisation with at most ``num_groups`` groups of at least ``min_channels_per_group``."""

    def __init__(
        self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.num_groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_channels))
        self.bias = nn.Parameter(torch.empty(num_channels))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        _fill(self.weight, 1.0)
        _fill(self.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W] -> [N, C, H, W]``."""
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def self_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention over pixels: ``[N, 3C, H, W] -> [N, C, H, W]``.

    The channels of ``qkv`` are laid out as ``[head, C / num_heads, (q, k, v)]`` (the reference's
    split), and the logits are ``q . k / sqrt(C / num_heads)``, the default scale of
    ``scaled_dot_product_attention``.

    q, k and v are laid out as ``[N, heads, HW, C']`` with a contiguous last dimension (one copy of ``qkv``):
    the fused CUDA kernels (flash, memory-efficient) accept nothing else, and without them the call falls back
    to the math kernel, which keeps the ``HW x HW`` logits of every head in memory. On other devices the same
    tensors go in as ``[N * heads, HW, C']``, which keeps the math kernel there and with it the images of
    earlier releases bit for bit (the CPU's fused kernel sums in another order).
    """
    n, c3, h, w = qkv.shape
    c = c3 // 3
    # [N, heads, C', 3, HW] -> [3, N, heads, HW, C'], made contiguous once so that each of q, k, v is too.
    q, k, v = qkv.reshape(n, num_heads, c // num_heads, 3, h * w).permute(3, 0, 1, 4, 2).contiguous().unbind(0)
    if qkv.device.type != "cuda":
        q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, HW, C'] (or [N * heads, HW, C'])
    return out.reshape(n, num_heads, h * w, c // num_heads).transpose(2, 3).reshape(n, c, h, w)


class UNetBlock(nn.Module):
    """Residual block with embedding conditioning and optional self-attention.

    ``x [N, in_channels, H, W], emb [N, emb_channels] -> [N, out_channels, H', W']``.
    ``adaptive_scale`` modulates the second norm as ``norm(x) * (1 + scale) + shift`` (ADM);
    otherwise the embedding is added before it (DDPM++).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,                       # 2x nearest-like upsampling through the FIR filter
        down: bool = False,                     # 2x downsampling through the FIR filter
        attention: bool = False,                # append a self-attention layer
        num_heads: int | None = None,           # heads; None: out_channels // channels_per_head
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,                # scale of (residual + skip) and (attention + input)
        eps: float = 1e-5,                      # GroupNorm epsilon
        resample_filter: Sequence[float] = (1, 1),
        resample_proj: bool = False,            # 1x1 conv on a resampled skip even when channels match
        adaptive_scale: bool = True,
        init: dict | None = None,               # init of the ordinary layers
        init_zero: dict | None = None,          # init of the layers closing a residual branch
        init_attn: dict | None = None,          # init of qkv (default: ``init``)
    ) -> None:
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero if init_zero is not None else {"init_weight": 0})
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        if num_heads is None:
            num_heads = out_channels // channels_per_head
        self.num_heads = num_heads if attention else 0
        self.skip_scale, self.adaptive_scale = skip_scale, adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.drop = nn.Dropout(dropout)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(
                in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter, **init
            )
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(self.drop(x))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            attn = self_attention(self.qkv(self.norm2(x)), self.num_heads)
            x = (self.proj(attn) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding ``[N] -> [N, num_channels]`` laid out as ``[cos, sin]``.

    Frequencies ``(1 / max_positions) ** (i / (num_channels / 2 - endpoint))``, computed in float32.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(Initialisable):
    """Random Fourier features ``[N] -> [N, num_channels]`` as ``[cos, sin]`` of ``2 pi x freqs``.

    ``freqs ~ N(0, scale^2)`` is a buffer (``map_noise.freqs`` in the reference layouts).
    """

    def __init__(self, num_channels: int, scale: float = 16) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("freqs", torch.empty(num_channels // 2))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        device = generator.device if generator is not None else self.freqs.device
        _fill(self.freqs, torch.randn(self.freqs.shape, generator=generator, device=device) * self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
