"""The tiny relay models shipped inside the package (trained by ``recipes/emoji.sh``).

Stage 1: EDM at 16x16; stage 2: blur diffusion at 64x64 (relay factor 4); both trained on the Google Noto
emoji images of the npm package ``emoji-datasource-google@16.0.0`` (Apache-2.0, see ``assets/emoji/NOTICE``).
Beside them, their autoguidance guides (smaller networks trained for less time, ``recipes/emoji.sh guides``),
which the ``emoji`` generation preset uses. Weights are stored as float16 safetensors + JSON and load as float32.

    python -m relay_diffusion.checkpoints.bundled STAGE1 STAGE2 [GUIDE1 GUIDE2]    # install trained snapshots here
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "emoji"
FILES = {"first": "stage1-16x16.safetensors", "second": "stage2-64x64.safetensors"}
GUIDE_FILES = {"first": "stage1-16x16-guide.safetensors", "second": "stage2-64x64-guide.safetensors"}


def bundled_network_paths(folder: Path = ASSETS) -> dict[str, str] | None:
    """``{'first': path, 'second': path}`` when both bundled networks are installed, else None."""
    paths = {which: folder / name for which, name in FILES.items()}
    if not all(p.is_file() for p in paths.values()):
        return None
    return {which: str(p) for which, p in paths.items()}


def export_bundled(first: str | Path, second: str | Path, folder: Path = ASSETS,
                   guides: tuple[str | Path, str | Path] | None = None) -> dict[str, str]:
    """Copy two training snapshots (and their two guides) into ``folder`` as float16 safetensors + JSON (EMA
    weights as trained)."""
    from relay_diffusion.checkpoints.snapshot import read_config, save_network
    from relay_diffusion.checkpoints.loading import load_network

    todo = [(which, src, FILES[which]) for which, src in (("first", first), ("second", second))]
    if guides is not None:
        todo += [(f"guide_{which}", src, GUIDE_FILES[which]) for which, src in zip(("first", "second"), guides)]
    out = {}
    for which, src, name in todo:
        net = load_network(str(src), "cpu")
        extra = {k: v for k, v in read_config(src).items() if k not in ("format", "precond", "init_kwargs")} \
            if str(src).endswith(".safetensors") else {}
        extra["bundled_from"] = Path(src).name
        out[which] = str(save_network(net, folder / name, extra=extra, dtype=torch.float16))
    return out


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 4):
        raise SystemExit("usage: python -m relay_diffusion.checkpoints.bundled STAGE1 STAGE2 [GUIDE1 GUIDE2]")
    guides = (argv[2], argv[3]) if len(argv) == 4 else None
    for which, path in export_bundled(argv[0], argv[1], guides=guides).items():
        print(f"{which}: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
