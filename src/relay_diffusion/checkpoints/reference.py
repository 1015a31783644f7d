"""Import the reference implementation's ``.pkl`` and ``.pt`` checkpoints without executing them (docs/math.md §10).

The reference pickles every network object as a call ``torch_utils.persistence._reconstruct_persistent_obj(meta)``
whose ``meta`` carries the class's Python source (``module_src``), the class name and the object's
``__dict__``. Loading such a file with :mod:`pickle` runs that source. Here a restricted unpickler resolves
only an allow-list of globals (:data:`REFERENCE_POLICY`, read by :mod:`.unpickle`): the persistence call becomes
a :class:`PersistentObject` (class name and state; the source is dropped unread), torch containers become inert
stubs, tensors are rebuilt by torch's own tensor helpers, and every other global is refused with an error naming it.
The project's network is then built from the top-level ``_init_kwargs`` and its tensors copied by name.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relay_diffusion.checkpoints.unpickle import (
    NUMPY_SCALAR_GLOBALS,
    PERSISTENCE_GLOBALS,
    AttrDict,
    PersistentObject,
    Stub,
    UnpicklePolicy,
    UnsafePickleError,
    looks_like_torchscript,
    numpy_dtype_class,
    pickle_module,
    restricted_load,
    tensor_globals,
    torch_dtype,
    torch_module_stub,
)
from relay_diffusion.networks.precond import PRECONDS, build_network

#: Reference class name -> the project's preconditioning class. The reference trains its stage-2 (blur)
#: models with ``EDMPrecond`` (the blur lives in the loss and the sampler); forks name that wrapper
#: differently, so those names are accepted for the same network.
PRECOND_ALIASES = {
    "EDMPrecond": "EDMPrecond",
    "VPPrecond": "VPPrecond",
    "VEPrecond": "VEPrecond",
    "iDDPMPrecond": "iDDPMPrecond",
    "BlurPrecond": "EDMPrecond",
    "RelayPrecond": "EDMPrecond",
    "RDMPrecond": "EDMPrecond",
}
#: Reference constructor arguments that choose an implementation, not weights (dropped on import).
IGNORED_INIT_KWARGS = ("eff_attn",)


UnsafeCheckpointError = UnsafePickleError  # the name this module's callers know

#: What a reference checkpoint may name: tensors and containers, the persistence call (an inert record),
#: ``torch.nn`` containers (inert stubs), EasyDict, numpy scalars and dtypes, torch dtypes. Nothing else.
REFERENCE_POLICY = UnpicklePolicy(
    what="a reference checkpoint",
    needed_for="network weights",
    allowed={**tensor_globals(), **PERSISTENCE_GLOBALS, **NUMPY_SCALAR_GLOBALS, ("dnnlib.util", "EasyDict"): AttrDict},
    resolvers=(torch_module_stub, numpy_dtype_class, torch_dtype),
)
#: A pickle-compatible module for ``torch.load(..., pickle_module=...)`` under :data:`REFERENCE_POLICY`.
restricted_pickle = pickle_module(REFERENCE_POLICY)


def find_safe_global(module: str, name: str) -> Any:
    """Resolve a pickled global from :data:`REFERENCE_POLICY`, or raise :class:`UnsafeCheckpointError` naming it."""
    return REFERENCE_POLICY.find(module, name)


def load_reference_checkpoint(path: str | os.PathLike) -> Any:
    """The unpickled contents of a reference ``.pkl`` (``pickle.dump``) or ``.pt`` (``torch.save``), with
    persistent objects as :class:`PersistentObject` s. Nothing in the file is executed."""
    path = Path(path)
    with open(path, "rb") as f:
        is_zip = f.read(4).startswith(b"PK")
        f.seek(0)
        if is_zip and looks_like_torchscript(path):
            # torch.load hands such an archive to torch.jit.load, whatever pickle module it is given, and that
            # runs the archive's own code (its classes' __setstate__).
            raise UnsafeCheckpointError(f"{path} is a TorchScript archive, not a checkpoint of network weights; "
                                        "refused without loading it (loading TorchScript runs code from the file)")
        if is_zip or path.suffix in (".pt", ".pth"):  # torch.save: zip container or the legacy stream
            return torch.load(f, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
        return restricted_load(f, REFERENCE_POLICY)


def state_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state_dict of a pickled module tree: ``_parameters`` and persistent ``_buffers`` by dotted name."""
    state = getattr(obj, "state", None) if isinstance(obj, (PersistentObject, Stub)) else None
    if not isinstance(state, dict):
        raise ValueError(f"{prefix or 'network'}: not a pickled module ({type(obj).__name__})")
    out: dict[str, torch.Tensor] = {}
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is not None and name not in skip:
                out[prefix + name] = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(state_tensors(child, f"{prefix}{name}."))
    return out


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers, tuples -> lists, so init kwargs are JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def network_from_reference(obj: Any) -> torch.nn.Module:
    """Build the project's network for a pickled reference network and copy its tensors by name."""
    if not isinstance(obj, PersistentObject):
        raise ValueError(f"expected a pickled reference network, got {type(obj).__name__}")
    precond = PRECOND_ALIASES.get(obj.class_name)
    if precond is None:
        raise ValueError(f"unknown network class {obj.class_name!r} in the checkpoint; "
                         f"known: {', '.join(sorted(PRECOND_ALIASES))}")
    cls = PRECONDS[precond]
    args = tuple(_plain(list(obj.state.get("_init_args") or ())))
    kwargs = {str(k): _plain(v) for k, v in dict(obj.state.get("_init_kwargs") or {}).items()}
    for name in IGNORED_INIT_KWARGS:
        kwargs.pop(name, None)
    try:
        bound = dict(inspect.signature(cls).bind(*args, **kwargs).arguments)
        model_kwargs = bound.pop("model_kwargs", {})
        net = build_network(precond, **bound, **model_kwargs)
    except TypeError as exc:
        raise ValueError(f"{obj.class_name}: cannot rebuild from its init arguments {sorted(kwargs)}: {exc}") from exc
    tensors = state_tensors(obj)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(f"{obj.class_name}: checkpoint tensors do not match the rebuilt network: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}, wrong shape {wrong[:8]}")
    net.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)
    return net.eval().requires_grad_(False)


def load_reference_network(path: str | os.PathLike, device: torch.device | str = "cpu", key: str = "ema") -> torch.nn.Module:
    """The project's network from a reference ``.pkl`` / ``.pt`` (its ``key`` entry, ``'ema'`` by default)."""
    data = load_reference_checkpoint(path)
    if not isinstance(data, dict) or key not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected a dict with the key {key!r}, found {keys}")
    try:
        return network_from_reference(data[key]).to(device)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc

