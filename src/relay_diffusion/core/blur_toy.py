"""The exact denoiser of Gaussian data under the blur process (docs/math.md §6c): a stage-2 network with a known answer.

With block noise off the forward process is diagonal in the block-DCT basis: coefficient ``k`` of ``x_t`` is
``a_k(t) u0_k + t n_k``. For data whose block-DCT coefficients are independent, ``u0_k ~ N(m_k, v_k)``, the
denoiser and the probability-flow ODE are then exact per coefficient::

    D_k(x, t)      = m_k + a_k v_k (x_k - a_k m_k) / (a_k^2 v_k + t^2)
    x_k(t') = a_k' m_k + sqrt((a_k'^2 v_k + t'^2) / (a_k^2 v_k + t^2)) (x_k - a_k m_k)     (flow t -> t')

(the flow maps the Gaussian marginal at ``t`` onto the one at ``t'`` keeping each coefficient's quantile; it is
the marginal velocity of ``x/t = (a/t) u0 + n``). With block noise on, the noise is correlated across
coefficients and this denoiser is only an approximation: use it there for sanity checks, not for exactness.
"""

from __future__ import annotations

import math

import torch

from relay_diffusion.core.blur import dct, idct, to_patches
from relay_diffusion.core.process import BlurProcess


class BlurGaussianToyDenoiser(torch.nn.Module):
    """Exact denoiser of Gaussian images for ``process`` with its block noise off (module docstring).

    Mean ``m[c, h, w] = 0.5 sin(0.3 h + 0.2 w + c)`` (docs/math.md §12's toy); block-DCT variances
    ``v(i, j) = var / (1 + i + j)^2`` (images have less energy at high frequency). Float32 in and out, like
    a network; computes in float64.
    """

    sigma_min = 0.0
    sigma_max = math.inf

    def __init__(self, process: BlurProcess, img_channels: int, img_resolution: int, var: float = 0.25) -> None:
        super().__init__()
        p = process.up_scale
        if img_resolution % p:
            raise ValueError(f"resolution {img_resolution} is not divisible by up_scale {p}")
        self.process, self.img_channels, self.img_resolution = process, img_channels, img_resolution
        c, h, w = torch.meshgrid(
            *(torch.arange(n, dtype=torch.float64) for n in (img_channels, img_resolution, img_resolution)),
            indexing="ij",
        )
        self.register_buffer("mean_image", 0.5 * torch.sin(0.3 * h + 0.2 * w + c), persistent=False)
        i = torch.arange(p, dtype=torch.float64)
        self.register_buffer("coef_var", var / (1 + i[:, None, None] + i[None, None, :]).square(), persistent=False)

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def _parts(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``dct(x)``, ``dct(m)`` in patch layout and ``A(t)`` as ``[N, 1, 1, p, 1, p]``."""
        p = self.process.up_scale
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        a = self.process.factors(t).to(x.device).reshape(x.shape[0], 1, 1, p, 1, p)
        return to_patches(dct(x, p), p), to_patches(dct(self.mean_image, p), p), a

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                **unused) -> torch.Tensor:
        """``D(x, sigma)``: ``x [N, C, H, W]``, ``sigma [N]`` -> float32 ``[N, C, H, W]``."""
        x64 = x.to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1, 1, 1, 1, 1)
        u, m, a = self._parts(x64, sigma)
        v = self.coef_var
        d = m + a * v * (u - a * m) / (a.square() * v + sigma.square())
        return idct(d.reshape(x.shape), self.process.up_scale).to(torch.float32)

    def flow(self, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        """The exact probability-flow ODE solution from ``(x, t)`` to ``t_next`` (``0 <= t_next <= t``), float64."""
        x = x.to(torch.float64)
        u, m, a = self._parts(x, torch.tensor(t))
        _, _, a_next = self._parts(x, torch.tensor(t_next))
        v = self.coef_var
        scale = ((a_next.square() * v + t_next**2) / (a.square() * v + t**2)).sqrt()
        return idct((a_next * m + scale * (u - a * m)).reshape(x.shape), self.process.up_scale)
