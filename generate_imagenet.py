"""`rdm generate` with `--preset=imagenet256`: the settings of the reference's generate_imagenet.py
(ImageNet 256x256).

Every option of `rdm generate` works here (`python generate_imagenet.py --help`), e.g.

    torchrun --standalone --nproc_per_node=1 generate_imagenet.py --sampler_stages=both --outdir=out \\
        --network_first=a.pkl --network_second=b.pt
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from relay_diffusion.cli.generate import generate  # noqa: E402
from relay_diffusion.cli.forgiving import forgive  # noqa: E402

if __name__ == "__main__":
    forgive(generate).main(default_map={"preset": "imagenet256"}, prog_name="generate_imagenet.py")
