"""Speed options of a network: ``torch.compile``, channels-last memory format, bf16 on the CPU; and the
gradient handling of the training step (EDM's loss scaling and non-finite clamp).

Everything here changes how a network computes, never what it computes up to float rounding: compiled,
channels-last and eager contiguous networks agree to ~1e-6 relative on the CPU (``tests/test_speed.py``);
bf16 to a few 1e-2. Parameter names, ``state_dict`` and checkpoints are unchanged by every option.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

#: Clamp of non-finite gradient entries (EDM's ``nan_to_num(nan=0, posinf=1e5, neginf=-1e5)``).
GRAD_CLAMP = 1e5


def backbone(net: torch.nn.Module) -> torch.nn.Module:
    """The U-Net of a preconditioned network (its ``model``), else the module itself."""
    model = getattr(net, "model", None)
    return model if isinstance(model, torch.nn.Module) else net


def compile_network(net: torch.nn.Module, **options) -> torch.nn.Module:
    """``torch.compile`` the backbone of ``net`` in place (``nn.Module.compile``: parameter names and
    ``state_dict`` keys stay as they are, so snapshots, EMA and resume are unaffected). The preconditioning
    around it and the samplers stay eager. Returns ``net``."""
    model = backbone(net)
    if not hasattr(model, "compile"):
        raise RuntimeError(f"--compile needs torch >= 2.2 (nn.Module.compile); this is torch {torch.__version__}")
    model.compile(**options)
    return net


def is_compiled(net: torch.nn.Module) -> bool:
    return getattr(backbone(net), "_compiled_call_impl", None) is not None


def use_channels_last(net: torch.nn.Module) -> torch.nn.Module:
    """Store the 4-D weights of ``net`` channels-last (NHWC) in place; convolutions then run in NHWC (they
    follow the weights' format), which oneDNN and cuDNN prefer. Outputs keep their values (to float
    rounding) and their shape. Returns ``net``."""
    return net.to(memory_format=torch.channels_last)


def allow_cpu_bf16(net: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Let a preconditioned network whose ``precision`` is ``'bf16'`` compute in bfloat16 also on the CPU
    (by default reduced precision applies on CUDA only, see :mod:`relay_diffusion.networks.precond`).

    This runs the network's own reduced-precision path (weights cast to the input's dtype, as on CUDA), not
    ``torch.autocast``, so the CPU test suite exercises the code that runs on GPUs. A run-time switch of
    this module only: never saved, copied by ``copy.deepcopy`` (the EMA). Returns ``net``."""
    for module in net.modules():
        if hasattr(module, "precision") and hasattr(module, "compute_dtype"):
            if enabled and module.precision != "bf16":
                raise ValueError(f"reduced precision on the CPU is bf16 only; the network's precision is "
                                 f"{module.precision!r}")
            module.reduced_on_cpu = enabled
    return net


def prepare_network(net: torch.nn.Module, *, compile: bool = False, channels_last: bool = False,
                    cpu_bf16: bool = False) -> torch.nn.Module:
    """Apply the speed options (in place; channels-last first so that compile sees the final layout)."""
    if channels_last:
        use_channels_last(net)
    if cpu_bf16:
        allow_cpu_bf16(net)
    if compile:
        compile_network(net)
    return net


def prepare_training(net: torch.nn.Module, ema: torch.nn.Module, cfg, device: torch.device) -> None:
    """The speed options of a :class:`~relay_diffusion.training.config.TrainingConfig` for the trained
    network and its EMA: ``--precision bf16`` computes in bf16 on the CPU too (both networks, so the sample
    grids do as well); ``--compile`` and ``--channels-last`` apply to the trained network only (the EMA is
    written as safetensors, which wants contiguous tensors, and is used for a few grids only)."""
    set_numerics(device, cfg.precision, getattr(cfg, "tf32", None))
    cpu_bf16 = cfg.precision == "bf16" and torch.device(device).type == "cpu"
    prepare_network(net, compile=cfg.compile, channels_last=cfg.channels_last, cpu_bf16=cpu_bf16)
    if cpu_bf16:
        allow_cpu_bf16(ema)


def default_tf32(precision: str | None) -> bool:
    """TF32 is on by default for reduced-precision runs (``'fp16'``, ``'bf16'``: their float32 parts, such as
    the loss and the preconditioning, gain speed and lose nothing the network's precision keeps) and off for
    ``'fp32'`` (and a network's own precision, ``None``), so that fp32 means IEEE float32."""
    return precision in ("fp16", "bf16")


def network_precision(nets: Iterable[torch.nn.Module]) -> str:
    """The reduced precision (``'fp16'`` or ``'bf16'``) that any of ``nets`` computes in, else ``'fp32'``."""
    found = {getattr(net, "precision", "fp32") for net in nets}
    return next((p for p in ("bf16", "fp16") if p in found), "fp32")


def resolve_tf32(precision: str | None, tf32: bool | None = None) -> bool:
    """``tf32`` when given, else :func:`default_tf32` of ``precision``: the value a run records."""
    return default_tf32(precision) if tf32 is None else bool(tf32)


def set_numerics(device: torch.device | str, precision: str | None, tf32: bool | None = None) -> bool:
    """The one place where float32 matrix products and convolutions are told whether they may use TF32.

    On CUDA this sets both cuBLAS (``torch.backends.cuda.matmul.allow_tf32``) and cuDNN
    (``torch.backends.cudnn.allow_tf32``), whose torch defaults differ (off / on), so an fp32 run is IEEE
    float32 throughout unless TF32 is asked for. The ``allow_tf32`` flags are used on every torch: newer
    torch keeps its ``fp32_precision`` settings in step with them, while setting ``fp32_precision``
    directly makes ``torch.get_float32_matmul_precision()`` (read by the compiler) raise. On other devices
    nothing is set. Returns the resolved value (:func:`resolve_tf32`), which runs record either way."""
    value = resolve_tf32(precision, tf32)
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = value
        torch.backends.cudnn.allow_tf32 = value
    return value


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (CUDA, MPS); nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def adam_options(device: torch.device | str) -> dict:
    """``{'fused': True}`` where this torch has a fused Adam kernel for ``device`` (CUDA; the CPU from torch
    2.4), else ``{}``. Measured on the bundled stage-1 network (7.7 M parameters, one CPU thread): 64 ms
    against 208 ms per step for the default for-loop (``foreach`` is no faster on the CPU); the result
    differs from it by float rounding (~1e-8)."""
    try:
        torch.optim.Adam([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError, TypeError):
        return {}
    return {"fused": True}


def _multi_tensor(tensors: list[torch.Tensor], multi_tensor: bool | None) -> bool:
    """Whether to use torch's multi-tensor (``_foreach``) kernels: by default on accelerators, where they
    replace one kernel launch per tensor with a few; on the CPU the per-tensor loop measured faster."""
    if multi_tensor is None:
        return bool(tensors) and tensors[0].device.type != "cpu"
    return multi_tensor


def clamp_gradients(params: Iterable[torch.nn.Parameter], multi_tensor: bool | None = None) -> torch.Tensor:
    """EDM's treatment of (fp16) gradient overflow: NaN gradient entries become 0 and +-inf become
    +-:data:`GRAD_CLAMP`, in place, and the step is applied anyway (there is no dynamic scale: the loss scale
    ``--ls`` is a constant, which Adam's update is invariant to up to ``eps``). Returns a 0-dim bool tensor on
    the gradients' device: whether any entry was not finite.

    Branch-free, so nothing is read back to the host: every gradient goes through ``nan_to_num`` (the identity
    on finite values), and the flag comes from each tensor's extremes (NaN or inf exactly when the tensor has a
    non-finite entry; unlike a sum, they cannot overflow). With ``multi_tensor`` (the default off the CPU) the
    extremes are one ``_foreach_norm`` (max-norm) instead of one reduction per tensor; on the CPU they are
    ``aminmax`` per tensor (the max-norm is not vectorised there: 8x slower). Measured on the CPU, one thread,
    25 M parameters in 386 tensors: 15 ms (aminmax 12, ``nan_to_num`` 5 on their own), against 4 ms for the
    former one-read check, which read its result back and clamped only when it had to."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.bool)
    if _multi_tensor(grads, multi_tensor):
        extremes = torch._foreach_norm(grads, math.inf)
    else:
        extremes = [torch.stack(torch.aminmax(g)) for g in grads]  # NaN propagates into both
    overflow = ~torch.isfinite(torch.stack(extremes)).all()
    for g in grads:
        torch.nan_to_num(g, nan=0.0, posinf=GRAD_CLAMP, neginf=-GRAD_CLAMP, out=g)
    return overflow


def optimizer_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()``, or no change at all where the 0-dim bool tensor ``skip`` is true, decided on the
    device (no host read).

    A fused optimizer takes the flag the way ``torch.amp.GradScaler`` hands it over (``found_inf``): its kernel
    leaves parameters, moments and step count as they were. Any other optimizer steps, then puts the old
    values back where ``skip`` (state it created in that step goes back to zeros, the fresh state of Adam):
    a few copies of the parameters, for torch builds without a fused kernel."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    kept = {id(t): t.clone() for p in params for t in [p, *optimizer.state.get(p, {}).values()]
            if isinstance(t, torch.Tensor)}
    optimizer.step()
    with torch.no_grad():
        for p in params:
            for t in [p, *optimizer.state[p].values()]:
                if isinstance(t, torch.Tensor):
                    old = kept.get(id(t))
                    t.copy_(torch.where(skip.to(t.device), torch.zeros_like(t) if old is None else old, t))


@torch.no_grad()
def ema_update(ema_params: Iterable[torch.Tensor], net_params: Iterable[torch.Tensor], beta: float | torch.Tensor,
               multi_tensor: bool | None = None) -> None:
    """``ema = lerp(net, ema, beta) = net + beta (ema - net)`` for every pair, written in place. ``beta``: a
    number, or a 0-dim tensor on the parameters' device (e.g. 1 for a skipped step, which keeps the EMA exactly;
    the same values as the number otherwise).

    Bit-identical to EDM's ``ema.copy_(net.lerp(ema, beta))``. On the CPU (the default there) each pair is one
    ``lerp`` written straight into the EMA, without EDM's temporary and second pass (about 0.7x the time;
    ``torch._foreach_lerp`` was slower there). With ``multi_tensor`` (the default off the CPU) it is one
    ``_foreach_lerp`` and one ``_foreach_copy_`` over all tensors: the same values, a few kernel launches
    instead of one per tensor. ``ema.lerp_(net, 1 - beta)`` would round differently, so it is not used."""
    emas, nets = list(ema_params), [p.detach() for p in net_params]
    if isinstance(beta, torch.Tensor) and emas:
        beta = beta.to(emas[0].dtype)
    if _multi_tensor(emas, multi_tensor):
        # A tensor weight goes in as a list (the scalar overload would read it back to the host); torch may then
        # run the list tensor by tensor, with the same values.
        values = torch._foreach_lerp(nets, emas, [beta] * len(emas) if isinstance(beta, torch.Tensor) else beta)
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(emas, values)
        else:  # older torch
            for e, v in zip(emas, values):
                e.copy_(v)
        return
    for e, p in zip(emas, nets):
        torch.lerp(p, e, beta, out=e)
