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
