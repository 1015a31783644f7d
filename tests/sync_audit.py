"""Counting host reads on the CPU: a structural proof that code would not wait for an accelerator.

On CUDA a value read back to the host (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, a boolean mask or
``nonzero``, whose size depends on the data) waits for every queued kernel; so does a blocking copy of host data
to the device, which starts with a tensor made from Python data (``torch.tensor(list)``). On the CPU nothing
waits, but the same calls happen, so counting them there shows where a GPU run would stall.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Operators that read a value back or build a tensor from host data.
READ_OPS = {
    torch.ops.aten._local_scalar_dense.default: "item",  # .item(), bool(t), float(t), int(t)
    torch.ops.aten.nonzero.default: "nonzero",  # torch.where(cond), nonzero: a size that depends on the data
    torch.ops.aten.masked_select.default: "nonzero",
    torch.ops.aten.lift_fresh.default: "from_host",  # torch.tensor(data) / as_tensor(data)
}
#: Tensor methods that hand data to the host without always dispatching an operator.
READ_METHODS = ("cpu", "tolist", "numpy", "item")


class HostSyncAudit(TorchDispatchMode):
    """``with HostSyncAudit() as audit: ...`` counts host reads into ``audit.counts``; ``with audit.paused():``
    leaves a block out (e.g. the data loader, which runs on the host by design)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self._paused = 0
        self._saved: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = READ_OPS.get(func)
        if func is torch.ops.aten.index.Tensor and any(  # x[mask]: nonzero inside the operator
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            name = "nonzero"
        if name is not None and not self._paused:
            self.counts[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _counting(self, name: str):
        method = self._saved[name]

        def counted(tensor, *args, **kwargs):
            if not self._paused:
                self.counts[f"Tensor.{name}"] += 1
            return method(tensor, *args, **kwargs)

        return counted

    def __enter__(self):
        for name in READ_METHODS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(name))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, method in self._saved.items():
                setattr(torch.Tensor, name, method)
            self._saved.clear()
