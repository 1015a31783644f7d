"""Evaluation with the reference's command line; the same commands as ``rdm evaluate`` (``python evaluate.py --help``):

    torchrun --standalone --nproc_per_node=1 evaluate.py activations --data=samples/ --dest=eval-refs/act.npz --batch=64
    python evaluate.py calc -m fid -m sfid -m is -m pr --activations_sample=a.npz --activations_ref=b.npz
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from relay_diffusion.cli.evaluate import evaluate  # noqa: E402
from relay_diffusion.cli.forgiving import forgive  # noqa: E402

if __name__ == "__main__":
    forgive(evaluate).main(prog_name="evaluate.py")
