"""Autoguidance guides (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself",
arXiv 2406.02507): a weaker denoiser of the same task that a stage's network is steered away from,
``c D(x) - (c - 1) D_guide(x)`` (:func:`relay_diffusion.core.samplers.denoise`; scale and interval are the
stage's ``cfg_scale`` and ``guidance_interval``).

A guide is either a network file of the same stage kind, resolution, channels and labels (a smaller or shorter
-trained network: ``--guide_first PATH``), or :data:`SELF_DROPOUT`, the stage's own network with its dropout
layers on (the in-situ variant: no second network, one more evaluation per guided step).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from relay_diffusion.generation.batching import carry_denoiser_attributes

#: The guide that is the stage's own network with dropout on.
SELF_DROPOUT = "self-dropout"
_M32 = 0xFFFFFFFF


class DropoutGuide(nn.Module):
    """``net`` with its ``nn.Dropout`` layers active at their trained rate (or ``p``).

    The masks are drawn from no generator: each is a hash of the sample's noise level, the layer and the
    element's position, so a sample's guide output depends on that sample alone (whatever batch it is in, on
    any device, with no host sync), and every run gives the same images."""

    def __init__(self, net: nn.Module, p: float | None = None) -> None:
        super().__init__()
        self.net = net
        self.p = p
        self.layers = [m for m in net.modules() if isinstance(m, nn.Dropout)]
        rates = [self._rate(m) for m in self.layers]
        if not rates or max(rates) <= 0:
            raise ValueError("the network has no dropout, so it cannot be its own guide (self-dropout needs a "
                             "network trained with --dropout > 0)")
        carry_denoiser_attributes(net, self)

    def _rate(self, layer: nn.Dropout) -> float:
        return float(layer.p if self.p is None else self.p)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        key = sigma.to(torch.float32).reshape(-1).expand(x.shape[0]).contiguous().view(torch.int32).to(torch.int64)
        hooks = [layer.register_forward_hook(self._hook(i, key)) for i, layer in enumerate(self.layers)]
        try:
            return self.net(x, sigma, class_labels, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    def _hook(self, index: int, key: torch.Tensor) -> Any:
        def drop(layer: nn.Dropout, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            p = self._rate(layer)
            if p <= 0:
                return output
            h = inputs[0]
            keep = uniform_hash(key.to(h.device), h.shape[1:], index) >= p
            return h * keep.to(h.dtype) / (1 - p)
        return drop


def uniform_hash(key: torch.Tensor, shape: torch.Size | tuple[int, ...], salt: int) -> torch.Tensor:
    """Numbers in [0, 1) ``[N, *shape]``, a 32-bit integer hash (murmur3's finaliser) of ``key [N]`` (int64
    holding 32-bit values), ``salt`` and the position in ``shape``; a fixed function, no random state."""
    index = torch.arange(math.prod(shape), device=key.device, dtype=torch.int64).reshape(shape)
    h = (key.reshape(-1, *[1] * len(shape)) * 0x9E3779B1 + index * 0x85EBCA77 + (salt + 1) * 0xC2B2AE3D) & _M32
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = ((h ^ (h >> shift)) * mult) & _M32
    h = h ^ (h >> 16)
    return h.to(torch.float64).div(2.0**32).to(torch.float32)


def load_guide(spec: str, stage: Any, device: torch.device | str, precision: str | None = None) -> tuple[Any, str]:
    """The guide ``spec`` (a network file or :data:`SELF_DROPOUT`) of ``stage``, and how files record it.
    A file must hold a network of the stage's kind, resolution, channels and labels (``ValueError`` otherwise)."""
    from relay_diffusion.checkpoints.loading import load_network_file
    from relay_diffusion.generation.stages import KIND_NAMES, net_info

    if spec == SELF_DROPOUT:
        return DropoutGuide(stage.net), SELF_DROPOUT
    file = load_network_file(spec, device)
    if file.kind != stage.kind:
        raise ValueError(f"{spec} is a {KIND_NAMES[file.kind]} network; the guide of a {KIND_NAMES[stage.kind]} "
                         "stage must be one too")
    got, want = net_info(file.net), net_info(stage.net)
    if got != want:
        raise ValueError(f"{spec}: resolution, channels and labels {got} differ from the stage's network {want}")
    if precision is not None and hasattr(file.net, "precision"):
        file.net.precision = precision
    if file.kind == "relay" and file.process is not None and file.process != stage.process:
        raise ValueError(f"{spec} was trained with another forward process than the stage samples with "
                         f"({file.process.differences(stage.process)})")
    return file.net, spec
