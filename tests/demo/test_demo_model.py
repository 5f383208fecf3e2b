"""The bundled demo model generates anatomy where the RAS+ affine it writes says it is, for every seed."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meddiffusers import MedDiffusionPipeline, load_nifti
from meddiffusers.demo import DEMO_MODEL_PATH, demo_model_path
from meddiffusers.training.data import VolumePreprocessor
from meddiffusers.training.latents import center_crop_or_pad

# The MR training volume of the demo (stored LSA), shipped with the examples.
MR_VOLUME = Path(__file__).resolve().parents[2] / "examples" / "data" / "mr_t1_itk_kmeanstest.nii.gz"
# Four axial slices of the CT training volume at twice the demo's in-plane resolution (stored LPS).
CT_SLAB = Path(__file__).resolve().parents[1] / "fixtures" / "ct_chest_pyradiomics_lung1_crop.nii.gz"
SEEDS = (0, 1, 2)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def reoriented(volume: np.ndarray) -> dict[str, np.ndarray]:
    """The volume seen in the wrong orientation: flipped along each axis, rotated in the (H, W) plane."""
    return {
        "flipped superior-inferior (D)": volume[::-1],
        "flipped left-right (H)": volume[:, ::-1],
        "flipped anterior-posterior (W)": volume[:, :, ::-1],
        "rotated 90 degrees (H, W)": np.rot90(volume, 1, axes=(1, 2)),
        "rotated 180 degrees (H, W)": np.rot90(volume, 2, axes=(1, 2)),
        "rotated 270 degrees (H, W)": np.rot90(volume, 3, axes=(1, 2)),
    }


@pytest.fixture(scope="module")
def pipe():
    pipeline = MedDiffusionPipeline.from_pretrained(demo_model_path())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def brains(pipe):
    """MRBrain samples of a few seeds, 20 steps of the default scheduler, `(D, H, W)` in `[-1, 1]`."""
    samples = []
    for seed in SEEDS:
        generator = torch.Generator().manual_seed(seed)
        samples.append(pipe("MRBrain", num_inference_steps=20, generator=generator, output_type="np").volumes[0, 0])
    return samples


def test_generated_brains_match_the_canonical_training_volume_and_not_a_reoriented_one(pipe, brains):
    region = pipe.get_region("MRBrain")
    # The training volume as any user would prepare it: RAS+ (nibabel canonical), resampled to the region's spacing,
    # centred in the region's grid.
    reference = VolumePreprocessor(spacing=tuple(region.spacing))(str(MR_VOLUME))
    reference = center_crop_or_pad(reference, region.volume_size)[0].numpy()
    assert reference.shape == tuple(region.volume_size) == brains[0].shape
    for seed, brain in zip(SEEDS, brains):
        score = correlation(brain, reference)
        assert score > 0.8, f"seed {seed}: correlation {score:.3f} with the canonical training volume"
        for name, wrong in reoriented(reference).items():
            other = correlation(brain, np.ascontiguousarray(wrong))
            # A head is nearly left-right symmetric, so its mirror image is the closest wrong orientation.
            margin = 0.05 if "left-right" in name else 0.1
            assert score > other + margin, f"seed {seed}: {score:.3f} vs {other:.3f} {name}"


def test_generated_chests_have_the_canonical_axial_layout(pipe):
    """The chest was rotated 90 degrees in plane in the old demo: its best axial slice must match the RAS+ slab."""
    region = pipe.get_region("CTChest")
    slab = load_nifti(str(CT_SLAB), canonical=True)
    assert slab.spacing[1] * 2 == region.spacing[1] and slab.spacing[2] * 2 == region.spacing[2]
    hounsfield = slab.tensor.float().clamp(-1000, 1000)
    axial = F.interpolate(hounsfield, size=(hounsfield.shape[2], *region.volume_size[1:]), mode="area")
    reference = axial[0, 0].mean(0).numpy()
    wrong = {
        "mirrored left-right": reference[::-1],
        "flipped anterior-posterior": reference[:, ::-1],
        **{f"rotated {90 * k} degrees": np.rot90(reference, k) for k in (1, 2, 3)},
    }
    for seed in SEEDS:
        generator = torch.Generator().manual_seed(seed)
        chest = pipe("CTChest", num_inference_steps=20, generator=generator, output_type="np").volumes[0, 0]
        score = max(correlation(axial_slice, reference) for axial_slice in chest)
        assert score > 0.9, f"seed {seed}: best axial correlation {score:.3f}"
        for name, image in wrong.items():
            other = max(correlation(axial_slice, np.ascontiguousarray(image)) for axial_slice in chest)
            assert score > other + 0.1, f"seed {seed}: {score:.3f} vs {other:.3f} {name}"


def test_written_affine_says_ras_with_the_region_spacing(pipe):
    """The saved geometry matches the arrays: a diagonal, positive (RAS+) affine in (H, W, D) = (x, y, z) order."""
    region = pipe.get_region("MRBrain")
    output = pipe("MRBrain", num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="nifti")
    image = output.volumes[0]
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    spacing_d, spacing_h, spacing_w = region.spacing
    np.testing.assert_allclose(np.diag(image.affine)[:3], [spacing_h, spacing_w, spacing_d])
    assert np.count_nonzero(image.affine[:3, :3] - np.diag(np.diag(image.affine)[:3])) == 0
    assert image.shape == (region.volume_size[1], region.volume_size[2], region.volume_size[0])


def test_bundled_configs_carry_no_machine_paths():
    configs = list(Path(DEMO_MODEL_PATH).rglob("*.json"))
    assert configs
    for path in configs:
        assert "_name_or_path" not in json.loads(path.read_text()), path
