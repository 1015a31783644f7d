"""The exact denoiser of Gaussian data (docs/math.md §12): a network stand-in with a known answer.

Data ``N(m, 0.25 I)`` has the optimal denoiser ``D(x, sigma) = a x + (1 - a) m`` with
``a = 0.25 / (sigma^2 + 0.25)``. Used by the reference fixtures, the statistical tests and the smoke run.
"""

from __future__ import annotations

import math

import torch


class GaussianToyDenoiser(torch.nn.Module):
    """Exact denoiser of ``N(m, var I)`` with a structured, optionally class-dependent mean ``m``.

    ``m[c, h, w] = 0.5 sin(0.3 h + 0.2 w + c) + sum_k labels[k] 0.25 cos(0.7 (k + 1) + 0.15 h - 0.1 w + 0.5 c)``.
    Computes in float32 and returns float32, like a real network.
    """

    sigma_min = 0.0
    sigma_max = math.inf

    def __init__(self, img_channels: int, img_resolution: int, label_dim: int = 0, var: float = 0.25) -> None:
        super().__init__()
        self.img_channels, self.img_resolution, self.label_dim, self.var = img_channels, img_resolution, label_dim, var
        c, h, w = torch.meshgrid(
            *(torch.arange(n, dtype=torch.float32) for n in (img_channels, img_resolution, img_resolution)),
            indexing="ij",
        )
        self.register_buffer("base", 0.5 * torch.sin(0.3 * h + 0.2 * w + c), persistent=False)
        k = torch.arange(label_dim, dtype=torch.float32)[:, None, None, None]
        self.register_buffer(
            "per_class", 0.25 * torch.cos(0.7 * (k + 1) + 0.15 * h - 0.1 * w + 0.5 * c), persistent=False
        )

    def mean(self, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``m``: ``[C, H, W]``, or ``[N, C, H, W]`` for labels ``[N, label_dim]``."""
        if class_labels is None or self.label_dim == 0:
            return self.base
        return self.base + torch.einsum("nk,kchw->nchw", class_labels.to(torch.float32), self.per_class)

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None, **unused
    ) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        a = self.var / (sigma.square() + self.var)
        return a * x + (1 - a) * self.mean(class_labels)
