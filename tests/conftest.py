import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# The golden values travel with the repository: tensors computed by the reference implementation
# (docs/math.md section 12 describes the format).
REPO_FIXTURES = REPO / "tests" / "fixtures"


def fixtures_dir() -> Path:
    """The reference fixture folder: ``$RDM_FIXTURES`` (when set and non-empty), else ``tests/fixtures``."""
    return Path(os.environ.get("RDM_FIXTURES") or REPO_FIXTURES).resolve()


def read_fixtures(folder: Path | None = None) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(``reference.json`` as a dict, every array of ``reference.npz`` by name) of ``folder`` (default
    :func:`fixtures_dir`), or None when either file is missing. Tests that read fixtures fail, never skip,
    on None: a folder named by ``RDM_FIXTURES`` that does not exist is a mistake, not an absent feature."""
    folder = fixtures_dir() if folder is None else folder
    if not (folder / "reference.json").is_file() or not (folder / "reference.npz").is_file():
        return None
    meta = json.loads((folder / "reference.json").read_text())
    with np.load(folder / "reference.npz") as arrays:
        return meta, {k: arrays[k] for k in arrays.files}


def missing_fixtures_message() -> str:
    return f"reference fixtures (reference.json, reference.npz) not found in {fixtures_dir()} (RDM_FIXTURES)"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture
def single_thread():
    """Tiny networks gain nothing from intra-op threads, and on a busy machine their synchronisation costs far
    more than the work: run a test on one thread (``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_adm(resolution: int, label_dim: int = 0, channels: int = 3, seed: int = 0):
    """A small EDM-preconditioned ADM with random (not zero-initialised) weights, so every layer matters."""
    import torch

    from relay_diffusion.networks.precond import build_network

    net = build_network("EDMPrecond", img_resolution=resolution, img_channels=channels, label_dim=label_dim,
                        model_type="DhariwalUNet", model_channels=16, channel_mult=[1], num_blocks=1,
                        attn_resolutions=[])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval().requires_grad_(False)
