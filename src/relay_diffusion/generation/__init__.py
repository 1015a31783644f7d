"""Relay generation.

``configs``   sampler settings of the stages, post-processing and the reference's presets
``stages``    stage 1 (EDM), relay and super-resolution stages, the compatibility check
``batching``  network calls of a fixed batch size (results never depend on the batch)
``settings``  user options -> checked stage settings and a loaded pipeline (the CLI's and the API's one path)
``pipeline``  :class:`RelayPipeline`: the one sampling path of every command
``build``     stages from network files (stage kinds checked, forward process from the file)
``files``     the PNG layout of generated images and stage inputs
``run``       :func:`generate_images`: a process's share of the seeds, in batches, to files
"""

from relay_diffusion.generation.build import Built, StageFileError, build_pipeline
from relay_diffusion.generation.configs import (PRESETS, EDMStageConfig, Enhancement, Preset, RelayStageConfig,
                                                SRStageConfig)
from relay_diffusion.generation.pipeline import RelayPipeline
from relay_diffusion.generation.run import generate_images
from relay_diffusion.generation.batching import DEFAULT_NET_BATCH, FixedBatchDenoiser
from relay_diffusion.generation.settings import GenerationOptions, OptionError, load, resolve
from relay_diffusion.generation.stages import EDMStage, RelayStage, SRStage, check_stages

__all__ = [
    "DEFAULT_NET_BATCH", "PRESETS", "Built", "EDMStage", "EDMStageConfig", "Enhancement", "FixedBatchDenoiser",
    "GenerationOptions", "OptionError", "Preset", "RelayPipeline", "RelayStage", "RelayStageConfig", "SRStage",
    "SRStageConfig", "StageFileError", "build_pipeline", "check_stages", "generate_images", "load", "resolve",
]
