"""The training loop: EDM's (Adam, EMA with ramp-up, learning-rate warm-up, ticks) for both relay stages.

Per step, every process computes ``loss_scaling * sum(weighted squared errors) / per_process_batch`` over
its accumulation rounds and the gradients are averaged over processes, so the update equals the one a single
process would make on the whole global batch (docs/math.md §5). All randomness is a function of the seed, the step
and the sample's global position (:mod:`relay_diffusion.training.order`): the run is reproducible, the same
with one or several processes (up to float rounding; dropout masks excepted), and bit-identical across a
kill and resume on the CPU.

A step never reads a value back to the host (:mod:`relay_diffusion.training.tally`): losses, skipped and clamped
steps are counted on the device and read once per tick, where the data order is checked too. A step whose loss
is not finite (an fp16 overflow) is skipped on the device, without optimizer or EMA update; its images still
count (``nimg`` and ``step`` advance), so every later step sees the data and random numbers it would have seen
anyway and a resumed run replays the same steps. Only a tick in which every step was skipped stops the run
(:class:`NonFiniteLossError`). Non-finite gradient entries under a finite loss are clamped, as EDM does.
"""

from __future__ import annotations

import contextlib
import copy
import math
import secrets
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from relay_diffusion.checkpoints.snapshot import save_network
from relay_diffusion.utils.fileio import atomic_write_text
from relay_diffusion.utils.jsonio import dumps_strict
from relay_diffusion.core.rng import SeedGenerators
from relay_diffusion.core.sr import upsample
from relay_diffusion.utils import accel, distributed
from relay_diffusion.training import grids
from relay_diffusion.training.augment import AugmentPipe
from relay_diffusion.training.phema import PowerEMATracker
from relay_diffusion.training.posthoc import save_profile_snapshots
from relay_diffusion.training.pace import PaceMeter, first_hour_warning
from relay_diffusion.training.order import (DataOrder, StepLayout, device_batch, dropout_seed, make_loader,
                                            sample_seeds)
from relay_diffusion.training.config import ConfigError
from relay_diffusion.training.plan import TrainingPlan, build_loss, create_run_dir, open_dataset
from relay_diffusion.training.rundir import RunFolderLock, clean_stale_temps, kimg_label, remove_failed_run
from relay_diffusion.training.state import latest_state, load_state, rename_whole_kimg_files, save_state, state_name
from relay_diffusion.training.stats import RunLog, StatsLog, memory_gb, progress_line
from relay_diffusion.training.tally import TickSummary, TickTally

OPTIONS_FILE = "training_options.json"


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or infinite at every step of a tick; the run stopped with none of them applied."""


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with the global generator seeded by ``seed`` and restore it afterwards.

    ``nn.Dropout`` inside the networks draws from the global generator; seeding it per step and round makes
    dropout reproducible across a resume without leaking state to the caller.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed % (1 << 63))
        yield


def ema_beta(nimg: int, batch: int, halflife_mimg: float, rampup: float) -> float:
    """EDM's EMA decay for one step: half-life ``min(halflife, rampup x images seen)`` in images."""
    halflife = halflife_mimg * 1e6
    if rampup > 0:
        halflife = min(halflife, nimg * rampup)
    return 0.5 ** (batch / max(halflife, 1e-8))


def learning_rate(lr: float, nimg: int, rampup_mimg: float) -> float:
    """Linear warm-up over ``rampup_mimg`` million images (EDM), from the images seen before the step."""
    if rampup_mimg <= 0:
        return lr
    return lr * min(nimg / (rampup_mimg * 1e6), 1.0)


def build_training_network(plan: TrainingPlan, seed: int) -> torch.nn.Module:
    """The network with weights drawn from a generator seeded by ``seed`` (same on every process)."""
    from relay_diffusion.networks.layers import init_weights

    with torch.random.fork_rng(devices=[]):  # the constructors draw from the global generator; keep it untouched
        net = plan.network.build()
    return init_weights(net, torch.Generator().manual_seed(seed % (1 << 63)))


def transfer_weights(net: torch.nn.Module, path: str, log) -> None:
    """Copy the tensors of a network snapshot whose names and shapes match (EDM's ``--transfer``)."""
    from safetensors.torch import load_file

    source = load_file(path)
    own = net.state_dict()
    matched = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    with torch.no_grad():
        for k, v in matched.items():
            own[k].copy_(v.to(own[k].dtype))
    log(f"Transferred {len(matched)} of {len(own)} tensors from {path}")


class Trainer:
    """One process's share of a run; :meth:`run` trains until ``--duration`` and returns the run folder."""

    def __init__(self, plan: TrainingPlan, ctx: distributed.DistContext) -> None:
        self.plan, self.ctx, self.cfg = plan, ctx, plan.config
        self.device = ctx.device
        self.layout = StepLayout(self.cfg.batch, plan.batch_gpu, ctx.world_size)
        self._checkpoint_steps: Optional[int] = None  # --checkpoint-minutes in steps (several processes)

    # --- setup -------------------------------------------------------------------------------------
    def _open_run_dir(self) -> Optional[dict[str, Any]]:
        """The seed and the run folder (created by the first process), the same on every process; returns the
        training state to resume from, if any."""
        plan, cfg, ctx = self.plan, self.cfg, self.ctx
        state = load_state(plan.resume_state) if plan.resume_state else None
        seed = cfg.seed if cfg.seed is not None else (state["seed"] if state else secrets.randbits(62))
        self.seed = int(distributed.broadcast_object(seed))
        run_dir = create_run_dir(plan) if ctx.is_main else None
        self.run_dir = Path(distributed.broadcast_object(str(run_dir) if run_dir else None))
        if ctx.is_main:
            self.fresh = not plan.resume_in_place and not cfg.nosubdir  # a folder this run created
        return state

    def _setup(self) -> None:
        """Everything before the first step, without the run folder's lock: for driving :meth:`_train_step`
        directly (tests, benchmarks); :meth:`run` holds the lock."""
        self._setup_run(self._open_run_dir())

    def _setup_run(self, state: Optional[dict[str, Any]]) -> None:
        """Everything after :meth:`_open_run_dir` before the first step (the first process holds the lock)."""
        plan, cfg, ctx = self.plan, self.cfg, self.ctx
        stale = clean_stale_temps(self.run_dir) if ctx.is_main else []
        self.log = RunLog(self.run_dir if ctx.is_main else None, enabled=ctx.is_main)
        if ctx.is_main and stale:
            self.log(f"Removed {len(stale)} temporary file(s) of an interrupted write: {', '.join(stale[:5])}")
        renamed = rename_whole_kimg_files(self.run_dir) if ctx.is_main and plan.resume_in_place else []
        for old, new in renamed:  # the resumed state among them: the options record its new name
            if plan.resume_state is not None and Path(plan.resume_state) == self.run_dir / old:
                plan.resume_state = str(self.run_dir / new)
        if renamed:
            shown = ", ".join(f"{old} -> {new}" for old, new in renamed[:3])
            self.log(f"Renamed {len(renamed)} file(s) to three-decimal kimg names (so that the new ones sort after "
                     f"them): {shown}{', ...' if len(renamed) > 3 else ''}")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.bench
        self._setup_model(state)
        self._setup_data()
        self.tally = TickTally(self.device)
        self.stats = (StatsLog(self.run_dir, resume_step=self.step if plan.resume_in_place else None)
                      if ctx.is_main else None)
        if ctx.is_main and (self.nimg < cfg.total_images or not (self.run_dir / OPTIONS_FILE).exists()):
            options = plan.options(str(self.run_dir))  # not rewritten when there is nothing to do
            options["seed"] = self.seed
            atomic_write_text(self.run_dir / OPTIONS_FILE, dumps_strict(options, indent=2) + "\n")
            self._log_setup(state is not None)
            self._prepare_grid_inputs()
            self.log.flush()
        distributed.barrier()

    def _setup_model(self, state: Optional[dict[str, Any]]) -> None:
        """Network, EMA and optimizer: fresh, transferred, or from a training state."""
        cfg = self.cfg
        self.net = build_training_network(self.plan, self.seed).train().requires_grad_(True).to(self.device)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.optimizer = self.plan.optimizer.build(self.net.parameters(), **accel.adam_options(self.device))
        self.phema = PowerEMATracker(self.net, cfg.ema_profiles) if cfg.ema_profiles else None
        self.step, self.nimg = 0, 0
        if state is not None:
            self.net.load_state_dict(state["net"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.nimg = int(state["step"]), int(state["nimg"])
            self._load_phema(state)
        elif cfg.transfer is not None:
            transfer_weights(self.net, cfg.transfer, self.log)
            self.ema.load_state_dict(self.net.state_dict())
        accel.prepare_training(self.net, self.ema, cfg, self.device)
        # The parameter lists, made once (``Module.parameters()`` walks every submodule: 0.26 ms for the bundled
        # stage 1, three times a step). Loading a state, DDP and ``--compile`` keep these tensor objects.
        self.params = list(self.net.parameters())
        self.ema_params = list(self.ema.parameters())
        self.ddp = self.net
        if self.ctx.distributed:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device] if self.device.type == "cuda" else None, broadcast_buffers=False
            )
        self.loss_fn = build_loss(self.plan.loss)
        self.augment = AugmentPipe.edm_preset(cfg.augment) if cfg.augment > 0 else None

    def _load_phema(self, state: dict[str, Any]) -> None:
        """The tracked power-function EMAs of a resumed state; they cannot start in the middle of a run."""
        stored = state.get("phema")
        if self.phema is None:
            if stored is not None:
                self.log(f"Note: the state tracks EMA profiles {stored['sigma_rels']}; this run does not "
                         f"(pass --ema-profiles to keep them)")
            return
        if stored is None and self.step > 0:
            raise ConfigError("--ema-profiles", f"the training state {self.plan.resume_state} tracks no post-hoc "
                                                f"EMA profiles; they must be tracked from the start of a run")
        if stored is not None:
            try:
                self.phema.load_state_dict(stored)
            except ValueError as exc:
                raise ConfigError("--ema-profiles", f"{exc} (resume with the same --ema-profiles)") from None

    def _setup_data(self) -> None:
        """The dataset (with ``--cache``, the machine's one decoded copy, built by the first process to get
        there) and this process's loader, positioned at the images seen so far."""
        self.dataset = open_dataset(self.cfg, workers=self.plan.workers)
        if self.dataset.cache_status is not None:
            self.log(f"Data cache:    {self.dataset.cache_status}")
        self.order = DataOrder(len(self.dataset), self.seed)
        self.loader = make_loader(self.dataset, self.order, self.layout, self.ctx.rank, self.nimg, self.plan.workers,
                                  pin_memory=self.device.type == "cuda")
        self.pixels = int(math.prod(self.dataset.image_shape))

    def _log_setup(self, resumed: bool) -> None:
        plan, cfg = self.plan, self.cfg
        params = sum(p.numel() for p in self.net.parameters())
        self.log(f"Run folder:    {self.run_dir}")
        ds = plan.dataset
        self.log(f"Dataset:       {ds.path} ({ds.size} images, {ds.resolution}x{ds.resolution}, label_dim {ds.label_dim})")
        self.log(f"Network:       {plan.network.precond} / {plan.network.init_kwargs['model_type']}, "
                 f"{params / 1e6:.2f} M parameters, {cfg.precision}")
        self.log(f"Loss:          {plan.loss.name} (stage {plan.stage})")
        self.log(f"Batch:         {cfg.batch} = {plan.batch_gpu} x {self.ctx.world_size} processes x "
                 f"{plan.rounds} rounds; device {self.device}")
        self.log(f"Duration:      {cfg.duration} Mimg ({self._total_steps()} steps); seed {self.seed}")
        if self.phema is not None:
            self.log(f"Post-hoc EMA:  profiles sigma_rel {self.phema.sigma_rels} (gamma "
                     f"{', '.join(f'{g:.2f}' for g in self.phema.gammas)}), saved at every --snap under phema/")
        if resumed:
            self.log(f"Resumed from:  {plan.resume_state} (step {self.step}, kimg {self.nimg / 1000:.3f})")
        for note in plan.notes:
            self.log(f"Note:          {note}")

    def _total_steps(self) -> int:
        remaining = max(0, self.cfg.total_images - self.nimg)
        return self.step + math.ceil(remaining / self.cfg.batch)

    def _prepare_grid_inputs(self) -> None:
        """Fixed real images for the stage-2 grids (the same for every run on a dataset)."""
        self.grid_starts = self.grid_labels = None
        n = min(self.cfg.grid, len(self.dataset))
        if self.plan.stage != 2 or n == 0:
            return
        order = DataOrder(len(self.dataset), seed=0)
        items = [self.dataset[order.index(i)] for i in range(n)]
        reals = torch.stack([torch.as_tensor(img) for img, _ in items]).to(self.device, torch.float32) / 127.5 - 1
        self.grid_starts = grids.relay_inputs(reals, self.cfg.up_scale)
        if self.cfg.cond:
            self.grid_labels = torch.stack([torch.as_tensor(lab) for _, lab in items]).to(self.device)
        grids.save_training_grid(reals, self.run_dir / "reals.png")
        grids.save_training_grid(upsample(self.grid_starts, self.cfg.up_scale),
                                 self.run_dir / "reals-relay-start.png")

    # --- one step ----------------------------------------------------------------------------------
    def _train_step(self) -> torch.Tensor:
        """One optimizer step on the global batch; returns the mean per-pixel loss over all processes (a 0-dim
        float64 tensor on the device, not finite for a skipped step) and adds it to the tick's tally. Nothing
        is read back to the host: skipping a step with a non-finite loss is decided on the device."""
        cfg, layout = self.cfg, self.layout
        per_process = self.plan.batch_gpu * self.plan.rounds
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        for r in range(self.plan.rounds):
            images, labels, positions = next(self.loader)
            expected = layout.positions(self.nimg, r, self.ctx.rank)
            self.tally.expect(self.step, r, expected, positions)  # checked at the tick
            images, labels = device_batch(images, labels if cfg.cond else None, self.device)
            rng = SeedGenerators(sample_seeds(self.seed, expected), self.device)
            last = r == self.plan.rounds - 1
            sync = self.ddp.no_sync() if (self.ctx.distributed and not last) else contextlib.nullcontext()
            with sync, seeded_global_rng(dropout_seed(self.seed, self.step, self.ctx.rank, r), self.device):
                loss = self.loss_fn(self.ddp, images, rng, labels=labels, augment_pipe=self.augment)
                loss_total += loss.detach().sum(dtype=torch.float64)
                (loss.sum() * (cfg.ls / per_process)).backward()
        distributed.all_reduce_sum(loss_total)  # the same total, hence the same decision, on every process
        mean_loss = loss_total / (cfg.batch * self.pixels)
        skip = ~torch.isfinite(mean_loss)
        for g in self.optimizer.param_groups:
            g["lr"] = learning_rate(cfg.lr, self.nimg, cfg.lr_rampup)
        clamped = accel.clamp_gradients(self.params)  # EDM's nan_to_num(nan=0, posinf=1e5, neginf=-1e5)
        accel.optimizer_step(self.optimizer, skip)
        beta = torch.where(skip, 1.0, ema_beta(self.nimg, cfg.batch, cfg.ema, cfg.ema_rampup))  # 1: EMA kept
        accel.ema_update(self.ema_params, self.params, beta)
        if self.phema is not None:
            self.phema.update(self.net, self.nimg + cfg.batch, cfg.batch, skip)
        self.tally.add(mean_loss, skip, clamped)
        self.nimg += cfg.batch  # also for a skipped step: the data order and random numbers stay aligned
        self.step += 1
        return mean_loss

    def _non_finite_message(self, tick: int, summary: TickSummary) -> str:
        last = latest_state(self.run_dir) if self.run_dir.is_dir() else None
        kept = f"the last good training state is {last}" if last else "no training state was saved yet"
        first = self.step - summary.steps
        return (f"non-finite loss at every step of tick {tick} (steps {first}-{self.step - 1}, kimg "
                f"{(self.nimg - summary.steps * self.cfg.batch) / 1000:.3f}-{self.nimg / 1000:.3f}); training "
                f"stopped with none of them applied, {kept}")

    # --- ticks, snapshots, states -----------------------------------------------------------------
    def _snapshot(self) -> None:
        kimg = kimg_label(self.nimg)
        extra = self._snapshot_extra()
        save_network(self.ema, self.run_dir / f"network-snapshot-{kimg}.safetensors", extra=extra)
        if self.phema is not None:
            save_profile_snapshots(self.phema, self.run_dir, self.nimg, self.step, self.cfg.batch, extra)
        if self.cfg.grid > 0:
            images = self._grid_images()
            if images is not None:
                grids.save_training_grid(images, self.run_dir / f"samples-{kimg}.png")

    def _snapshot_extra(self) -> dict[str, Any]:
        cfg = self.cfg
        extra: dict[str, Any] = {
            "stage": self.plan.stage, "stage_kind": self._stage_kind(), "kimg": self.nimg / 1000, "step": self.step,
            "training": {"precond": cfg.precond, "arch": cfg.arch, "dataset": self.plan.dataset.name,
                         "resolution": self.plan.dataset.resolution, "cond": cfg.cond,
                         "label_dropout": cfg.label_dropout, "augment": cfg.augment, "seed": self.seed},
        }
        if cfg.precond == "blur":  # what generation needs to relay into this network
            extra["process"] = cfg.process().to_dict()
        if cfg.precond == "sr":
            extra["condition"] = cfg.condition().to_dict()
        return extra

    def _stage_kind(self) -> str:
        return {"blur": "relay", "sr": "sr"}.get(self.cfg.precond, "edm")

    def _grid_images(self) -> Optional[torch.Tensor]:
        batch = max(self.plan.batch_gpu, 1)
        if self.plan.stage == 2:
            if self.grid_starts is None:
                return None
            if self.cfg.precond == "sr":
                return grids.sr_samples(self.ema, self.grid_starts, self.grid_labels, self.cfg.condition(), batch)
            return grids.stage2_samples(self.ema, self.grid_starts, self.grid_labels, self.cfg.process(), batch)
        return grids.stage1_samples(self.ema, self.cfg.grid, batch)

    def _save_state(self) -> None:
        options = self.plan.options(str(self.run_dir))
        save_state(self.run_dir / state_name(self.nimg), self.net, self.ema, self.optimizer,
                   self.step, self.nimg, self.seed, options,
                   phema=self.phema.state_dict() if self.phema is not None else None)

    # --- main loop ---------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train, the first process holding the run folder's lock; a fresh run folder that fails before its first
        state or snapshot is removed again (once the lock is released)."""
        self.fresh, self.run_dir = False, None
        try:
            state = self._open_run_dir()
            with RunFolderLock(self.run_dir) if self.ctx.is_main else contextlib.nullcontext():
                return self._run(state)
        except BaseException:
            if self.ctx.is_main and self.fresh:
                remove_failed_run(self.run_dir)
            raise

    def _step(self) -> float:
        """:meth:`_train_step`, with a collective that failed because another process did as :class:`PeerFailure`."""
        try:
            return self._train_step()
        except RuntimeError as exc:
            failure = distributed.peer_failure(exc) if self.ctx.distributed else None
            if failure is None:
                raise
            raise failure from None

    def _checkpoint_due(self, saved_at: float, saved_step: int) -> bool:
        """Whether ``--checkpoint-minutes`` have passed since the last state. Several processes must end the tick
        at the same step without a collective inside the steps: they count steps instead, as many as the first
        process's last tick says fit in those minutes (:meth:`_agree_checkpoint_steps`)."""
        minutes = self.cfg.checkpoint_minutes
        if not minutes:
            return False
        if not self.ctx.distributed:
            return time.time() - saved_at >= minutes * 60
        return self._checkpoint_steps is not None and self.step - saved_step >= self._checkpoint_steps

    def _agree_checkpoint_steps(self, seconds: float, steps: int) -> None:
        """At a tick's end (several processes): the steps of ``--checkpoint-minutes`` at the first process's
        pace over that tick (``seconds`` for ``steps``)."""
        if self.ctx.distributed and self.cfg.checkpoint_minutes:
            per_step = float(distributed.broadcast_object(seconds / max(steps, 1)))
            self._checkpoint_steps = max(1, int(self.cfg.checkpoint_minutes * 60 / max(per_step, 1e-9)))

    def _run(self, state: Optional[dict[str, Any]]) -> Path:
        self._setup_run(state)
        cfg, total = self.cfg, self.cfg.total_images
        if self.nimg >= total:
            self.log(f"Nothing to do: {self.nimg / 1000:.3f} kimg already reached the duration of {cfg.duration} Mimg")
            self.log.flush()
            return self.run_dir
        self.log(f"Training for {cfg.duration} Mimg...")
        tick, tick_nimg, tick_time, tick_step = 0, self.nimg, time.time(), self.step
        tick_cpu = time.process_time()
        saved_at, saved_step = time.time(), self.step  # the last state: --checkpoint-minutes counts from here
        memory_gb(self.device)  # reset the peak counters
        pace = PaceMeter(sync=lambda: accel.synchronize(self.device)) if self.ctx.is_main else None
        try:
            while True:
                if pace is None:
                    self._step()
                elif (sec_per_kimg := pace.time_step(self._step, cfg.batch)) is not None:
                    warning, pace = first_hour_warning(cfg, sec_per_kimg, self.nimg), None
                    if warning:  # the options cannot give a useful snapshot in the first hour on this machine
                        self.log(warning)
                done = self.nimg >= total
                due = self._checkpoint_due(saved_at, saved_step)
                if not done and not due and tick != 0 and self.nimg < tick_nimg + cfg.tick * 1000:
                    continue
                summary = self.tally.read()  # the tick's one read of the device
                if summary.applied == 0:
                    raise NonFiniteLossError(self._non_finite_message(tick, summary))
                elapsed, cpu = time.time() - tick_time, time.process_time() - tick_cpu
                sec_per_kimg = elapsed / max((self.nimg - tick_nimg) / 1000, 1e-12)
                save = due or done or (cfg.dump is not None and tick % cfg.dump == 0 and tick != 0)
                if self.ctx.is_main:
                    record = {
                        "tick": tick, "step": self.step, "kimg": self.nimg / 1000,
                        "loss": summary.loss, "loss_last": summary.loss_last,
                        "skipped": summary.skipped, "clamped": summary.clamped,
                        "lr": self.optimizer.param_groups[0]["lr"], "sec_per_tick": elapsed,
                        "cpu_sec_per_tick": cpu,  # this process's CPU time (all threads): the compute budget
                        "sec_per_kimg": sec_per_kimg, "eta_sec": (total - self.nimg) / 1000 * sec_per_kimg,
                        "timestamp": time.time(), **memory_gb(self.device),
                    }
                    self.log(progress_line(record))
                    self.stats.append(record)
                    self.stats.flush()  # before the state: a state never has fewer records than its step
                    if due or (cfg.snap is not None and (done or tick % cfg.snap == 0)):
                        self._snapshot()
                    if save:
                        self._save_state()
                    self.log.flush()
                if save:
                    saved_at, saved_step = time.time(), self.step
                self._agree_checkpoint_steps(elapsed, self.step - tick_step)
                distributed.barrier()
                if done:
                    break
                tick += 1
                tick_nimg, tick_step = self.nimg, self.step
                tick_time = time.time()  # snapshots, grids and states are not counted as training time
                tick_cpu = time.process_time()
        except NonFiniteLossError as exc:
            self.log.record(f"Error: {exc}")  # raised to the caller, which reports it
            self.log.flush()
            raise
        finally:
            if self.stats is not None:
                self.stats.close()
        self.log(f"Done: {self.nimg / 1000:.3f} kimg in {self.step} steps")
        self.log.flush()
        return self.run_dir


def run_training(plan: TrainingPlan, timeout_min: float = distributed.DEFAULT_TIMEOUT_MIN) -> Path:
    """Train according to ``plan`` in this process (joining ``torchrun``'s process group when there is one;
    its collectives fail after ``timeout_min`` minutes). An error in one process ends the others at their next
    collective (:class:`~relay_diffusion.utils.distributed.PeerFailure`)."""
    created = not torch.distributed.is_initialized()
    ctx = distributed.init(plan.config.device, timeout_min)
    failed = True
    try:
        out = Trainer(plan, ctx).run()
        failed = False
        return out
    finally:
        if created:
            distributed.shutdown(failed=failed and ctx.distributed)
