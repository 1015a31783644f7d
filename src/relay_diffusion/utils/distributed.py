"""Thin wrappers around ``torch.distributed`` for ``torchrun`` (env:// rendezvous, ports never forced).

One process per device. Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything runs in a
single process and these functions are no-ops.

Faults end every process: the launch environment is checked before any waiting (:func:`launch_env`), the
rendezvous waits at most :data:`CONNECT_TIMEOUT` for the other processes, every collective fails after the
``timeout`` given to :func:`init` (``--timeout``), a process that fails tells the others through the
rendezvous store (:func:`shutdown` with ``failed=True``), and a collective that fails because another process
failed, died or stopped raises :class:`PeerFailure` instead of the backend's error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

#: Collective timeout of ``rdm train`` / ``rdm generate`` (``--timeout``), in minutes. torch's own default is
#: 30 minutes (10 for NCCL); a step or a sampler batch of this project takes seconds.
DEFAULT_TIMEOUT_MIN = 10.0
#: Longest wait for the other processes to join the rendezvous (at most the collective timeout). ``torchrun``
#: starts every process of a node together, so a longer wait means a stale or partial launch environment.
CONNECT_TIMEOUT = timedelta(seconds=60)
_FAILED_KEY = "relay_diffusion/failed"  # set in the rendezvous store by a process that failed
_store: Optional[Any] = None  # the rendezvous store of this process's group (None without one)
_timeout_min = DEFAULT_TIMEOUT_MIN
T = TypeVar("T")


class LaunchError(RuntimeError):
    """The environment announces several processes but does not describe a usable rendezvous."""


class PeerFailure(RuntimeError):
    """A collective failed because another process failed, died or stopped. ``reported``: that process said
    so itself (and printed its own error), so this one need not repeat it."""

    def __init__(self, message: str, reported: bool) -> None:
        super().__init__(message)
        self.reported = reported


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: Optional[int] = None) -> Optional[int]:
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise LaunchError(f"environment variable {name}={text!r} is not an integer (it is set by torchrun; "
                          f"unset it to run a single process)") from None


def env_world_size() -> int:
    """Number of processes announced by ``torchrun`` (1 without it); readable before initialisation."""
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise LaunchError(f"environment variable WORLD_SIZE={world} must be at least 1 (unset it to run a "
                          f"single process)")
    return world


def launch_env() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from the environment, checked: with ``WORLD_SIZE`` > 1 the variables
    of an env:// rendezvous (``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, set by ``torchrun``)
    must all be present and valid, else :class:`LaunchError` names them (a ``WORLD_SIZE`` left over in a shell
    would otherwise wait for processes that never come)."""
    world = env_world_size()
    if world == 1:
        return 1, 0, _env_int("LOCAL_RANK", 0) or 0
    missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v, "").strip()]
    if missing:
        raise LaunchError(f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          f"not: start the command with torchrun, or unset WORLD_SIZE and RANK to run one process")
    rank, local_rank, port = _env_int("RANK"), _env_int("LOCAL_RANK"), _env_int("MASTER_PORT")
    if not 0 <= rank < world:
        raise LaunchError(f"environment variable RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    if local_rank < 0 or local_rank > rank:
        raise LaunchError(f"environment variable LOCAL_RANK={local_rank} does not fit RANK={rank}")
    if not 0 < port < 65536:
        raise LaunchError(f"environment variable MASTER_PORT={port} is not a port number")
    return world, rank, local_rank


def pick_device(requested: str | None, local_rank: int, world_size: int = 1) -> torch.device:
    """``requested`` as given, except that a bare ``cuda`` means ``cuda:LOCAL_RANK``; ``None`` or ``auto``:
    cuda if present, else cpu. With several processes (``world_size`` > 1) an explicit index (``cuda:0``) is
    refused: every process would use that one GPU. A bad device string raises ValueError naming it."""
    if requested in (None, "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {requested!r}: {exc}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {requested!r} is not supported (use cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested!r}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and world_size > 1:
            raise ValueError(f"device {requested!r} names one GPU for all {world_size} processes; use --device cuda "
                             f"(each process takes cuda:LOCAL_RANK)")
        count = torch.cuda.device_count()
        if device.index is None:
            if local_rank >= count and count != 1:
                raise ValueError(f"device 'cuda' for LOCAL_RANK={local_rank}: this machine has {count} visible CUDA "
                                 f"device(s); start at most {count} process(es) per machine")
            # one visible GPU for a process of LOCAL_RANK >= 1: a launcher gave each process its own
            # (CUDA_VISIBLE_DEVICES per process, as SLURM's --gpus-per-task does)
            device = torch.device("cuda", local_rank if local_rank < count else 0)
        if device.index >= count:
            raise ValueError(f"device {device}: this machine has {count} CUDA device(s)")
    return device


def init(requested_device: str | None, timeout_min: float = DEFAULT_TIMEOUT_MIN) -> DistContext:
    """Join the process group that ``torchrun`` describes (gloo on CPU, NCCL on CUDA); collectives fail after
    ``timeout_min`` minutes. Raises :class:`LaunchError` for an unusable environment or a rendezvous the other
    processes do not join within :data:`CONNECT_TIMEOUT`, ValueError for a bad device."""
    global _store, _timeout_min
    world, rank, local_rank = launch_env()
    device = pick_device(requested_device, local_rank, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        timeout = timedelta(minutes=timeout_min)
        try:  # the store first, with a short wait of its own; then the group, with the collective timeout
            store, rank, world = next(dist.rendezvous("env://", timeout=min(timeout, CONNECT_TIMEOUT)))
        except (RuntimeError, ValueError) as exc:  # DistStoreError / DistNetworkError, bad address
            waited = min(timeout, CONNECT_TIMEOUT).total_seconds()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200].rstrip(".")
            raise LaunchError(
                f"rendezvous at MASTER_ADDR={os.environ['MASTER_ADDR']} MASTER_PORT={os.environ['MASTER_PORT']} "
                f"(RANK={rank}, WORLD_SIZE={world}) did not complete within {waited:g} s: {first}; start the command "
                f"with torchrun, or unset WORLD_SIZE and RANK to run one process") from None
        store.set_timeout(timeout)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        _store, _timeout_min = store, timeout_min
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown(wait: bool = False, failed: bool = False) -> None:
    """Leave the process group (no-op without one); ``wait``: first wait for every process. ``failed``: this
    process stops on an error; tell the others first, so that they stop at their next collective without
    repeating it (:class:`PeerFailure` with ``reported``)."""
    global _store
    if dist.is_initialized():
        if failed and _store is not None:
            try:
                _store.set(_FAILED_KEY, str(dist.get_rank()))
            except RuntimeError:  # the store's host is gone already: the others see the group fail anyway
                pass
        try:
            if wait and not failed:
                _collective(dist.barrier)
        finally:
            dist.destroy_process_group()
            _store = None


def peer_failure(exc: BaseException) -> Optional[PeerFailure]:
    """``exc`` (raised by a collective) as a :class:`PeerFailure`: another process reported a failure, or the
    backend lost contact with one or timed out; None for an error of this process's own."""
    reported = False
    if _store is not None:
        try:
            reported = _store.check([_FAILED_KEY])
        except RuntimeError:
            reported = False
    text = str(exc)
    lost = isinstance(exc, dist.DistError) or any(
        k in text for k in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset", "Timed out"))
    if not (reported or lost):
        return None
    if reported:
        return PeerFailure("another process failed (its error is reported by that process)", reported=True)
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    first = first.split("] ", 1)[-1][:160]  # without the backend's source location
    return PeerFailure(f"lost contact with another process (it failed, was killed or stopped; a collective waits "
                       f"at most --timeout {_timeout_min:g} min): {first}", reported=False)


def _collective(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        failure = peer_failure(exc)
        if failure is None:
            raise
        raise failure from None


def barrier() -> None:
    if dist.is_initialized():
        _collective(dist.barrier)


def _flag_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes (in place, returned for chaining)."""
    if dist.is_initialized():
        _collective(dist.all_reduce, x, op=dist.ReduceOp.SUM)
    return x


def all_max(value: int) -> int:
    """The largest of every process's ``value`` (e.g. the number of batches of the busiest process)."""
    if not dist.is_initialized():
        return value
    x = torch.tensor([value], dtype=torch.int64, device=_flag_device())
    _collective(dist.all_reduce, x, op=dist.ReduceOp.MAX)
    return int(x.item())


def any_failed(failed: bool) -> bool:
    """Whether any process (this one included) has ``failed``; every process must call it at the same point,
    e.g. once per batch, so that an error in one ends all of them there instead of at a later collective."""
    return all_max(int(failed)) > 0


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every process (e.g. the run folder, a random seed)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    _collective(dist.broadcast_object_list, box, src=src)
    return box[0]
