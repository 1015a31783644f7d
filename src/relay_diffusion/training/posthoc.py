"""Post-hoc EMA files (EDM2, section 3): the profile snapshots a run writes and the networks rebuilt from them.

With ``--ema-profiles`` a run writes, at every ``--snap``, one network per tracked power-function EMA into
``<run>/phema/phema-<nimg>-<sigma_rel>.safetensors`` (the project's snapshot format, so each is itself a usable
network). :func:`reconstruct_network` combines them with the least-squares coefficients of
:mod:`relay_diffusion.training.phema` into the network of any other EMA length; :func:`sweep_losses` scores a
range of lengths on the run's data with fixed noise, so one run shows which length is best.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from relay_diffusion.checkpoints.snapshot import read_config, save_network
from relay_diffusion.training.config import ConfigError
from relay_diffusion.training.phema import PowerEMATracker, gamma_of_sigma_rel, posthoc_coefficients

PROFILE_DIR = "phema"
_NAME = re.compile(r"^phema-(\d+)-(\d+\.\d+)\.safetensors$")


def profile_snapshot_path(run_dir: str | os.PathLike, nimg: int, sigma_rel: float) -> Path:
    return Path(run_dir) / PROFILE_DIR / f"phema-{int(nimg):012d}-{sigma_rel:.4f}.safetensors"


def save_profile_snapshots(tracker: PowerEMATracker, run_dir: Path, nimg: int, step: int, batch: int,
                           extra: dict[str, Any]) -> list[Path]:
    """Write one snapshot per tracked profile (atomically, through :func:`save_network`), with its time."""
    paths = []
    for sigma_rel, gamma, ema in zip(tracker.sigma_rels, tracker.gammas, tracker.emas):
        meta = {**extra, "phema": {"sigma_rel": sigma_rel, "gamma": gamma, "nimg": int(nimg), "step": int(step),
                                   "batch": int(batch)}}
        paths.append(save_network(ema, profile_snapshot_path(run_dir, nimg, sigma_rel), extra=meta))
    return paths


@dataclass(frozen=True)
class ProfileSnapshot:
    path: Path
    nimg: int
    sigma_rel: float
    config: dict[str, Any]


def list_profile_snapshots(run_dir: str | os.PathLike) -> list[ProfileSnapshot]:
    """The profile snapshots of a run folder, by (nimg, sigma_rel); raises :class:`ConfigError` (``--run``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError("--run", f"no such run folder: {run_dir}")
    folder = run_dir / PROFILE_DIR
    found = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not _NAME.match(path.name):
            continue
        try:
            config = read_config(path)
            info = config["phema"]
            found.append(ProfileSnapshot(path, int(info["nimg"]), float(info["sigma_rel"]), config))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for damaged files
            raise ConfigError("--run", f"{path} is not a readable post-hoc EMA snapshot: {exc}") from None
    if not found:
        raise ConfigError("--run", f"{run_dir} holds no post-hoc EMA snapshots ({PROFILE_DIR}/phema-*.safetensors); "
                                   f"train with --ema-profiles to write them")
    return sorted(found, key=lambda s: (s.nimg, s.sigma_rel))


def select_inputs(snapshots: Sequence[ProfileSnapshot], nimg: Optional[int] = None,
                  profiles: Optional[Sequence[float]] = None) -> tuple[list[ProfileSnapshot], int]:
    """The snapshots a reconstruction at ``nimg`` (default: the latest) may use: those at or before it, of
    the tracked ``profiles`` (default: all)."""
    times = sorted({s.nimg for s in snapshots})
    if nimg is None:
        nimg = times[-1]
    elif nimg not in times:
        raise ConfigError("--nimg", f"no snapshot at {nimg} images; the run has snapshots at {_short(times)}")
    chosen = [s for s in snapshots if 0 < s.nimg <= nimg]
    if profiles is not None:
        tracked = sorted({s.sigma_rel for s in snapshots})
        missing = [p for p in profiles if not any(math.isclose(p, t, rel_tol=0, abs_tol=5e-5) for t in tracked)]
        if missing:
            raise ConfigError("--from-profiles", f"{missing} not tracked; the run tracks {tracked}")
        chosen = [s for s in chosen if any(math.isclose(p, s.sigma_rel, rel_tol=0, abs_tol=5e-5) for p in profiles)]
    if not chosen:
        raise ConfigError("--nimg", f"no post-hoc EMA snapshots with 0 < nimg <= {nimg}")
    first = chosen[0].config
    for s in chosen:
        if (s.config.get("precond"), s.config.get("init_kwargs")) != (first.get("precond"), first.get("init_kwargs")):
            raise ConfigError("--run", f"{s.path.name} holds a different network than {chosen[0].path.name}")
    return chosen, nimg


def reconstruct_state(inputs: Sequence[ProfileSnapshot], nimg: int, sigma_rel: float
                      ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """``sum_i x_i`` (snapshot i) in float64 for the least-squares coefficients ``x``; float32 state_dict.
    Non-floating tensors (if any) are taken from the last input."""
    coefs = posthoc_coefficients([s.nimg for s in inputs], [s.sigma_rel for s in inputs], nimg, sigma_rel)
    total: dict[str, torch.Tensor] = {}
    for snapshot, x in zip(inputs, coefs):
        tensors = load_finite(snapshot.path)
        for name, tensor in tensors.items():
            if not tensor.is_floating_point():
                total[name] = tensor
            elif name in total:
                total[name] += tensor.double() * float(x)
            else:
                total[name] = tensor.double() * float(x)
    return {k: v.float() if v.is_floating_point() else v for k, v in total.items()}, coefs


def load_finite(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a profile snapshot; a damaged file or non-finite weights raise one error naming it (an
    EMA of them would be non-finite too, and written as a network that makes black images)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for damaged files
        raise ConfigError("--run", f"cannot read {path}: {exc}") from None
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ConfigError("--run", f"{path} holds non-finite weights ({bad}); leave it out with --nimg or "
                                   "--from-profiles")
    return tensors


def build_from_config(config: dict[str, Any]) -> torch.nn.Module:
    from relay_diffusion.networks.precond import build_network

    return build_network(config["precond"], **config["init_kwargs"]).eval().requires_grad_(False)


def reconstruct_network(run_dir: str | os.PathLike, sigma_rel: float, out: str | os.PathLike,
                        nimg: Optional[int] = None, profiles: Optional[Sequence[float]] = None) -> Path:
    """Write the network of EMA length ``sigma_rel`` at ``nimg`` images (default: the run's latest profile
    snapshot) to ``out`` (``.safetensors`` + ``.json``), keeping the snapshots' config extras (stage,
    relay settings), so ``load_network`` and ``rdm generate`` take it like any snapshot."""
    _check_length("--length", sigma_rel)
    inputs, nimg = select_inputs(list_profile_snapshots(run_dir), nimg, profiles)
    state, coefs = reconstruct_state(inputs, nimg, sigma_rel)
    latest = max(inputs, key=lambda s: s.nimg).config
    net = build_from_config(latest)
    net.load_state_dict(state, strict=True)
    extra = {k: v for k, v in latest.items() if k not in ("format", "precond", "init_kwargs", "phema")}
    extra.update(kimg=nimg / 1000, step=latest["phema"]["step"], posthoc_ema={
        "sigma_rel": float(sigma_rel), "gamma": gamma_of_sigma_rel(sigma_rel), "nimg": int(nimg),
        "inputs": [{"file": s.path.name, "coefficient": float(x)} for s, x in zip(inputs, coefs)],
    })
    return save_network(net, out, extra=extra)


def _check_length(option: str, sigma_rel: float) -> None:
    try:
        gamma_of_sigma_rel(sigma_rel)
    except ValueError as exc:
        raise ConfigError(option, str(exc)) from None


def _short(values: Sequence[int]) -> str:
    values = list(values)
    return ", ".join(map(str, values)) if len(values) <= 6 else \
        f"{', '.join(map(str, values[:3]))}, ..., {', '.join(map(str, values[-2:]))}"


# --- loss sweep ---------------------------------------------------------------------------------------------
@torch.no_grad()
def fixed_noise_loss(net: torch.nn.Module, loss_fn, images: torch.Tensor, labels: Optional[torch.Tensor],
                     seeds: Sequence[int], batch: int = 64) -> float:
    """Mean per-pixel loss of ``net`` on ``images [N, C, H, W]`` (in [-1, 1]) with sample i's noise drawn from
    the generator of ``seeds[i]``: the same draws for every network, so losses of networks compare."""
    from relay_diffusion.core.rng import SeedGenerators

    total, count = 0.0, 0
    for start in range(0, len(images), batch):
        end = min(len(images), start + batch)
        rng = SeedGenerators(list(seeds[start:end]), images.device)
        lab = labels[start:end] if labels is not None else None
        loss = loss_fn(net, images[start:end], rng, labels=lab)
        total += float(loss.double().sum())
        count += loss.numel()
    return total / count


def _run_data(run_dir: Path, num_images: int, device: torch.device):
    """The run's dataset (from ``training_options.json``): images, labels and its loss function."""
    from relay_diffusion.training.config import TrainingConfig
    from relay_diffusion.training.plan import build_loss, open_dataset

    path = run_dir / "training_options.json"
    try:
        options = json.loads(path.read_text())
        cfg = TrainingConfig.from_dict(options["config"])
        dataset = open_dataset(cfg, cache=False)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ConfigError("--run", f"cannot read the run's options and data ({path}): {exc}") from None
    n = min(num_images, len(dataset))
    items = [dataset[i] for i in range(n)]
    images = torch.stack([torch.as_tensor(x) for x, _ in items]).to(device, torch.float32) / 127.5 - 1
    labels = torch.stack([torch.as_tensor(y) for _, y in items]).to(device, torch.float32) if cfg.cond else None
    return images, labels, build_loss(options["loss"])


def sweep_losses(run_dir: str | os.PathLike, lengths: Sequence[float], nimg: Optional[int] = None,
                 profiles: Optional[Sequence[float]] = None, num_images: int = 256, repeats: int = 2,
                 device: torch.device | str = "cpu") -> dict[str, Any]:
    """The fixed-noise loss of the reconstructed network at every EMA length in ``lengths`` (and of the
    tracked profiles themselves, for comparison), on the first ``num_images`` images of the run's data,
    each seen ``repeats`` times with different noise. Returns ``{"nimg", "points": [{sigma_rel, loss}],
    "tracked": [...]}``."""
    for v in lengths:
        _check_length("--sweep", v)
    run_dir, device = Path(run_dir), torch.device(device)
    snapshots = list_profile_snapshots(run_dir)
    inputs, nimg = select_inputs(snapshots, nimg, profiles)
    images, labels, loss_fn = _run_data(run_dir, num_images, device)
    images = images.repeat(repeats, 1, 1, 1)
    labels = labels.repeat(repeats, 1) if labels is not None else None
    seeds = list(range(len(images)))
    net = build_from_config(inputs[-1].config).to(device)

    def score(state: dict[str, torch.Tensor], what: str) -> float:
        net.load_state_dict(state, strict=True)
        loss = fixed_noise_loss(net, loss_fn, images, labels, seeds)
        if not math.isfinite(loss):
            raise ConfigError("--sweep", f"the loss of {what} is not finite ({loss}); nothing was written")
        return loss

    points = [{"sigma_rel": float(s), "loss": score(reconstruct_state(inputs, nimg, s)[0], f"EMA length {s}")}
              for s in sorted(lengths)]
    tracked = [{"sigma_rel": s.sigma_rel, "loss": score(load_finite(s.path), s.path.name)}
               for s in snapshots if s.nimg == nimg]
    return {"nimg": int(nimg), "num_images": len(images), "points": points, "tracked": tracked}


def plot_sweep(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Loss against EMA length as a PNG (tracked profiles as markers)."""
    from relay_diffusion.training.stats import plot_loss

    points = [(p["sigma_rel"], p["loss"]) for p in result["points"]]
    markers = [(p["sigma_rel"], p["loss"]) for p in result["tracked"]]
    plot_loss(points, Path(path), xlabel="EMA length sigma_rel", smooth=False, markers=markers,
              title=f"loss vs post-hoc EMA length at kimg {result['nimg'] / 1000:g} (dots: tracked)")
    return Path(path)
