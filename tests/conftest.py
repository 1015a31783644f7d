import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    """The reference fixture folder: ``$RDM_FIXTURES`` or ``../shared/fixtures`` beside the repository."""
    return Path(os.environ.get("RDM_FIXTURES", REPO.parent / "shared" / "fixtures")).resolve()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
