"""The bundled MedDiff-FM demo writes a chest CT larger than one window, in HU, in the orientation its affine says."""

import nibabel as nib
import numpy as np
import pytest
import torch.nn.functional as F

from meddiffusers import PatchSlidingWindowPipeline, load_nifti
from meddiffusers.cli import main
from meddiffusers.demo import patch_demo_model_path
from meddiffusers.utils import window_locations
from tests.conftest import CT_CHEST_CROP


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    """A 25-step DDIM chest from the command line, as a user would make it: `(D, H, W)` HU and the image."""
    output = tmp_path_factory.mktemp("fm-demo") / "chest.nii.gz"
    args = ["generate", "--model", "meddiff-fm-demo", "--region", "Chest", "--scheduler", "ddim", "--steps", "25"]
    assert main([*args, "--seed", "0", "--window-batch-size", "4", "--output", str(output)]) == 0
    image = nib.load(output)
    return np.transpose(image.get_fdata(), (2, 0, 1)), image


def test_the_demo_volume_takes_many_windows_and_is_written_in_hu_with_its_spacing(chest):
    volume, image = chest
    pipe = PatchSlidingWindowPipeline.from_pretrained(patch_demo_model_path())
    region = pipe.get_region("Chest")
    assert volume.shape == tuple(region.volume_size) == (28, 36, 36)
    assert len(window_locations(volume.shape, pipe.config.window_size, 0.5)) == 48  # 3 x 4 x 4 windows of 16³
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S") and image.header.get_zooms() == (8.0, 8.0, 8.0)
    assert volume.min() >= -1400 - 1e-3 and volume.max() <= 400 + 1e-3


def test_the_demo_chest_has_lungs_inside_a_body(chest):
    volume, _ = chest
    centre = volume[8:20, 10:26, 10:26]  # the middle of the chest: mostly lung
    lung = (centre < -600).mean()
    tissue = (volume > -300).mean()  # chest wall, mediastinum, spine
    assert lung > 0.4, f"only {lung:.0%} of the central chest is lung"
    assert 0.15 < tissue < 0.6, f"{tissue:.0%} of the volume is soft tissue or bone"


def test_the_demo_chest_has_the_canonical_axial_layout(chest):
    volume, _ = chest
    slab = load_nifti(str(CT_CHEST_CROP), canonical=True)  # four axial slices of the training CT
    hounsfield = slab.tensor.float().clamp(-1400, 400)
    reference = F.interpolate(hounsfield, size=(hounsfield.shape[2], 36, 36), mode="area")[0, 0].mean(0).numpy()
    score = max(correlation(axial, reference) for axial in volume)
    wrong = {
        "mirrored left-right": reference[::-1],
        "flipped anterior-posterior": reference[:, ::-1],
        **{f"rotated {90 * k} degrees": np.rot90(reference, k) for k in (1, 2, 3)},
    }
    assert score > 0.7, f"best axial correlation {score:.3f}"
    for name, image in wrong.items():
        other = max(correlation(axial, np.ascontiguousarray(image)) for axial in volume)
        assert score > other + 0.05, f"{score:.3f} vs {other:.3f} {name}"
