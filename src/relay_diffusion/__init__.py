"""Relay Diffusion Models (Teng et al., ICLR 2024) in PyTorch.

    from relay_diffusion import RelayPipeline
    pipe = RelayPipeline.from_bundled()            # or .from_pretrained(folder) of `rdm export`
    images = pipe(seeds=range(4)).images           # PIL images, one per seed

Sub-packages, in the direction imports flow:
``core`` (block DCT, blur, block noise, samplers, losses, per-seed generators) -> ``networks`` (layers,
U-Nets, preconditioning) -> ``checkpoints`` (snapshots, reference import) -> ``data`` / ``generation`` /
``training`` / ``metrics`` -> ``cli``. ``utils`` holds file, image and process-group helpers used by all.
Names below are imported on first use, so ``import relay_diffusion`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RelayPipeline": "relay_diffusion.generation.pipeline",
    "RelayOutput": "relay_diffusion.generation.pipeline",
    "EDMStage": "relay_diffusion.generation.stages",
    "RelayStage": "relay_diffusion.generation.stages",
    "SRStage": "relay_diffusion.generation.stages",
    "EDMStageConfig": "relay_diffusion.generation.configs",
    "RelayStageConfig": "relay_diffusion.generation.configs",
    "SRStageConfig": "relay_diffusion.generation.configs",
    "SRCondition": "relay_diffusion.core.sr",
    "PRESETS": "relay_diffusion.generation.configs",
    "BlurProcess": "relay_diffusion.core.process",
    "SeedGenerators": "relay_diffusion.core.rng",
    "load_network": "relay_diffusion.checkpoints.loading",
    "load_network_file": "relay_diffusion.checkpoints.loading",
    "save_network": "relay_diffusion.checkpoints.snapshot",
    "generate_images": "relay_diffusion.generation.run",
    "TrainingConfig": "relay_diffusion.training.config",
    "train": "relay_diffusion.training",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'relay_diffusion' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
