"""RelayPipeline called with diffusers' conventions: run with ``.venv/bin/python examples/pipeline_conventions.py``.

Every call below uses the bundled tiny emoji models (16x16 -> 64x64) on the CPU and writes one image grid,
``examples/pipeline_conventions.png``: a row per call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from relay_diffusion import RelayPipeline

pipe = RelayPipeline.from_bundled(torch_dtype=torch.float32)  # on a GPU: RelayPipeline.from_bundled("cuda", torch.bfloat16)
pipe.set_progress_bar_config(desc="sampling")

rows = []
# 1. Four images from one generator: the same generator state gives the same four images.
out = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), output_type="np")
again = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), output_type="np")
assert np.array_equal(out.images, again.images)
rows.append(out.images)
# 2. One generator per image: each image follows its own generator.
rows.append(pipe(generator=[torch.Generator().manual_seed(s) for s in range(4)], output_type="np").images)
# 3. Fewer steps in each stage (stage 1, stage 2), for this call only.
rows.append(pipe(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=(9, 7),
                 output_type="np").images)
# 4. The seeds API (the reference's): images named by seeds, as `rdm generate --seeds=0-3` writes them.
rows.append(pipe(seeds=range(4), output_type="np").images)

grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
path = Path(__file__).with_suffix(".png")
Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)
print(f"wrote {path} ({len(rows)} rows of {rows[0].shape[0]} images)")
