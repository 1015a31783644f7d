"""Network calls of a fixed batch size: a sample's result never depends on the batch it arrives in.

Every sampler calls its network through :class:`FixedBatchDenoiser`; ``net_batch`` (``--net_batch``) is the one
knob, :func:`auto_net_batch` its default per device.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

#: Samples per network call on the CPU when ``net_batch`` is not given. Every call is padded to exactly this
#: size so that a sample's result never depends on how many samples share its batch: CPU kernels pick
#: different code paths (and summation orders) for different batch sizes, which changes results in the last
#: float bits.
CPU_NET_BATCH = 8
#: ``None`` = automatic: :data:`CPU_NET_BATCH` on the CPU, the whole batch in one call elsewhere (see
#: :func:`auto_net_batch`).
DEFAULT_NET_BATCH = None


def auto_net_batch(net_batch: int | None, device: torch.device | str) -> int | None:
    """The network batch used on ``device``: ``net_batch`` when given; else :data:`CPU_NET_BATCH` on the CPU
    (exact batch invariance) and None (one call per batch, for accelerator throughput) on any other device."""
    if net_batch is not None:
        return int(net_batch)
    return CPU_NET_BATCH if torch.device(device).type == "cpu" else None


#: What samplers and stages read off a denoiser besides calling it (its image shape and labels, its noise-level
#: range and rounding, a super-resolution network's level input): a stand-in for a network carries them over.
DENOISER_ATTRIBUTES = ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max", "round_sigma",
                       "level_channel")


def carry_denoiser_attributes(net: object, stand_in: object) -> None:
    """Give ``stand_in`` the :data:`DENOISER_ATTRIBUTES` that ``net`` has."""
    for name in DENOISER_ATTRIBUTES:
        if hasattr(net, name):
            setattr(stand_in, name, getattr(net, name))


def _is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


class FixedBatchDenoiser:
    """Calls ``net`` on chunks of exactly ``net_batch`` samples (the last one padded with copies of its
    last sample), so a sample's result does not depend on the batch it arrives in.

    This is exact when the kernels compute a sample alike at every position of a batch of fixed size:
    always for ``net_batch = 1``; for the CPU GEMMs measured here, for multiples of 4 (other batch sizes
    give position-dependent last bits). Other hardware is not guaranteed: use ``net_batch = 1`` to be sure.

    ``net_batch=None`` (the default) is :func:`auto_net_batch` of the input's device: fixed chunks of
    :data:`CPU_NET_BATCH` on the CPU; on an accelerator one unpadded call per batch, split in halves (and
    remembered) only when the device runs out of memory.

    ``extra``: per-sample keyword arguments of the network (``{name: [M, ...]}``, e.g. a super-resolution
    stage's conditioning image), indexed like ``x``; a call on ``k M`` samples (guidance doubles the batch)
    repeats them.

    ``guide``: the autoguidance network of ``net`` (:func:`relay_diffusion.core.samplers.denoise`), called the
    same way as :attr:`guide`; None for none.
    """

    def __init__(self, net: Callable, net_batch: int | None = DEFAULT_NET_BATCH,
                 extra: dict[str, torch.Tensor] | None = None, guide: Callable | None = None) -> None:
        if net_batch is not None and net_batch < 1:
            raise ValueError(f"net_batch must be >= 1, got {net_batch}")
        self.net, self.net_batch, self.extra = net, net_batch, dict(extra or {})
        self.guide = None if guide is None else FixedBatchDenoiser(guide, net_batch, extra)
        self.max_chunk: int | None = None       # set when an unpadded call ran out of memory
        self.sigma_min = getattr(net, "sigma_min", 0.0)
        self.sigma_max = getattr(net, "sigma_max", math.inf)
        if hasattr(net, "round_sigma"):
            self.round_sigma = net.round_sigma

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``x [N, C, H, W]``, ``sigma [N]``, ``class_labels [N, L]`` or None -> ``[N, C, H, W]``."""
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(n)
        k = auto_net_batch(self.net_batch, x.device)
        if k is None:
            return self._unpadded(x, sigma, class_labels)
        outs = []
        for start in range(0, n, k):
            index = torch.arange(start, start + k, device=x.device).clamp(max=n - 1)
            labels = None if class_labels is None else class_labels[index]
            outs.append(self.net(x[index], sigma[index], labels, **self._extra(index, n))[: min(k, n - start)])
        return torch.cat(outs)

    def _extra(self, index: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
        """The per-sample keyword arguments of the samples ``index`` of a call on ``n`` samples."""
        out = {}
        for name, value in self.extra.items():
            m = value.shape[0]
            if n % m:
                raise ValueError(f"a call on {n} samples with {name} for {m}")
            out[name] = value[index.to(value.device) % m]
        return out

    def _unpadded(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """The whole batch in one call (or in chunks of ``max_chunk`` after an out-of-memory error)."""
        n = x.shape[0]
        while True:
            k = min(n, self.max_chunk or n)
            try:
                return torch.cat([self.net(x[s:s + k], sigma[s:s + k],
                                           None if class_labels is None else class_labels[s:s + k],
                                           **self._extra(torch.arange(s, min(s + k, n), device=x.device), n))
                                  for s in range(0, n, k)])
            except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are retried
                if k == 1 or not _is_out_of_memory(exc):
                    raise
                self.max_chunk = (k + 1) // 2
                if x.device.type == "cuda":
                    torch.cuda.empty_cache()
