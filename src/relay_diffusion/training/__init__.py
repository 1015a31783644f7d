"""Training of both relay stages (docs/math.md §5): stage 1 with EDM's losses, stage 2 with the blur loss.

``train(config)`` is the library entry point; ``rdm train`` / ``train.py`` parse the reference options into a
:class:`TrainingConfig` and call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from relay_diffusion.training.config import ConfigError, TrainingConfig
from relay_diffusion.training.loop import NonFiniteLossError, run_training
from relay_diffusion.training.plan import TrainingPlan, plan_training, preview_run_dir

__all__ = [
    "ConfigError", "NonFiniteLossError", "TrainingConfig", "TrainingPlan", "plan_training", "preview_run_dir",
    "run_training", "train",
]


def train(config: TrainingConfig, dry_run: bool = False) -> Optional[Path]:
    """Validate ``config`` and train (or, with ``dry_run``, print the resolved options and return None)."""
    plan = plan_training(config)
    if dry_run:
        print(plan.to_json(preview_run_dir(plan)))
        return None
    return run_training(plan)
