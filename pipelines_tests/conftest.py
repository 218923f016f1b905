import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The official parity fixtures live in the repository (see fixtures/official/README.md); another set of the
# same format can be checked with DIFFAE_OFFICIAL_FIXTURES=/path.
FIXTURES = Path(os.environ.get("DIFFAE_OFFICIAL_FIXTURES", Path(__file__).parent / "fixtures" / "official"))

# Reproducible CPU numerics; the fixtures were produced with 2 threads.
torch.set_num_threads(2)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def official_dir() -> Path:
    if not (FIXTURES / "last.ckpt").is_file():
        pytest.fail(f"official fixtures not found at {FIXTURES} (set DIFFAE_OFFICIAL_FIXTURES)")
    return FIXTURES
