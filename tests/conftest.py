"""Test-wide settings: no network, deterministic CPU maths, shared paths."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Real volumes that ship with the repository, so that the tests using them run on any machine:
# - the ITK example MRI (Apache-2.0, see examples/data/README.md): 128 x 128 x 62 voxels, 2 x 2 x 3 mm, LSA;
# - two small crops made with `nibabel`'s `slicer` (every 4th row and column, a few slices; affine, sform/qform codes
#   and units kept) from the pyradiomics 3.0.1 test data (sdist `data/lung1_image.nrrd`, `data/brain1_image.nrrd`),
#   BSD-3-Clause, Copyright 2017 Harvard Medical School, Computational Imaging & Bioinformatics Lab:
#   a CT chest in HU (128 x 128 x 4, 2.28 x 2.28 x 5 mm, LPS) and an MRI brain (64 x 64 x 8, 3.125 x 3.125 x 6.5 mm,
#   LAS). The CT crop is `lung1[::4, ::4, 19:23]` of `../shared/data/ct_chest_pyradiomics_lung1.nii.gz`.
EXAMPLE_VOLUME = ROOT / "examples" / "data" / "mr_t1_itk_kmeanstest.nii.gz"
CT_CHEST_CROP = FIXTURES / "ct_chest_pyradiomics_lung1_crop.nii.gz"
MR_BRAIN_CROP = FIXTURES / "mr_brain_pyradiomics_brain1_crop.nii.gz"

torch.use_deterministic_algorithms(True, warn_only=True)
# `pytest -n 2` runs one worker per core: one thread each, or the workers' thread pools fight over the cores (a tiny
# U-Net call measured 0.09 s on one thread and 5.6 s on two on a loaded 2-core machine).
torch.set_num_threads(1)


@pytest.fixture
def fixtures_dir() -> Path:
    """Folder of the small parity fixtures copied from the original code's outputs."""
    return FIXTURES


def shared_volume(name: str, why_not_shipped: str = "it is too large to ship with the tests") -> Path:
    """Path of a real volume from the project's `../shared/data` folder, skipping the test when it is absent.

    That folder is not part of the repository, so a user's machine does not have it; prefer the shipped volumes
    above. `why_not_shipped` says, in the skip reason, why this test cannot use one of them.
    """
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"needs {name} from ../shared/data, which is not on this machine ({why_not_shipped})")
    return path
