"""One restricted unpickler for every pickle the project reads (docs/math.md §10); each reader declares its policy.

A pickle names the Python globals (functions, classes) it needs to be rebuilt, and :mod:`pickle` imports and
calls them: that is how a file can run code. :class:`RestrictedUnpickler` resolves a global only through an
:class:`UnpicklePolicy`: an allow-list mapping ``(module, name)`` to the object used in its place (torch's
tensor helpers, containers, inert stand-ins), then the policy's resolvers for whole families (torch dtypes,
``torch.nn`` module classes), and refuses everything else with :class:`UnsafePickleError` naming the global.
Nothing is imported from the names in a file, and the replacements never run code from it.

The readers: reference checkpoints (``checkpoints.reference``), the Inception pickle (``metrics.detector``) and
the CIFAR-10 batches (``data.sources``). The building blocks shared by their policies are defined here; torch
is imported only by the blocks for tensors, so the dataset tool reads CIFAR-10 without it.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

#: A resolver for a family of globals: the replacement for ``(module, name)``, or None when not in the family.
Resolver = Callable[[str, str], Any]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle refers to a Python global its policy does not allow (or misuses an allowed one)."""


@dataclass(frozen=True)
class UnpicklePolicy:
    """Which globals a kind of pickle may name, and what stands in for each; everything else is refused."""

    what: str                                   # the kind of file, for errors: "a reference checkpoint"
    needed_for: str                             # what the file is read for: "network weights"
    allowed: Mapping[tuple[str, str], Any]      # (module, name) -> the object used in its place
    resolvers: tuple[Resolver, ...] = field(default=())  # families of globals, tried in order

    def find(self, module: str, name: str) -> Any:
        """The replacement of the global ``module.name``, or :class:`UnsafePickleError` naming it."""
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))  # Python 2 names
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = self.allowed.get((module, name))
        if found is None:
            found = next((f for f in (resolve(module, name) for resolve in self.resolvers) if f is not None), None)
        if found is None:
            raise UnsafePickleError(
                f"refusing to load {module}.{name} from {self.what}: it is not needed for {self.needed_for}, "
                "and loading it could execute code from the file"
            )
        return found


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that resolves globals through its :class:`UnpicklePolicy` only."""

    def __init__(self, file: BinaryIO, policy: UnpicklePolicy, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.policy = policy

    def find_class(self, module: str, name: str) -> Any:
        return self.policy.find(module, name)


def restricted_load(file: BinaryIO, policy: UnpicklePolicy, **kwargs: Any) -> Any:
    """``pickle.load(file)`` under ``policy``."""
    return RestrictedUnpickler(file, policy, **kwargs).load()


def pickle_module(policy: UnpicklePolicy) -> types.SimpleNamespace:
    """A pickle-compatible module for ``torch.load(..., pickle_module=...)``: torch's zip reader supplies the
    storages, every global goes through ``policy``."""

    class Unpickler(RestrictedUnpickler):
        def __init__(self, file: BinaryIO, **kwargs: Any) -> None:
            super().__init__(file, policy, **kwargs)

    return types.SimpleNamespace(__name__=f"{__name__}.restricted_pickle", Unpickler=Unpickler,
                                 load=lambda file, **kwargs: restricted_load(file, policy, **kwargs))


# ----------------------------------------------------------------------------------------------
# Inert stand-ins.

@dataclass
class PersistentObject:
    """What the reference pickled with its class source: the class name and the object's state, nothing run."""

    class_name: str
    state: dict[str, Any] = field(default_factory=dict)


class Stub:
    """Inert stand-in for a class a pickle names: records constructor arguments, state and items, runs nothing.
    ``pickled_name`` is the global it replaces."""

    pickled_name = ""
    args: tuple = ()
    kwargs: dict = {}
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    @property
    def items(self) -> dict:
        return self.__dict__.setdefault("_items", {})

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.items[len(self.items)] = value

    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)


class AttrDict(dict):
    """Stand-in for the reference's ``dnnlib.util.EasyDict`` (a dict with attribute access)."""


_STUBS: dict[str, type[Stub]] = {}


def stub_class(module: str, name: str) -> type[Stub]:
    """The (cached) inert :class:`Stub` subclass standing in for the class ``module.name``."""
    key = f"{module}.{name}"
    if key not in _STUBS:
        _STUBS[key] = type(name, (Stub,), {"pickled_name": key, "__module__": f"stub:{module}"})
    return _STUBS[key]


# ----------------------------------------------------------------------------------------------
# Replacements of the globals pickles of tensors and numpy arrays use.

def persistent_object(meta: Any) -> PersistentObject:
    """Replacement of ``torch_utils.persistence._reconstruct_persistent_obj``: reads ``class_name`` and
    ``state``, never ``module_src``."""
    if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str):
        raise UnsafePickleError("malformed persistent object: no class_name")
    if meta.get("type", "class") != "class":
        raise UnsafePickleError(f"unsupported persistent object type {meta.get('type')!r}")
    state = meta.get("state") or {}
    if not isinstance(state, dict):
        raise UnsafePickleError(f"persistent object {meta['class_name']}: state is not a dict")
    return PersistentObject(meta["class_name"], dict(state))


def rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *_ignored: Any) -> Any:
    """``torch._utils._rebuild_tensor(_v2)``; the pickled ``requires_grad``, hooks and metadata are dropped."""
    import torch

    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, collections.OrderedDict())


def rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    """Parameters come back as plain tensors: only their values are read."""
    import torch

    return data if isinstance(data, torch.Tensor) else torch.as_tensor(data)


def storage_from_bytes(data: bytes) -> Any:
    """``torch.storage._load_from_bytes`` (how plain pickles hold tensor storages): the bytes are a
    ``torch.save`` of one storage, read with torch's weights-only loader."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def encode_text(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode``, which protocol-2 pickles use for ``bytes``; only text codecs."""
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode(encoding)


def numpy_scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    """``numpy.core.multiarray.scalar`` for plain (non-object) dtypes."""
    dtype = np.dtype(dtype)
    if dtype.hasobject or data is None:
        raise UnsafePickleError(f"refusing numpy scalar of dtype {dtype}")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    """``copyreg._reconstructor`` (protocols 0 and 1), for the stand-in classes and plain dicts only."""
    if isinstance(cls, type) and issubclass(cls, (Stub, AttrDict)) and base in (object, dict):
        return cls()
    if cls in (dict, collections.OrderedDict):
        return cls()
    raise UnsafePickleError(f"refusing copyreg._reconstructor for {cls!r}")


def tensor_globals() -> dict[tuple[str, str], Any]:
    """Tensors and the containers of a state dict, as ``torch.save`` / ``pickle.dump`` of torch objects write them."""
    import torch

    return {
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): storage_from_bytes,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("copyreg", "_reconstructor"): reconstructor,
    }
#: The reference's (EDM's) ``persistence`` call: the pickled object becomes a :class:`PersistentObject`.
PERSISTENCE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): persistent_object,
}
#: numpy scalars and dtypes (not arrays), as reference init kwargs may hold them.
NUMPY_SCALAR_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): numpy_scalar,
    ("numpy._core.multiarray", "scalar"): numpy_scalar,
    ("_codecs", "encode"): encode_text,
}


def torch_dtype(module: str, name: str) -> Any:
    """``torch.float32`` and the other torch dtypes."""
    import torch

    value = getattr(torch, name, None) if module == "torch" else None
    return value if isinstance(value, torch.dtype) else None


def torch_module_stub(module: str, name: str) -> type[Stub] | None:
    """An inert class for a ``torch.nn`` module class (``ModuleDict``, ``Conv2d``...): no torch code runs."""
    import torch

    if module.startswith("torch.nn.modules.") and isinstance(getattr(torch.nn, name, None), type):
        return stub_class(module, name)
    return None


def numpy_dtype_class(module: str, name: str) -> type | None:
    """numpy >= 1.25 may pickle dtypes through their classes, e.g. ``numpy.dtypes.Float64DType``."""
    if module == "numpy.dtypes" and name.endswith("DType"):
        cls = getattr(getattr(np, "dtypes", None), name, None)
        return cls if isinstance(cls, type) and issubclass(cls, np.dtype) else None
    return None


def any_class_stub(module: str, name: str) -> type[Stub] | None:
    """An inert :class:`Stub` for any global named like a class (``CapWords``), whatever its module; functions
    (lower-case names such as ``os.system``, ``builtins.eval``) are left to be refused. Safe because the stub
    is never the class itself: it only records what the pickle hands it."""
    return stub_class(module, name) if name[:1].isupper() and name.isidentifier() else None


# ----------------------------------------------------------------------------------------------
# TorchScript archives: their tensors, without TorchScript.

#: ``torch.<Name>Storage`` (how a pickle names a storage's element type) -> dtype name.
STORAGE_DTYPES = {"FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
                  "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                  "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}


@dataclass(frozen=True)
class StorageType:
    """Stand-in for ``torch.FloatStorage`` and its kind in a persistent id: only the element type is read."""

    dtype_name: str


def storage_type(module: str, name: str) -> StorageType | None:
    return StorageType(STORAGE_DTYPES[name]) if module == "torch" and name in STORAGE_DTYPES else None


def _identity_list(values: Any, *_ignored: Any) -> Any:
    """``torch.jit._pickle.build_intlist`` and the like: the list itself."""
    if not isinstance(values, list):
        raise UnsafePickleError(f"refusing torch.jit._pickle list builder on {type(values).__name__}")
    return values


def _restore_type_tag(value: Any, _type: Any = None) -> Any:
    return value


def torchscript_policy() -> UnpicklePolicy:
    """What a TorchScript archive's ``data.pkl`` may name: tensors and storages, TorchScript's list builders,
    and the archive's own module classes (``__torch__.*``), which become inert stubs holding their attributes.
    (A function: the tensor globals import torch, which the dataset tool does without.)"""
    allowed = {("torch.jit._pickle", name): _identity_list
               for name in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")}
    allowed[("torch.jit._pickle", "restore_type_tag")] = _restore_type_tag
    return UnpicklePolicy(what="a TorchScript archive", needed_for="its tensors",
                          allowed={**tensor_globals(), **allowed}, resolvers=(storage_type, torchscript_class))


def torchscript_class(module: str, name: str) -> type[Stub] | None:
    """An inert stub for a class the archive defines itself (``__torch__.<module> <Class>``)."""
    return stub_class(module, name) if module.split(".")[0] == "__torch__" and name.isidentifier() else None


def looks_like_torchscript(path: Any) -> bool:
    """Whether the zip at ``path`` is (or poses as) a TorchScript archive: a ``constants.pkl`` record or a
    ``code/`` folder, which is what makes ``torch.load`` hand it to ``torch.jit.load``."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return any(n.rsplit("/", 1)[-1] == "constants.pkl" or "/code/" in f"/{n}" for n in names)


def torchscript_prefix(names: list[str]) -> str | None:
    """The folder of a TorchScript archive's records (``'name/'``), or None when the zip is not TorchScript
    (it has ``constants.pkl`` or a ``code/`` folder beside its ``data.pkl``)."""
    for name in names:
        if name.endswith("/data.pkl") and name.count("/") == 1:
            prefix = name[: -len("data.pkl")]
            if f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names):
                return prefix
    return None


def torchscript_tensors(archive: Any, prefix: str, max_bytes: int) -> dict[str, Any]:
    """Every tensor attribute of the module tree pickled in a TorchScript archive (an open
    :class:`zipfile.ZipFile`), by dotted attribute name, read from its ``data.pkl`` under
    :func:`torchscript_policy` and its ``data/`` records: no TorchScript is loaded, no code in the archive runs
    (``torch.jit.load`` would run its classes' ``__setstate__``). Storages whose record is larger than their
    element count says, or that add up to more than ``max_bytes``, are refused."""
    import torch

    budget = {"left": max_bytes}

    def persistent_load(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise UnsafePickleError(f"unsupported persistent id in {prefix}data.pkl")
        dtype = getattr(torch, pid[1].dtype_name)
        size = pid[4] * torch.empty((), dtype=dtype).element_size()
        name = f"{prefix}data/{pid[2]}"
        info = archive.getinfo(name)
        if info.file_size != size or size > budget["left"]:
            raise UnsafePickleError(f"{name}: {info.file_size} bytes where its header says {size}, "
                                    f"or more than the {max_bytes}-byte limit in all")
        budget["left"] -= size
        data = bytearray(archive.read(name))
        untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

    info = archive.getinfo(f"{prefix}data.pkl")
    if info.file_size > 64 << 20:
        raise UnsafePickleError(f"{prefix}data.pkl: {info.file_size} bytes, more than a module tree needs")
    unpickler = RestrictedUnpickler(io.BytesIO(archive.read(info)), torchscript_policy())
    unpickler.persistent_load = persistent_load
    root = unpickler.load()

    out: dict[str, Any] = {}

    def walk(obj: Any, path: str, depth: int) -> None:
        if depth > 64:
            raise UnsafePickleError("module tree nested more than 64 levels deep")
        if isinstance(obj, torch.Tensor):
            out[path.rstrip(".")] = obj
        elif isinstance(obj, Stub) and isinstance(obj.state, dict):
            for key, value in obj.state.items():
                walk(value, f"{path}{key}.", depth + 1)

    walk(root, "", 0)
    return out
