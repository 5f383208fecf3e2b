"""Training preprocessing brings every volume to one orientation; orientation-preserving augmentations never rotate."""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from meddiffusers import load_nifti
from meddiffusers.training.data import (
    AUGMENTATIONS,
    VolumeDataset,
    VolumePreprocessor,
    augment,
    augmentation_options,
    parse_axcodes,
    reorient,
)
from meddiffusers.training.latents import encode_manifest

MR_VOLUME = Path(__file__).resolve().parents[2] / "examples" / "data" / "mr_t1_itk_kmeanstest.nii.gz"
SHAPE = (5, 6, 7)  # (x, y, z) of the synthetic files: every axis has its own length
MARKER = (1, 2, 3)  # (x, y, z) index of a voxel with a unique value


def write_volume(path, affine) -> np.ndarray:
    """A volume whose voxel values are all different, with one bright marker voxel; returns the (x, y, z) array."""
    array = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    array[MARKER] = 1000.0
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return array


def world(affine, index) -> np.ndarray:
    return (np.asarray(affine) @ np.array([*index, 1.0]))[:3]


# Stored LSA like the ITK head slab: x points to the patient's left, y superior, z anterior (2 x 3 x 4 mm voxels).
LSA = np.array([[-2.0, 0, 0, 10], [0, 0, 4.0, -20], [0, 3.0, 0, 30], [0, 0, 0, 1]])
# Stored LPS like DICOM / ITK CT: x to the left, y posterior, z superior.
LPS = np.array([[-2.0, 0, 0, 10], [0, -3.0, 0, -20], [0, 0, 4.0, 30], [0, 0, 0, 1]])


def test_lsa_volume_comes_out_ras_with_the_axes_permuted_and_x_flipped(tmp_path):
    array = write_volume(tmp_path / "lsa.nii.gz", LSA)
    volume = VolumePreprocessor().load(tmp_path / "lsa.nii.gz")
    assert volume.orientation == ("R", "A", "S")
    # RAS array axes: R = the flipped stored x, A = stored z, S = stored y; tensor (D, H, W) = (S, R, A).
    nx = SHAPE[0]
    assert tuple(volume.tensor.shape) == (1, 1, SHAPE[1], SHAPE[0], SHAPE[2])
    assert volume.spacing == (3.0, 2.0, 4.0)
    tensor = volume.tensor[0, 0]
    x, y, z = MARKER
    assert tensor[y, nx - 1 - x, z] == 1000.0
    assert torch.equal(tensor, torch.from_numpy(array).flip(0).permute(1, 0, 2))
    # Every voxel keeps its world position: D index y, H index nx - 1 - x, W index z in the (x, y, z) = (H, W, D) file.
    np.testing.assert_allclose(world(volume.affine, (nx - 1 - x, z, y)), world(LSA, MARKER))
    # Superior is up along D, the patient's right grows along H, anterior grows along W.
    first, last = world(volume.affine, (0, 0, 0)), world(volume.affine, (nx - 1, SHAPE[2] - 1, SHAPE[1] - 1))
    assert (last > first).all()


def test_lps_volume_comes_out_ras_with_x_and_y_flipped(tmp_path):
    array = write_volume(tmp_path / "lps.nii.gz", LPS)
    preprocessor = VolumePreprocessor(intensity="ct:0:1000")
    volume = preprocessor.load(tmp_path / "lps.nii.gz")
    assert volume.orientation == ("R", "A", "S")
    assert tuple(volume.tensor.shape) == (1, 1, SHAPE[2], SHAPE[0], SHAPE[1])
    x, y, z = MARKER
    assert volume.tensor[0, 0, z, SHAPE[0] - 1 - x, SHAPE[1] - 1 - y] == 1000.0
    np.testing.assert_allclose(world(volume.affine, (SHAPE[0] - 1 - x, SHAPE[1] - 1 - y, z)), world(LPS, MARKER))
    # The full preprocessing (scaling to [-1, 1]) keeps that layout: the marker is the only voxel at the top.
    scaled = preprocessor(tmp_path / "lps.nii.gz")
    assert scaled.shape == (1, SHAPE[2], SHAPE[0], SHAPE[1])
    top = (scaled[0] == scaled.max()).nonzero().tolist()
    assert top == [[z, SHAPE[0] - 1 - x, SHAPE[1] - 1 - y]]
    expected = torch.from_numpy(array).flip(0).flip(1).permute(2, 0, 1)
    assert torch.equal(volume.tensor[0, 0], expected)


def test_real_lsa_head_slab_is_reoriented_like_nibabel_canonical():
    native = load_nifti(MR_VOLUME)
    assert native.orientation == ("L", "S", "A") and tuple(native.tensor.shape) == (1, 1, 62, 128, 128)
    canonical = VolumePreprocessor().load(MR_VOLUME)
    # Tensor (D, H, W): native (A, L, S) -> RAS+ (S, R, A).
    assert tuple(canonical.tensor.shape) == (1, 1, 128, 128, 62)
    assert torch.equal(canonical.tensor, native.tensor.permute(0, 1, 4, 3, 2).flip(3))
    image = nib.as_closest_canonical(nib.load(str(MR_VOLUME)))
    np.testing.assert_allclose(canonical.affine, image.affine)
    # The generic reorientation agrees with nibabel's canonical path, and resampling happens in the new layout.
    assert torch.equal(reorient(native, "RAS").tensor, canonical.tensor)
    assert VolumePreprocessor(spacing=(8.0, 4.0, 6.0))(str(MR_VOLUME)).shape == (1, 32, 64, 31)


def test_explicit_and_native_orientations(tmp_path):
    array = write_volume(tmp_path / "lsa.nii.gz", LSA)
    lps = VolumePreprocessor(orientation="LPS").load(tmp_path / "lsa.nii.gz")
    assert lps.orientation == ("L", "P", "S")
    # x stays (L), y = flipped stored z (P), z = stored y (S): tensor (D, H, W) = (y, x, flipped z).
    assert torch.equal(lps.tensor[0, 0], torch.from_numpy(array).flip(2).permute(1, 0, 2))
    x, y, z = MARKER
    np.testing.assert_allclose(world(lps.affine, (x, SHAPE[2] - 1 - z, y)), world(LSA, MARKER))
    native = VolumePreprocessor(orientation=None).load(tmp_path / "lsa.nii.gz")
    assert native.orientation == ("L", "S", "A")
    assert torch.equal(native.tensor[0, 0], torch.from_numpy(array).permute(2, 0, 1))
    assert torch.equal(VolumePreprocessor(orientation="native").load(tmp_path / "lsa.nii.gz").tensor, native.tensor)
    assert parse_axcodes("ras+") == ("R", "A", "S")
    for bad in ("RAX", "RRS", "RA", "LPSI"):
        with pytest.raises(ValueError, match="axis-code"):
            VolumePreprocessor(orientation=bad)


def asymmetric_volume() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand((1, 4, 6, 6), generator=generator)


def variants(volume, allowed_flips):
    """All volumes reachable with flips of a subset of `allowed_flips` (no rotation)."""
    found = [volume]
    for axis in allowed_flips:
        found += [v.flip(axis) for v in found]
    return found


@pytest.mark.parametrize("name", ["lr_flip", "none"])
def test_orientation_preserving_augmentation_never_rotates(name):
    volume = asymmetric_volume()
    allowed = variants(volume, AUGMENTATIONS[name]["flips"])
    options = augmentation_options(name)
    generator = random.Random(0)
    seen = set()
    for _ in range(200):
        out = augment(volume, generator, **options)
        matches = [index for index, candidate in enumerate(allowed) if torch.equal(out, candidate)]
        assert matches, "the augmentation produced a rotated (or otherwise reoriented) volume"
        seen.add(matches[0])
    assert len(seen) == len(allowed)  # lr_flip does flip left-right (about half the time)


def test_reference_augmentation_still_rotates_and_is_the_default():
    volume = asymmetric_volume()
    flips_only = variants(volume, (2, 3))
    outputs = [augment(volume, random.Random(seed)) for seed in range(50)]
    assert any(not any(torch.equal(out, v) for v in flips_only) for out in outputs)
    for seed, out in enumerate(outputs):
        assert torch.equal(out, augment(volume, random.Random(seed), **AUGMENTATIONS["reference"]))
    assert augmentation_options(True) == AUGMENTATIONS["reference"]
    assert augmentation_options(False) == AUGMENTATIONS["none"]
    with pytest.raises(ValueError, match="lr_flip"):
        augmentation_options("rotate")


def test_dataset_and_latent_cache_follow_the_augmentation_setting(tmp_path):
    write_volume(tmp_path / "lsa.nii.gz", LSA)
    rows = [{"image": str(tmp_path / "lsa.nii.gz"), "region": "MRBrain", "class_id": 0}]
    preprocessor = VolumePreprocessor()
    clean = preprocessor(str(tmp_path / "lsa.nii.gz"))
    dataset = VolumeDataset(rows, preprocessor, augmentation="lr_flip", seed=1)
    items = [dataset[0]["pixel_values"] for _ in range(30)]
    assert all(torch.equal(v, clean) or torch.equal(v, clean.flip(2)) for v in items)
    assert any(torch.equal(v, clean.flip(2)) for v in items)
    unaugmented = VolumeDataset(rows, preprocessor, augmentation="none")
    assert all(torch.equal(unaugmented[0]["pixel_values"], clean) for _ in range(10))

    identity = SimpleNamespace(
        dtype=torch.float32, encode=lambda x: SimpleNamespace(latents=x), normalize_latents=lambda x: x
    )
    columns = encode_manifest(identity, rows, preprocessor, augment_copies=8, augmentation="none")
    assert len(columns["latents"]) == 9
    assert all(np.array_equal(latents, clean.numpy().reshape(-1)) for latents in columns["latents"])
    columns = encode_manifest(identity, rows, preprocessor, augment_copies=8, augmentation="lr_flip", seed=2)
    allowed = [clean.numpy().reshape(-1), clean.flip(2).numpy().reshape(-1)]
    assert all(any(np.array_equal(latents, a) for a in allowed) for latents in columns["latents"])


def test_labels_follow_the_image_through_orientation_resampling_and_padding(tmp_path):
    """`VolumePreprocessor.labels` gives an anatomy file the image's grid: same reorientation (LPS -> RAS), the
    same resampled size (nearest neighbour, so only the file's labels), 0 where the image is padded."""
    write_volume(tmp_path / "image.nii.gz", LPS)
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[3:, :, :] = 1
    labels[MARKER] = 5
    nib.save(nib.Nifti1Image(labels, LPS), str(tmp_path / "labels.nii.gz"))
    preprocessor = VolumePreprocessor(intensity="ct:0:1000")
    image, anatomy = preprocessor(tmp_path / "image.nii.gz"), preprocessor.labels(tmp_path / "labels.nii.gz")
    assert anatomy.dtype == torch.long and anatomy.shape == image.shape
    assert (anatomy[0] == 5).nonzero().tolist() == (image[0] == image.max()).nonzero().tolist()  # the marker voxel
    resampling = VolumePreprocessor(intensity="ct:0:1000", spacing=(1.5, 1.0, 1.25), multiple=4)
    image, anatomy = resampling(tmp_path / "image.nii.gz"), resampling.labels(tmp_path / "labels.nii.gz")
    assert anatomy.shape == image.shape and set(anatomy.unique().tolist()) == {0, 1, 5}
    padded = (image == -1).all(dim=(0, 2, 3))  # the D slices added by the padding
    assert padded.any() and (anatomy[:, padded] == 0).all()


def test_manifest_reads_an_anatomy_column(tmp_path):
    from meddiffusers.io.regions import meddiff_fm_regions
    from meddiffusers.training.data import read_manifest

    write_volume(tmp_path / "ct.nii.gz", LPS)
    write_volume(tmp_path / "organs.nii.gz", LPS)
    rows = [{"image": "ct.nii.gz", "region": "Thorax", "anatomy": "organs.nii.gz"}]
    rows.append({"image": "ct.nii.gz", "region": 2})
    (tmp_path / "manifest.json").write_text(json.dumps(rows))
    manifest = read_manifest(tmp_path / "manifest.json", meddiff_fm_regions())
    assert manifest["anatomy"] == [str(tmp_path / "organs.nii.gz"), ""] and manifest["class_id"] == [1, 2]
    rows[0]["anatomy"] = "missing.nii.gz"
    (tmp_path / "manifest.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="missing.nii.gz"):
        read_manifest(tmp_path / "manifest.json", meddiff_fm_regions())
