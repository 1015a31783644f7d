"""Network snapshots: safetensors weights with the JSON config in the file's metadata and beside it.

A snapshot ``name.safetensors`` holds the state_dict; its metadata key ``relay_diffusion`` and the sidecar
``name.json`` hold ``{"format", "precond", "init_kwargs", ...extra}``, enough to rebuild the network
with :func:`relay_diffusion.networks.precond.build_network`. Loading never executes code from the file.
The JSON is strict (``utils.jsonio``): a non-finite float such as ``sigma_max`` = inf is the string ``"inf"``,
read back as a float under the known float arguments (``FLOAT_KWARGS``); older files with ``Infinity`` load too.
Reference ``.pkl`` / ``.pt`` checkpoints are imported by :mod:`relay_diffusion.checkpoints.reference`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from relay_diffusion.networks.precond import FLOAT_KWARGS
from relay_diffusion.utils.fileio import atomic_path, atomic_write_text
from relay_diffusion.utils.jsonio import dumps_strict, loads_strict

FORMAT = "relay-diffusion/network-1"
META_KEY = "relay_diffusion"


def network_config(net: torch.nn.Module) -> dict[str, Any]:
    """The JSON-serialisable config that rebuilds ``net``."""
    init_kwargs = getattr(net, "init_kwargs", None)
    if init_kwargs is None:
        raise TypeError(f"{type(net).__name__} has no init_kwargs; only the project's networks can be saved")
    return {"format": FORMAT, "precond": type(net).__name__, "init_kwargs": init_kwargs}


def save_network(
    net: torch.nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``path`` (``.safetensors``) and its ``.json`` sidecar atomically. ``dtype`` (e.g. float16)
    converts floating-point tensors for compact storage; they are loaded back as float32."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    config = {**network_config(net), **(extra or {})}
    state = {}
    for k, v in net.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        state[k] = v.contiguous()
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={META_KEY: dumps_strict(config)})
    atomic_write_text(path.with_suffix(".json"), dumps_strict(config, indent=2) + "\n")
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config stored in a snapshot's metadata (falls back to the ``.json`` sidecar)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if META_KEY in meta:
        return loads_strict(meta[META_KEY], FLOAT_KWARGS)
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        return loads_strict(sidecar.read_text(), FLOAT_KWARGS)
    raise ValueError(f"{path}: no relay-diffusion config in its metadata and no {sidecar.name} beside it")


def file_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a safetensors file, from its header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> None:
    """A ``ValueError`` listing what differs between the tensors a network needs and those a file holds."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or wrong:
        shown = [f"{k} {found[k]} where its config needs {expected[k]}" for k in wrong[:3]]
        raise ValueError(f"its weights do not match the network its config describes: {len(missing)} missing "
                         f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of another "
                         f"shape{': ' + '; '.join(shown) if shown else ''}")


def load_safetensors_network(path: str | os.PathLike, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild a network from a snapshot written by :func:`save_network` (float32, eval mode).

    The network its config describes is first built on the meta device (no memory) and its tensor shapes are
    checked against the file's header, so a small file whose config asks for a huge network is refused
    before anything is allocated."""
    from safetensors.torch import load_file

    from relay_diffusion.networks.precond import build_network

    config = read_config(path)
    shapes = file_shapes(path)
    kwargs = config["init_kwargs"]
    blocks, levels = kwargs.get("num_blocks", 1), kwargs.get("channel_mult", [1])
    if isinstance(blocks, int) and isinstance(levels, list) and blocks * len(levels) > len(shapes):
        # every residual block holds several tensors: such a config cannot match, and building even its
        # skeleton would take the time and memory of millions of modules
        raise ValueError(f"its config asks for {blocks} blocks at each of {len(levels)} resolutions, more than "
                         f"the {len(shapes)} tensors it holds")
    with torch.device("meta"):
        skeleton = build_network(config["precond"], **config["init_kwargs"])
    check_shapes({k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, shapes)
    del skeleton
    net = build_network(config["precond"], **config["init_kwargs"])
    state = load_file(str(path))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False).to(device)


#: The stage kinds a snapshot can declare (``stage_kind``): stage 1, a blur-diffusion relay stage and a
#: cascaded super-resolution stage (:mod:`relay_diffusion.core.sr`).
STAGE_KINDS = ("edm", "relay", "sr")


def stage_kind(config: dict[str, Any]) -> str | None:
    """``'edm'`` (stage 1), ``'relay'`` (a relay stage), ``'sr'`` (super-resolution) or None (not recorded, e.g. a
    converted reference file).
    Reads ``stage_kind`` and, for older snapshots, ``stage`` (1 or 2)."""
    kind = config.get("stage_kind")
    if kind is None:
        kind = {1: "edm", 2: "relay"}.get(config.get("stage"))
    if kind is not None and kind not in STAGE_KINDS:
        raise ValueError(f"unknown stage_kind {kind!r}; expected one of {', '.join(STAGE_KINDS)}")
    return kind


def stage_process(config: dict[str, Any]):
    """The :class:`BlurProcess` a relay snapshot was trained with (``process``, or the older ``blur`` key), else None."""
    from relay_diffusion.core.process import BlurProcess

    process = config.get("process", config.get("blur"))
    if process is None:
        return None
    if not isinstance(process, dict):
        raise ValueError(f"its forward process is not a JSON object: {process!r}")
    return BlurProcess.from_dict(process)


def stage_condition(config: dict[str, Any]):
    """The :class:`relay_diffusion.core.sr.SRCondition` a super-resolution snapshot was trained with, else None."""
    from relay_diffusion.core.sr import SRCondition

    condition = config.get("condition")
    if condition is None:
        return None
    if not isinstance(condition, dict):
        raise ValueError(f"its super-resolution condition is not a JSON object: {condition!r}")
    return SRCondition.from_dict(condition)
