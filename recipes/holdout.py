"""Split the emoji PNGs into a training part and a held-out part with no emoji in common.

An emoji's variants (skin tones, genders, keycaps) share their first code point, the part of the file name
before the first '-' (``1f44b-1f3fb.png`` is a skin tone of ``1f44b.png``). Whole groups are held out, chosen
by a hash of that code point, so the held-out images are emoji the models never saw in any variant, and the
split does not depend on the machine or on the order of the files.

    python recipes/holdout.py SOURCE_DIR TRAIN_DIR HELDOUT_DIR [--percent 20]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path


def held_out(name: str, percent: int) -> bool:
    group = name.split(".")[0].split("-")[0].lower()
    return int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) % 100 < percent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("train", type=Path)
    ap.add_argument("heldout", type=Path)
    ap.add_argument("--percent", type=int, default=20, help="share of the emoji groups to hold out")
    args = ap.parse_args()
    files = sorted(p for p in args.source.glob("*.png") if p.is_file())
    if not files:
        print(f"error: no PNG files in {args.source}", file=sys.stderr)
        return 1
    for folder in (args.train, args.heldout):
        if folder.exists() and any(folder.iterdir()):
            print(f"error: {folder} is not empty", file=sys.stderr)
            return 1
        folder.mkdir(parents=True, exist_ok=True)
    counts = {True: 0, False: 0}
    for p in files:
        out = held_out(p.name, args.percent)
        shutil.copy2(p, (args.heldout if out else args.train) / p.name)
        counts[out] += 1
    print(f"{counts[False]} training images, {counts[True]} held out ({args.percent}% of the emoji groups)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
