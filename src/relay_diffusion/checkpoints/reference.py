"""Import the reference implementation's ``.pkl`` and ``.pt`` checkpoints without executing them (docs/math.md §10).

The reference pickles every network object as a call ``torch_utils.persistence._reconstruct_persistent_obj(meta)``
whose ``meta`` carries the class's Python source (``module_src``), the class name and the object's
``__dict__``. Loading such a file with :mod:`pickle` runs that source. Here a restricted unpickler resolves
only an allow-list of globals: the persistence call becomes a :class:`PersistentObject` (class name and
state; the source is dropped unread), torch containers become inert :class:`ModuleStub` s, tensors are
rebuilt by torch's own tensor helpers, and every other global is refused with an error naming it.
The project's network is then built from the top-level ``_init_kwargs`` and its tensors copied by name.
"""

from __future__ import annotations

import _compat_pickle
import collections
import inspect
import io
import os
import pickle
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint refers to a Python global outside the allow-list."""


@dataclass
class PersistentObject:
    """What the reference pickled with its class source: the class name and the object's state, nothing run."""

    class_name: str
    state: dict[str, Any] = field(default_factory=dict)


class ModuleStub:
    """Inert stand-in for a ``torch.nn`` container (``ModuleDict``, ``ModuleList``...): holds its state only."""

    torch_class = "torch.nn.Module"

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state if isinstance(state, dict) else {}


class AttrDict(dict):
    """Stand-in for the reference's ``dnnlib.util.EasyDict`` (a dict with attribute access)."""


def _persistent_object(meta: Any) -> PersistentObject:
    """Replacement of ``_reconstruct_persistent_obj``: reads ``class_name`` and ``state``, never ``module_src``."""
    if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str):
        raise UnsafeCheckpointError("malformed persistent object: no class_name")
    if meta.get("type", "class") != "class":
        raise UnsafeCheckpointError(f"unsupported persistent object type {meta.get('type')!r}")
    state = meta.get("state") or {}
    if not isinstance(state, dict):
        raise UnsafeCheckpointError(f"persistent object {meta['class_name']}: state is not a dict")
    return PersistentObject(meta["class_name"], dict(state))


def _load_storage_bytes(data: bytes) -> Any:
    """Replacement of ``torch.storage._load_from_bytes`` (how plain pickles hold tensor storages): the
    bytes are a ``torch.save`` of one storage, read with torch's weights-only loader."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool, backward_hooks: Any, state: Any = None) -> torch.Tensor:
    """Parameters come back as plain tensors: only their values are copied."""
    return data


def _encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode``, which protocol-2 pickles use for ``bytes``; only text codecs."""
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafeCheckpointError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode(encoding)


def _numpy_scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    """``numpy.core.multiarray.scalar`` for plain (non-object) dtypes."""
    dtype = np.dtype(dtype)
    if dtype.hasobject or data is None:
        raise UnsafeCheckpointError(f"refusing numpy scalar of dtype {dtype}")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocols 0 and 1), for the stand-in classes only."""
    if not (isinstance(cls, type) and issubclass(cls, (ModuleStub, AttrDict))) or base not in (object, dict):
        raise UnsafeCheckpointError(f"refusing copyreg._reconstructor for {cls!r}")
    return cls.__new__(cls) if base is object else cls()


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("dnnlib.util", "EasyDict"): AttrDict,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}
_STUBS: dict[str, type] = {}


def _module_stub(module: str, name: str) -> type | None:
    """An inert class for a ``torch.nn`` module class (no torch code runs on unpickling it)."""
    if not module.startswith("torch.nn.modules.") or not isinstance(getattr(torch.nn, name, None), type):
        return None
    key = f"{module}.{name}"
    if key not in _STUBS:
        _STUBS[key] = type(name, (ModuleStub,), {"torch_class": key})
    return _STUBS[key]


def _numpy_dtype_class(module: str, name: str) -> type | None:
    """numpy >= 1.25 may pickle dtypes through their classes, e.g. ``numpy.dtypes.Float64DType``."""
    if module == "numpy.dtypes" and name.endswith("DType"):
        cls = getattr(getattr(np, "dtypes", None), name, None)
        return cls if isinstance(cls, type) and issubclass(cls, np.dtype) else None
    return None


def find_safe_global(module: str, name: str) -> Any:
    """Resolve a pickled global from the allow-list, or raise :class:`UnsafeCheckpointError` naming it."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    found = _SAFE_GLOBALS.get((module, name)) or _module_stub(module, name) or _numpy_dtype_class(module, name)
    if found is None and module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        found = getattr(torch, name)
    if found is None:
        raise UnsafeCheckpointError(
            f"refusing to load the global {module}.{name}: it is not needed for network weights, and "
            "loading it could execute code from the checkpoint"
        )
    return found


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that resolves globals through :func:`find_safe_global` only."""

    def find_class(self, module: str, name: str) -> Any:
        return find_safe_global(module, name)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


#: A pickle-compatible module for ``torch.load(..., pickle_module=...)``: torch's zip reader supplies the
#: storages, and every other global goes through the allow-list.
restricted_pickle = types.SimpleNamespace(
    __name__="relay_diffusion.checkpoints.reference.restricted_pickle",
    Unpickler=RestrictedUnpickler,
    load=_restricted_load,
)


def load_reference_checkpoint(path: str | os.PathLike) -> Any:
    """The unpickled contents of a reference ``.pkl`` (``pickle.dump``) or ``.pt`` (``torch.save``), with
    persistent objects as :class:`PersistentObject` s. Nothing in the file is executed."""
    path = Path(path)
    with open(path, "rb") as f:
        is_zip = f.read(4).startswith(b"PK")
        f.seek(0)
        if is_zip or path.suffix in (".pt", ".pth"):  # torch.save: zip container or the legacy stream
            return torch.load(f, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
        return RestrictedUnpickler(f).load()


def state_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state_dict of a pickled module tree: ``_parameters`` and persistent ``_buffers`` by dotted name."""
    state = getattr(obj, "state", None) if isinstance(obj, (PersistentObject, ModuleStub)) else None
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

