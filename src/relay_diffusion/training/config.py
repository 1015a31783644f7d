"""The training configuration: one typed dataclass, validated once, written next to the run as JSON.

Field names follow the reference command line (``--batch-gpu`` is ``batch_gpu``). Units are the
reference's: ``duration``, ``ema`` and ``lr_rampup`` in millions of images (Mimg), ``tick`` in thousands
of images (kimg), ``snap`` and ``dump`` in ticks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

from relay_diffusion.core.process import BlurProcess, SettingError
from relay_diffusion.core.sr import SRCondition

ARCHS = ("ddpmpp", "ncsnpp", "adm")
PRECOND_CHOICES = ("vp", "ve", "edm", "blur", "sr")
#: The ``--precond`` choices that train a stage refining a smaller image (stage 2): relay and super-resolution.
STAGE2_PRECONDS = ("blur", "sr")
PRECISIONS = ("fp32", "fp16", "bf16")
#: Network class behind each ``--precond``; stage 2 (``blur``) is an ordinary EDM-preconditioned network, a
#: super-resolution stage (``sr``) one with the conditioning image as extra input channels.
PRECOND_NETWORKS = {"vp": "VPPrecond", "ve": "VEPrecond", "edm": "EDMPrecond", "blur": "EDMPrecond",
                    "sr": "SRPrecond"}
#: Number of augmentation labels of EDM's ``--augment`` preset (see :mod:`relay_diffusion.training.augment`).
AUGMENT_DIM = 9
#: The options that are the stage-2 forward process (:class:`BlurProcess`) of a ``--precond blur`` run: each is the
#: BlurProcess field of the same name, with its default; BlurProcess checks them (:meth:`TrainingConfig.validate`).
#: ``up_scale`` is also the relay factor of a super-resolution stage (:class:`SRCondition`, as is ``noise_aug``).
PROCESS_FIELDS = ("up_scale", "block_scale", "prob_length", "blur_sigma_max")
CONDITION_FIELDS = ("up_scale", "noise_aug")
_PROCESS, _CONDITION = BlurProcess(), SRCondition()


def _utf8(text: str) -> bool:
    try:
        str(text).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ConfigError(ValueError):
    """A bad option; ``option`` is its command-line name (e.g. ``--batch-gpu``)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message


@dataclass
class TrainingConfig:
    """Everything a training run depends on. ``None`` means "derived" (see :meth:`resolved_precision` etc.)."""

    outdir: str                                 # where run folders NNNNN-<desc> are created
    data: str                                   # EDM-format dataset: zip or folder
    cond: bool = False                          # train class-conditional (labels from dataset.json)
    arch: str = "adm"                           # ddpmpp | ncsnpp | adm
    precond: str = "edm"                        # vp | ve | edm (stage 1) | blur (stage 2) | sr (super-resolution)
    duration: float = 200.0                     # training length, Mimg
    batch: int = 512                            # global batch size
    batch_gpu: Optional[int] = None             # per-process batch per accumulation round; None = batch / processes
    cbase: Optional[int] = None                 # override model_channels
    cres: Optional[list[int]] = None            # override channel_mult
    num_blocks: Optional[int] = None            # override residual blocks per resolution
    attn: Optional[list[int]] = None            # override attention resolutions ([] = none where optional)
    lr: float = 1e-4                            # Adam learning rate
    lr_rampup: float = 10.0                     # linear learning-rate warm-up, Mimg (0 = none)
    ema: float = 0.5                            # EMA half-life, Mimg
    ema_rampup: float = 0.05                    # EMA half-life is at most this fraction of the images seen
    ema_profiles: Optional[list[float]] = None  # post-hoc EMA: power-function EMA lengths (sigma_rel) to track
    dropout: float = 0.13                       # dropout probability of the residual blocks
    label_dropout: float = 0.0                  # probability of dropping the class label (classifier-free guidance)
    augment: float = 0.0                        # probability of each non-leaking augmentation (0 = off)
    xflip: bool = False                         # add x-flipped copies of the dataset
    precision: str = "fp32"                     # fp32 | fp16 | bf16 network arithmetic (reduced on CUDA; bf16 also on the CPU)
    ls: float = 1.0                             # loss scaling
    bench: bool = True                          # cudnn benchmark mode
    cache: bool = False                         # one decoded copy per machine, memory-mapped (False: decode as read)
    cache_dir: Optional[str] = None             # where that copy is kept; None = ~/.cache/relay-diffusion/datasets
    workers: Optional[int] = None               # loader worker processes per training process; None = 2 if cores allow
    compile: bool = False                       # torch.compile the network (loss, optimizer and EMA stay eager)
    channels_last: bool = False                 # run the network in channels-last memory format
    tf32: Optional[bool] = None                 # TF32 matmuls/convolutions on CUDA; None = on for fp16/bf16, off for fp32
    desc: Optional[str] = None                  # extra text in the run folder name
    nosubdir: bool = False                      # write into --outdir itself
    tick: float = 50.0                          # progress line every this many kimg
    checkpoint_minutes: float = 20.0            # a snapshot and a state at least this often (0: --snap/--dump only)
    snap: Optional[int] = 50                    # network snapshot + sample grid every this many ticks (None = never)
    dump: Optional[int] = 500                   # training state every this many ticks (None = only at the end)
    seed: Optional[int] = None                  # None = random (drawn once, recorded in the run folder)
    transfer: Optional[str] = None              # initial weights: a network snapshot (.safetensors)
    resume: Optional[str] = None                # a run folder (continue in it) or a training-state file
    device: Optional[str] = None                # None = cuda if available, else cpu
    grid: int = 64                              # images in the sample grid at every snapshot (0 = none)
    # Stage 2: the forward process (blur; PROCESS_FIELDS) or the condition (sr; CONDITION_FIELDS), flat as on the
    # command line and in training_options.json; defaults and ranges are BlurProcess's / SRCondition's.
    up_scale: int = _PROCESS.up_scale               # blur, sr: relay factor p
    block_scale: float = _PROCESS.block_scale       # blur: block-noise strength
    prob_length: float = _PROCESS.prob_length       # blur: part of the noise distribution covered (L)
    blur_sigma_max: float = _PROCESS.blur_sigma_max  # blur: strongest blur
    noise_aug: float = _CONDITION.noise_aug         # sr: largest noise-conditioning augmentation level (0 = off)

    # ----------------------------------------------------------------------------------------------
    def validate(self) -> "TrainingConfig":
        """Check every option on its own; raises :class:`ConfigError` naming the first bad one."""
        for option, path in (("--outdir", self.outdir), ("--data", self.data), ("--transfer", self.transfer),
                              ("--resume", self.resume)):
            if path is not None and not _utf8(path):  # the run records its paths in JSON files
                raise ConfigError(option, f"{path!r} is not valid UTF-8; the run records its paths in "
                                          "training_options.json, so rename it")
        _choice("--arch", self.arch, ARCHS)
        _choice("--precond", self.precond, PRECOND_CHOICES)
        _choice("--precision", self.precision, PRECISIONS)
        _positive("--duration", self.duration)
        _positive_int("--batch", self.batch)
        if self.batch_gpu is not None:
            _positive_int("--batch-gpu", self.batch_gpu)
        if self.cbase is not None:
            _positive_int("--cbase", self.cbase)
        if self.cres is not None and (not self.cres or any(m < 1 for m in self.cres)):
            raise ConfigError("--cres", f"expected a non-empty list of positive multipliers, got {self.cres}")
        if self.num_blocks is not None:
            _positive_int("--num-blocks", self.num_blocks)
        if self.attn is not None and any(r < 1 for r in self.attn):
            raise ConfigError("--attn", f"resolutions must be positive, got {self.attn}")
        _positive("--lr", self.lr)
        _non_negative("--lr-rampup", self.lr_rampup)
        _non_negative("--checkpoint-minutes", self.checkpoint_minutes)
        _non_negative("--ema", self.ema)
        if self.ema_profiles is not None:
            _ema_profiles(self.ema_profiles)
        _probability("--dropout", self.dropout)
        _probability("--label-dropout", self.label_dropout)
        _probability("--augment", self.augment)
        _positive("--ls", self.ls)
        if self.workers is not None and self.workers < 0:
            raise ConfigError("--workers", f"must be >= 0, got {self.workers}")
        _positive("--tick", self.tick)
        for opt, v in (("--snap", self.snap), ("--dump", self.dump)):
            if v is not None:
                _positive_int(opt, v)
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ConfigError("--seed", f"must be in [0, 2**63), got {self.seed}")
        if self.grid < 0:
            raise ConfigError("--grid", f"must be >= 0, got {self.grid}")
        if self.label_dropout > 0 and not self.cond:
            raise ConfigError("--label-dropout", "only applies to class-conditional training (--cond=1)")
        try:  # the stage-2 options, by the classes they make up
            if self.precond == "blur":
                self.process().validate(training=True)
            elif self.precond == "sr":
                self.condition().validate()
        except SettingError as exc:
            raise ConfigError("--" + exc.name.replace("_", "-"), exc.message) from None
        if self.precond != "sr" and self.noise_aug != 0:
            raise ConfigError("--noise-aug", "only applies to super-resolution training (--precond sr)")
        if self.transfer is not None and self.resume is not None:
            raise ConfigError("--transfer", "cannot be combined with --resume (the state holds the weights)")
        return self

    def check_world(self, world_size: int) -> tuple[int, int]:
        """``(batch_gpu, accumulation_rounds)`` for ``world_size`` processes; the batch must split evenly."""
        if self.batch % world_size:
            raise ConfigError("--batch", f"{self.batch} is not divisible by the {world_size} processes")
        per_process = self.batch // world_size
        batch_gpu = min(self.batch_gpu or per_process, per_process)
        if per_process % batch_gpu:
            raise ConfigError(
                "--batch-gpu",
                f"--batch {self.batch} is not divisible by --batch-gpu {batch_gpu} x {world_size} processes",
            )
        return batch_gpu, per_process // batch_gpu

    def check_dataset(self, resolution: int, has_labels: bool, size: int) -> None:
        """Checks that need the dataset (its resolution, labels and size)."""
        if size < 1:
            raise ConfigError("--data", f"{self.data} holds no images")
        if self.cond and not has_labels:
            raise ConfigError("--cond", f"the dataset {self.data} has no labels (dataset.json) to condition on")
        if self.precond in STAGE2_PRECONDS and resolution % self.up_scale:
            raise ConfigError(
                "--up-scale", f"the dataset resolution {resolution} is not divisible by --up-scale {self.up_scale}"
            )

    def process(self) -> BlurProcess:
        """The stage-2 forward process of these options (:data:`PROCESS_FIELDS`)."""
        return BlurProcess(**{k: getattr(self, k) for k in PROCESS_FIELDS})

    def condition(self) -> SRCondition:
        """The super-resolution condition of these options (:data:`CONDITION_FIELDS`)."""
        return SRCondition(up_scale=self.up_scale, noise_aug=float(self.noise_aug))

    # ----------------------------------------------------------------------------------------------
    @property
    def total_images(self) -> int:
        """The run ends when this many images have been seen."""
        return max(1, int(round(self.duration * 1e6)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "training options") -> "TrainingConfig":
        """Inverse of :meth:`to_dict`, strict (:mod:`relay_diffusion.utils.strict`): unknown keys and values of
        another type (``"cond": "no"``, ``"lr": 1e999``) are errors naming the field; ranges are checked later
        (:meth:`validate`)."""
        from relay_diffusion.utils.strict import decode

        return decode(cls, d, where, "training options", validate=False)


def saved_config(path: str) -> dict[str, Any]:
    """The options of a run, from its ``training_options.json``, as :class:`TrainingConfig` fields.

    The recorded seed replaces a random one (``seed: null``), so the rerun draws the same numbers;
    ``resume`` is not taken over (resuming is asked for with ``--resume``). Raises :class:`ConfigError`
    (``--config``) for a missing or malformed file.
    """
    try:
        with open(path, "rb") as f:
            options = json.loads(f.read(16 << 20).decode("utf-8"))
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ConfigError("--config", f"{path} is not JSON: {reason}") from None
    if not isinstance(options, dict) or not isinstance(options.get("config"), dict):
        raise ConfigError("--config", f"{path} has no \"config\" section (expected a training_options.json)")
    values = dict(options["config"])
    if values.get("seed") is None and isinstance(options.get("seed"), int):
        values["seed"] = options["seed"]
    values["resume"] = None
    try:
        return TrainingConfig.from_dict(values, where=str(path)).to_dict()
    except (TypeError, ValueError) as exc:
        raise ConfigError("--config", str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}") from None


#: Options a resumed run may change: they decide how long, where and how fast it runs, not what it computes.
RESUME_MUTABLE = frozenset({
    "outdir", "duration", "tick", "snap", "dump", "workers", "device", "bench", "cache", "cache_dir", "batch_gpu", "resume",
    "desc", "nosubdir", "grid", "transfer", "checkpoint_minutes",
})


def resume_conflicts(saved: dict[str, Any], config: "TrainingConfig") -> list[str]:
    """The options of ``config`` that contradict the saved run's (``saved``: its config section), one line each."""
    now = config.to_dict()
    out = []
    for key in sorted(set(saved) & set(now)):
        if key in RESUME_MUTABLE or saved[key] == now[key]:
            continue
        if key == "data" and os.path.abspath(str(saved[key])) == os.path.abspath(str(now[key])):
            continue
        out.append(f"--{key.replace('_', '-')}: {json.dumps(now[key])} given, the run has {json.dumps(saved[key])}")
    return out


def merge_options(saved: dict[str, Any], given_values: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """``saved`` options (:func:`saved_config`) overridden by the options named in ``given`` (those set on the
    command line); options the file lacks keep their value from ``given_values``."""
    return {**saved, **{k: v for k, v in given_values.items() if k in given or k not in saved}}


def _ema_profiles(values: list[float]) -> None:
    """Post-hoc EMA lengths: distinct, each in (0, sqrt(1/12)) (EDM2 tracks 0.05 and 0.10)."""
    limit = math.sqrt(1 / 12)
    for v in values:
        if not (isinstance(v, (int, float)) and 0 < v < limit):
            raise ConfigError("--ema-profiles", f"each EMA length (sigma_rel) must be in (0, {limit:.4f}), got {v}")
    if len(set(values)) != len(values):
        raise ConfigError("--ema-profiles", f"the EMA lengths must be distinct, got {values}")


def _choice(opt: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(opt, f"{value!r} is not one of {', '.join(allowed)}")


def _positive(opt: str, v: float) -> None:
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(opt, f"must be a positive number, got {v}")


def _non_negative(opt: str, v: float) -> None:
    if not (math.isfinite(v) and v >= 0):
        raise ConfigError(opt, f"must be >= 0, got {v}")


def _positive_int(opt: str, v: int) -> None:
    if int(v) != v or v < 1:
        raise ConfigError(opt, f"must be a positive integer, got {v}")


def _probability(opt: str, v: float) -> None:
    if not 0 <= v <= 1:
        raise ConfigError(opt, f"must be in [0, 1], got {v}")
