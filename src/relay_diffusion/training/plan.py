"""Everything decided before training starts: validation against the data and the processes, the network and
loss settings, the run folder. Bad input fails here, with a :class:`ConfigError` naming the option, before
any process group, network or file exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from relay_diffusion.core.process import BlurProcess
from relay_diffusion.core.sr import SRCondition
from relay_diffusion.data.cache import cache_refusal
from relay_diffusion.training.config import (AUGMENT_DIM, PRECOND_NETWORKS, STAGE2_PRECONDS, ConfigError, TrainingConfig,
                                             resume_conflicts)
from relay_diffusion.utils.distributed import env_world_size
from relay_diffusion.training.order import default_workers
from relay_diffusion.training.rundir import run_files
from relay_diffusion.training.state import check_state, latest_intact_state
from relay_diffusion.utils.jsonio import dumps_strict


@dataclass(frozen=True)
class DatasetInfo:
    """What the run learns from: the dataset of ``--data`` as it was found."""

    path: str
    name: str
    size: int
    resolution: int
    channels: int
    label_dim: int


@dataclass(frozen=True)
class NetworkSpec:
    """The network to train: a preconditioning class of :mod:`relay_diffusion.networks.precond` and its arguments."""

    precond: str
    init_kwargs: dict[str, Any]

    def build(self) -> torch.nn.Module:
        from relay_diffusion.networks.precond import build_network

        return build_network(self.precond, **self.init_kwargs)


LOSS_NAMES = ("EDMLoss", "VPLoss", "VELoss", "BlurLoss", "SRLoss")


@dataclass(frozen=True)
class LossSpec:
    """The loss: its name, the label dropout and, for the blur loss, the forward process (for the
    super-resolution loss, the condition)."""

    name: str
    label_dropout: float = 0.0
    process: Optional[BlurProcess] = None
    condition: Optional[SRCondition] = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "label_dropout": self.label_dropout}
        if self.process is not None:
            d["process"] = self.process.to_dict()
        if self.condition is not None:
            d["condition"] = self.condition.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LossSpec":
        """Inverse of :meth:`to_dict` (as stored in ``training_options.json``)."""
        if not isinstance(d, dict) or d.get("name") not in LOSS_NAMES:
            raise ValueError(f"not a loss description: {d!r}")
        process, condition = d.get("process"), d.get("condition")
        return cls(d["name"], float(d.get("label_dropout", 0.0)),
                   BlurProcess.from_dict(process) if process is not None else None,
                   SRCondition.from_dict(condition) if condition is not None else None)

    def build(self):
        from relay_diffusion.core.losses import BlurLoss, BlurLossConfig, EDMLoss, VELoss, VPLoss
        from relay_diffusion.core.sr import SRLoss

        if self.name == "SRLoss":
            return SRLoss(self.condition or SRCondition(), label_dropout=self.label_dropout)
        if self.name == "BlurLoss":
            return BlurLoss(BlurLossConfig(self.process or BlurProcess()), label_dropout=self.label_dropout)
        return {"VPLoss": VPLoss, "VELoss": VELoss, "EDMLoss": EDMLoss}[self.name](label_dropout=self.label_dropout)


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer: Adam with EDM's settings, at the learning rate ``lr`` (``--lr``; the loop warms it up). The
    one place these settings are written: the loop builds the optimizer from here and ``training_options.json``
    records them from here."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    name = "Adam"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr, "betas": list(self.betas), "eps": self.eps}

    def build(self, params, **options: Any) -> torch.optim.Optimizer:
        """The optimizer of ``params``; ``options``: the device's extras (:func:`relay_diffusion.utils.accel.adam_options`)."""
        return torch.optim.Adam(params, lr=self.lr, betas=self.betas, eps=self.eps, **options)


@dataclass
class TrainingPlan:
    """A validated configuration plus what follows from it (the resolved options of the run)."""

    config: TrainingConfig
    world_size: int
    batch_gpu: int                      # per process and accumulation round
    rounds: int                         # gradient accumulation rounds per step
    dataset: DatasetInfo
    network: NetworkSpec
    loss: LossSpec
    resume_state: Optional[str] = None  # training-state file to start from
    resume_in_place: bool = False       # --resume named a run folder: keep writing into it
    notes: list[str] = field(default_factory=list)
    workers: int = 0                    # loader worker processes per process (--workers, or its default here)

    @property
    def stage(self) -> int:
        return 2 if self.config.precond in STAGE2_PRECONDS else 1

    @property
    def optimizer(self) -> OptimizerSpec:
        return OptimizerSpec(self.config.lr)

    def options(self, run_dir: Optional[str] = None) -> dict[str, Any]:
        """The resolved options, as written to ``training_options.json`` and printed by ``--dry-run``."""
        return {
            "config": self.config.to_dict(),
            "run_dir": run_dir,
            "stage": self.stage,
            "world_size": self.world_size,
            "batch_gpu": self.batch_gpu,
            "accumulation_rounds": self.rounds,
            "dataset": dataclasses.asdict(self.dataset),
            "network": dataclasses.asdict(self.network),
            "loss": self.loss.to_dict(),
            "optimizer": self.optimizer.to_dict(),
            "resume_state": self.resume_state,
            "workers": self.workers,
            "notes": self.notes,
        }

    def to_json(self, run_dir: Optional[str] = None) -> str:
        return dumps_strict(self.options(run_dir), indent=2)


def open_dataset(cfg: TrainingConfig, cache: Optional[bool] = None, workers: int = 0):
    """The training images of ``--data`` (with labels when ``--cond``); with ``--cache``, backed by the
    machine's shared decoded copy (built first, with ``workers`` decoding processes, if there is none)."""
    from relay_diffusion.data.dataset import ImageFolderDataset

    return ImageFolderDataset(cfg.data, use_labels=cfg.cond, xflip=cfg.xflip,
                              cache=cfg.cache if cache is None else cache, cache_dir=cfg.cache_dir,
                              cache_workers=workers)


def network_spec(cfg: TrainingConfig, resolution: int, channels: int, label_dim: int) -> NetworkSpec:
    """Precond class and constructor arguments: the ``--arch`` preset with the size overrides applied."""
    from relay_diffusion.networks.precond import arch_config

    arch = dict(arch_config(cfg.arch, resolution))
    overrides = {"model_channels": cfg.cbase, "channel_mult": cfg.cres, "num_blocks": cfg.num_blocks,
                 "attn_resolutions": cfg.attn}
    arch.update({k: v for k, v in overrides.items() if v is not None})
    levels = len(arch["channel_mult"])
    if resolution % (1 << (levels - 1)):
        raise ConfigError("--cres", f"{levels} resolution levels need a resolution divisible by "
                                    f"{1 << (levels - 1)}; the dataset has {resolution}")
    kwargs: dict[str, Any] = dict(
        img_resolution=resolution, img_channels=channels, label_dim=label_dim if cfg.cond else 0,
        use_fp16=cfg.precision == "fp16", precision=cfg.precision, dropout=cfg.dropout,
        label_dropout=cfg.label_dropout, **arch,
    )
    if cfg.augment > 0:
        kwargs["augment_dim"] = AUGMENT_DIM
    if cfg.precond == "sr":
        kwargs.update(cond_channels=channels, level_channel=cfg.condition().level_channel)
    return NetworkSpec(PRECOND_NETWORKS[cfg.precond], kwargs)


def loss_spec(cfg: TrainingConfig) -> LossSpec:
    if cfg.precond == "blur":
        return LossSpec("BlurLoss", cfg.label_dropout, cfg.process())
    if cfg.precond == "sr":
        return LossSpec("SRLoss", cfg.label_dropout, condition=cfg.condition())
    return LossSpec({"vp": "VPLoss", "ve": "VELoss", "edm": "EDMLoss"}[cfg.precond], cfg.label_dropout)


def build_loss(spec: LossSpec | dict[str, Any]):
    """The loss of ``spec`` (a :class:`LossSpec`, or its dict from ``training_options.json``)."""
    return (spec if isinstance(spec, LossSpec) else LossSpec.from_dict(spec)).build()


def plan_training(cfg: TrainingConfig, world_size: Optional[int] = None) -> TrainingPlan:
    """Validate ``cfg`` against the dataset and the number of processes; raises :class:`ConfigError`."""
    cfg.validate()
    world_size = env_world_size() if world_size is None else world_size
    batch_gpu, rounds = cfg.check_world(world_size)
    if not os.path.exists(cfg.data):
        raise ConfigError("--data", f"no such file or folder: {cfg.data}")
    try:
        ds = open_dataset(cfg, cache=False)
        info = DatasetInfo(path=os.path.abspath(cfg.data), name=ds.name, size=len(ds), resolution=ds.resolution,
                           channels=ds.num_channels, label_dim=ds.label_dim)
    except (ValueError, OSError) as exc:
        raise ConfigError("--data", f"cannot read the dataset: {exc}") from exc
    cfg.check_dataset(info.resolution, info.label_dim > 0, info.size)
    if cfg.cache:
        refusal = cache_refusal(ds.decoded_bytes)
        if refusal is not None:
            raise ConfigError("--cache", refusal)
    network = network_spec(cfg, info.resolution, info.channels, info.label_dim)
    _check_network_builds(network)

    notes = []
    if precision_used(cfg) != cfg.precision:
        notes.append(f"--precision {cfg.precision} computes in {precision_used(cfg)} on the CPU (reduced precision is "
                     "CUDA's; the CPU has bf16); the run is named for what it computes in")
    resume_state, in_place = None, False
    if cfg.resume is not None:
        if os.path.isdir(cfg.resume):
            found, skipped = latest_intact_state(cfg.resume)
            notes += skipped
            if found is None:
                why = f" ({'; '.join(skipped)})" if skipped else ""
                raise ConfigError("--resume", f"no intact training-state-*.pt in the run folder {cfg.resume}{why}")
            resume_state, in_place = str(found), True
            notes.append(f"resuming in place in {cfg.resume} from {found.name}")
        elif os.path.isfile(cfg.resume):
            try:
                check_state(cfg.resume)
            except ValueError as exc:
                raise ConfigError("--resume", str(exc)) from exc
            resume_state = cfg.resume
        else:
            raise ConfigError("--resume", f"no such run folder or state file: {cfg.resume}")
    if resume_state is not None:
        saved = saved_run_config(resume_state, in_place)
        conflicts = resume_conflicts(saved, cfg) if saved is not None else []
        if conflicts:
            raise ConfigError("--resume", "these options contradict the run being resumed (leave them out to "
                                          "continue with the run's own):\n  " + "\n  ".join(conflicts))
    if cfg.resume is None and cfg.nosubdir and run_files(Path(cfg.outdir)):
        raise ConfigError("--nosubdir", f"{cfg.outdir} already holds a training run ({', '.join(run_files(Path(cfg.outdir))[:3])}"
                                        "); continue it with --resume, or choose another --outdir")
    if os.path.isdir(cfg.data) and Path(cfg.outdir).resolve().is_relative_to(Path(cfg.data).resolve()):
        # its sample grids and snapshots would become part of the data set of the next run
        raise ConfigError("--outdir", f"{cfg.outdir} is inside the data folder {cfg.data}; write runs elsewhere")
    if cfg.transfer is not None:
        if not os.path.isfile(cfg.transfer):
            raise ConfigError("--transfer", f"no such file: {cfg.transfer}")
        if not cfg.transfer.endswith(".safetensors"):
            raise ConfigError("--transfer", "expected a .safetensors network snapshot; convert reference "
                                            ".pkl/.pt files first with `rdm convert`")
        from relay_diffusion.checkpoints.snapshot import file_shapes

        try:
            file_shapes(cfg.transfer)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a damaged header
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError("--transfer", f"{cfg.transfer} is not a readable safetensors file ({reason})") from None
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    local_processes = min(world_size, int(local)) if local.isdigit() and int(local) > 0 else world_size
    workers = cfg.workers if cfg.workers is not None else default_workers(local_processes)
    return TrainingPlan(config=cfg, world_size=world_size, batch_gpu=batch_gpu, rounds=rounds, dataset=info,
                        network=network, loss=loss_spec(cfg), resume_state=resume_state,
                        resume_in_place=in_place, notes=notes, workers=workers)


def saved_run_config(resume_state: str, in_place: bool) -> Optional[dict[str, Any]]:
    """The config section a resumed run was started with (its ``training_options.json``, else the state's own
    copy), with the seed it drew; None when neither says."""
    from relay_diffusion.training.config import saved_config

    options_file = Path(resume_state).parent / "training_options.json"
    if in_place and options_file.is_file():
        try:
            return saved_config(str(options_file))
        except ConfigError:
            pass
    try:
        state = torch.load(resume_state, map_location="cpu", weights_only=True, mmap=True)
        options = json.loads(state.get("options") or "{}")
    except (ValueError, RuntimeError, OSError, RecursionError):
        return None
    config = options.get("config") if isinstance(options, dict) else None
    if not isinstance(config, dict):
        return None
    if config.get("seed") is None and isinstance(state.get("seed"), int):
        config = {**config, "seed": state["seed"]}
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    return {k: v for k, v in config.items() if k in known and k != "resume"}


def _check_network_builds(network: NetworkSpec) -> None:
    """Build the network without memory (meta device), so a bad size override fails now, not mid-setup."""
    try:
        with torch.device("meta"):
            network.build()
    except (ValueError, TypeError, AssertionError, ZeroDivisionError) as exc:
        raise ConfigError("--arch", f"cannot build the {network.precond} network: {exc}") from exc


def precision_used(cfg: TrainingConfig) -> str:
    """The precision the network really computes in: ``--precision fp16`` runs in fp32 on the CPU (reduced
    precision is CUDA's, and bf16 the CPU's)."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.precision == "fp16" and torch.device(device).type == "cpu":
        return "fp32"
    return cfg.precision


def run_dir_name(plan: TrainingPlan) -> str:
    """``<dataset>-<cond>-<arch>-<precond>-gpus<N>-batch<B>-<precision>[-<desc>]``, as EDM names runs; the
    precision is the one the network computes in (:func:`precision_used`)."""
    cfg = plan.config
    desc = (f"{plan.dataset.name}-{'cond' if cfg.cond else 'uncond'}-{cfg.arch}-{cfg.precond}"
            f"-gpus{plan.world_size}-batch{cfg.batch}-{precision_used(cfg)}")
    return desc + (f"-{cfg.desc}" if cfg.desc else "")


def _next_run_id(outdir: Path) -> int:
    ids = [int(m.group()) for m in (re.match(r"^\d+", p.name) for p in outdir.iterdir() if p.is_dir()) if m]
    return max(ids, default=-1) + 1


def preview_run_dir(plan: TrainingPlan) -> str:
    """The folder a run would use, without creating it (for ``--dry-run``)."""
    cfg = plan.config
    if plan.resume_in_place:
        return str(cfg.resume)
    outdir = Path(cfg.outdir)
    if cfg.nosubdir:
        return str(outdir)
    run_id = _next_run_id(outdir) if outdir.is_dir() else 0
    return str(outdir / f"{run_id:05d}-{run_dir_name(plan)}")


def create_run_dir(plan: TrainingPlan) -> Path:
    """Create the next ``NNNNN-<desc>`` folder (racing runs get distinct ids), or reuse the resumed one."""
    cfg = plan.config
    if plan.resume_in_place:
        return Path(cfg.resume)
    outdir = Path(cfg.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if cfg.nosubdir:
        return outdir
    while True:
        path = outdir / f"{_next_run_id(outdir):05d}-{run_dir_name(plan)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
