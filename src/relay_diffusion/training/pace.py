"""Whether a run's options suit the speed of this machine: a one-line warning once the first steps are timed.

The defaults of ``rdm train`` are EDM's, made for a GPU cluster: a 10 Mimg learning-rate warm-up, a 200 Mimg
duration, a progress line every 50 kimg. On a laptop CPU, where a small network trains some 100 kimg an hour,
the warm-up alone would take days and the first hour's snapshots would show noise. The speed is unknown before
the run starts, so the loop times its first steps (:class:`PaceMeter`) and :func:`first_hour_warning` names the
options that keep the first hour from giving a useful snapshot, with values that would.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

from relay_diffusion.training.config import TrainingConfig
from relay_diffusion.training.stats import format_duration

HOUR = 3600.0
#: A duration still reachable "in reasonable time": longer runs are warned about.
REASONABLE_SECONDS = 7 * 24 * HOUR
#: A tick (one progress line and loss value) should take at most this long...
TICK_SECONDS = 15 * 60.0
#: ... and the suggested ``--tick`` takes about this long.
SUGGESTED_TICK_SECONDS = 5 * 60.0
#: The suggested ``--lr-rampup`` takes about this part of the first hour.
RAMPUP_SHARE = 0.1
#: The suggested ``--duration`` takes about this long.
SUGGESTED_DURATION_SECONDS = 24 * HOUR

#: The clock of :class:`PaceMeter` (tests replace it).
clock: Callable[[], float] = time.perf_counter


class PaceMeter:
    """Times the training steps after the first one (which pays one-time costs: allocation, kernel selection)
    until ``seconds`` of them have passed or ``steps`` were timed, whichever comes first; then
    :meth:`time_step` returns the speed in seconds per thousand images, once. Only the steps count: the
    snapshots, grids and states written between them do not. ``sync`` waits for the device; it is called at
    the two ends of the measurement only (the steps themselves never wait for the device)."""

    def __init__(self, seconds: float = 30.0, steps: int = 10, sync: Callable[[], None] = lambda: None) -> None:
        self.seconds, self.steps, self.sync = seconds, steps, sync
        self.seen = self.timed = self.images = 0
        self.elapsed = 0.0
        self.done = False

    def time_step(self, step: Callable[[], object], images: int) -> Optional[float]:
        """Run ``step`` (one training step of ``images`` images); the measured seconds per kimg when this step
        completes the measurement, else None."""
        self.seen += 1
        if self.done or self.seen == 1:
            step()
            return None
        if self.timed == 0:
            self.sync()
        start = clock()
        step()
        self.timed += 1
        self.images += images
        last = self.elapsed + clock() - start >= self.seconds or self.timed >= self.steps
        if last:
            self.sync()
        self.elapsed += clock() - start
        if not last:
            return None
        self.done = True
        return self.elapsed / (self.images / 1000)


def _round_down(x: float) -> float:
    """``x`` rounded down to one significant digit (0.0116 -> 0.01, 2784 -> 2000)."""
    if x <= 0:
        return 0.0
    unit = 10.0 ** math.floor(math.log10(x))
    return float(f"{math.floor(x / unit + 1e-9) * unit:.12g}")


def first_hour_warning(cfg: TrainingConfig, sec_per_kimg: float, nimg: int = 0) -> Optional[str]:
    """One line starting ``Warning:`` when, at ``sec_per_kimg`` (this machine's measured speed) and from ``nimg``
    images seen on, the options cannot give a useful snapshot in the first hour (the learning-rate warm-up
    outlasts it, no snapshot is written in it) or make it hard to follow (a tick lasts over 15 minutes), or the
    duration takes over a week; naming each option with a value that would do. None when the options suit."""
    if not (math.isfinite(sec_per_kimg) and sec_per_kimg > 0):
        return None
    kimg_per_hour = HOUR / sec_per_kimg
    problems = []
    rampup_left = max(0.0, cfg.lr_rampup * 1000 - nimg / 1000)  # kimg
    if rampup_left * sec_per_kimg > HOUR:
        suggest = max(_round_down(RAMPUP_SHARE * kimg_per_hour / 1000), 0.001)
        problems.append(f"--lr-rampup {cfg.lr_rampup:g} Mimg holds the learning rate below --lr for "
                        f"~{format_duration(rampup_left * sec_per_kimg)} (use --lr-rampup {suggest:g} or less)")
    snapshot_seconds = math.inf  # the first snapshot after the first step: --snap ticks or --checkpoint-minutes
    if cfg.snap is not None:
        snapshot_seconds = cfg.snap * cfg.tick * sec_per_kimg
    if cfg.checkpoint_minutes:
        snapshot_seconds = min(snapshot_seconds, cfg.checkpoint_minutes * 60)
    if snapshot_seconds > HOUR:
        ticks = math.floor(HOUR / 2 / (cfg.tick * sec_per_kimg))
        how = f"--snap {ticks}" if ticks >= 1 else "a smaller --tick"
        when = "only at the end" if math.isinf(snapshot_seconds) else f"after ~{format_duration(snapshot_seconds)}"
        problems.append(f"the first snapshot comes {when} (use --checkpoint-minutes 20, or {how})")
    if cfg.tick * sec_per_kimg > TICK_SECONDS:
        suggest = max(_round_down(SUGGESTED_TICK_SECONDS / sec_per_kimg), 0.001)
        problems.append(f"a tick of --tick {cfg.tick:g} kimg (one progress line) takes "
                        f"~{format_duration(cfg.tick * sec_per_kimg)} (use --tick {suggest:g})")
    remaining = max(0, cfg.total_images - nimg) / 1000 * sec_per_kimg
    if remaining > REASONABLE_SECONDS:
        suggest = max(_round_down(SUGGESTED_DURATION_SECONDS / sec_per_kimg / 1000), 0.001)
        problems.append(f"--duration {cfg.duration:g} Mimg needs ~{format_duration(remaining)} (--duration "
                        f"{suggest:g} trains about a day)")
    if not problems:
        return None
    return (f"Warning: this machine trains ~{_num(kimg_per_hour)} kimg an hour ({_num(sec_per_kimg)} s/kimg over the "
            f"first steps): " + "; ".join(problems) + ".")


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"
