"""The bundled demo model generates anatomy where the RAS+ affine it writes says it is, for every seed."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from meddiffusers import MedDiffusionPipeline
from meddiffusers.demo import DEMO_MODEL_PATH, demo_model_path
from meddiffusers.training.data import VolumePreprocessor
from meddiffusers.training.latents import center_crop_or_pad

# The MR training volume of the demo (stored LSA), shipped with the examples.
MR_VOLUME = Path(__file__).resolve().parents[2] / "examples" / "data" / "mr_t1_itk_kmeanstest.nii.gz"
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
            assert score > other + 0.1, f"seed {seed}: {score:.3f} vs {other:.3f} {name}"


def test_head_is_upright_in_the_written_affine(pipe, brains):
    """Most of the head lies above the lowest slices (the neck / skull base) and the D axis is superior."""
    output = pipe("MRBrain", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    affine = output.affines[0]
    assert (np.diag(affine)[:3] > 0).all() and np.count_nonzero(affine[:3, :3] - np.diag(np.diag(affine)[:3])) == 0
    for brain in brains:
        # Head-tissue profile along D: the top of the head (last D slices with tissue) is superior of the centre of
        # mass, and the volume's first slices (below the skull base) hold less tissue than the slices above them.
        tissue = (brain > -0.5).sum(axis=(1, 2)).astype(float)
        centre = (tissue * np.arange(len(tissue))).sum() / tissue.sum()
        assert tissue[: len(tissue) // 4].sum() < tissue[len(tissue) // 4 : len(tissue) // 2].sum(), tissue
        assert np.nonzero(tissue > 0.05 * tissue.max())[0].max() > centre


def test_bundled_configs_carry_no_machine_paths():
    configs = list(Path(DEMO_MODEL_PATH).rglob("*.json"))
    assert configs
    for path in configs:
        assert "_name_or_path" not in json.loads(path.read_text()), path
