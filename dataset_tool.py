"""The reference command line, verbatim, e.g.

    python dataset_tool.py --source=/path/to/original/data --dest=/path/to/output/data.zip \\
        --transform=center-crop --resolution=64x64

It is the same command as ``rdm dataset`` (``python dataset_tool.py --help`` lists the options).
"""

import os
import sys

try:
    from relay_diffusion.cli.dataset import dataset
    from relay_diffusion.cli.forgiving import forgive
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
    from relay_diffusion.cli.dataset import dataset
    from relay_diffusion.cli.forgiving import forgive

if __name__ == "__main__":
    forgive(dataset)(prog_name="dataset_tool.py")
