"""Test-wide settings: no network, deterministic CPU maths, shared paths."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

torch.use_deterministic_algorithms(True, warn_only=True)


@pytest.fixture
def fixtures_dir() -> Path:
    """Folder of the small parity fixtures copied from the original code's outputs."""
    return FIXTURES


def shared_volume(name: str) -> Path:
    """Path of a real volume from `../shared/data`, skipping the test when that folder is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real volume {name} not available (../shared/data is absent on this machine)")
    return path
