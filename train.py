"""Train with the reference's command line, e.g.

    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs --data=datasets/imagenet-64x64.zip \
        --cond=1 --batch=4096 --batch-gpu=32 --lr=1e-4 --ema=50 --dropout=0.1 --fp16=1 --ls=25 --arch=adm --precond=edm

The same as ``rdm train``; see ``rdm train --help``.
"""

import sys
from pathlib import Path

try:
    import relay_diffusion  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from relay_diffusion.cli.train import train  # noqa: E402
from relay_diffusion.cli.forgiving import forgive  # noqa: E402

if __name__ == "__main__":
    forgive(train)()
