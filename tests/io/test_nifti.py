"""NIfTI <-> tensor I/O: axis order, affine, header and exact round trips on synthetic and real volumes."""

import nibabel as nib
import numpy as np
import pytest
import torch

from meddiffusers import NiftiVolume, load_nifti, save_nifti
from meddiffusers.io import affine_from_tensor_spacing, tensor_spacing_from_affine
from tests.conftest import CT_CHEST_CROP, EXAMPLE_VOLUME, MR_BRAIN_CROP, shared_volume

# Left-Posterior-Superior axes with anisotropic voxels (0.7 x 0.8 x 2.5 mm) and a small obliquity.
LPS_ANISOTROPIC = np.array(
    [
        [-0.7, 0.0, 0.0, 90.0],
        [0.0, -0.79, 0.12, 110.0],
        [0.0, 0.08, 2.497, -60.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def write(tmp_path, array, affine, name="volume.nii.gz", **header_fields):
    image = nib.Nifti1Image(array, affine)
    for key, value in header_fields.items():
        image.header[key] = value
    path = tmp_path / name
    nib.save(image, path)
    return path


def assert_round_trip_exact(path, tmp_path):
    first = load_nifti(path)
    out = save_nifti(first, tmp_path / "round_trip.nii.gz")
    second = load_nifti(out)
    assert torch.equal(first.tensor, second.tensor)
    np.testing.assert_array_equal(first.affine, second.affine)
    assert first.orientation == second.orientation == nib.aff2axcodes(nib.load(path).affine)
    assert first.spacing == second.spacing
    return first, second


def test_tensor_axes_are_z_x_y_of_the_nifti_array(tmp_path):
    array = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)  # (x, y, z)
    volume = load_nifti(write(tmp_path, array, LPS_ANISOTROPIC))
    assert volume.tensor.shape == (1, 1, 7, 5, 6)
    assert volume.tensor[0, 0, 3, 1, 2] == array[1, 2, 3]
    assert volume.tensor.dtype == torch.float32


def test_anisotropic_lps_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    path = write(tmp_path, rng.normal(size=(12, 10, 6)).astype(np.float32), LPS_ANISOTROPIC)
    first, second = assert_round_trip_exact(path, tmp_path)
    assert first.orientation == ("L", "P", "S")
    column_norms = np.linalg.norm(LPS_ANISOTROPIC[:3, :3], axis=0)
    assert first.spacing == pytest.approx((column_norms[2], column_norms[0], column_norms[1]))  # (z, x, y)
    assert first.spacing == pytest.approx((2.4999, 0.7, 0.7940), abs=1e-4)
    assert int(second.header["sform_code"]) == int(first.header["sform_code"])
    assert second.header.get_xyzt_units() == first.header.get_xyzt_units()


def test_scaled_integer_data_is_loaded_in_real_units(tmp_path):
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    image = nib.Nifti1Image(raw, np.eye(4))
    image.header.set_slope_inter(0.5, -10.0)
    nib.save(image, tmp_path / "scaled.nii.gz")
    volume = load_nifti(tmp_path / "scaled.nii.gz")
    np.testing.assert_allclose(volume.tensor[0, 0].numpy(), raw.transpose(2, 0, 1) * 0.5 - 10.0)
    assert_round_trip_exact(tmp_path / "scaled.nii.gz", tmp_path)


def test_fourth_axis_becomes_channels(tmp_path):
    array = np.random.default_rng(1).normal(size=(4, 5, 6, 3)).astype(np.float32)
    volume = load_nifti(write(tmp_path, array, np.eye(4)))
    assert volume.tensor.shape == (1, 3, 6, 4, 5)
    assert_round_trip_exact(tmp_path / "volume.nii.gz", tmp_path)


def test_canonical_reorientation_gives_ras(tmp_path):
    array = np.random.default_rng(2).normal(size=(6, 7, 8)).astype(np.float32)
    path = write(tmp_path, array, np.diag([-1.0, -1.5, 2.0, 1.0]))
    volume = load_nifti(path, canonical=True)
    assert volume.orientation == ("R", "A", "S")
    assert volume.tensor.shape == (1, 1, 8, 6, 7)
    # Flipped x and y axes: the first voxel of the RAS array is the last of the stored one.
    assert volume.tensor[0, 0, 0, 0, 0] == array[-1, -1, 0]


def test_spacing_helpers_are_inverse():
    affine = affine_from_tensor_spacing((2.0, 0.5, 0.75))
    np.testing.assert_array_equal(np.diag(affine), [0.5, 0.75, 2.0, 1.0])
    assert tensor_spacing_from_affine(affine) == (2.0, 0.5, 0.75)


def test_saving_a_plain_tensor_with_spacing(tmp_path):
    tensor = torch.rand(1, 1, 4, 5, 6)
    path = save_nifti(tensor, tmp_path / "nested" / "out.nii.gz", affine=affine_from_tensor_spacing((3.0, 1.0, 1.0)))
    image = nib.load(path)
    assert image.shape == (5, 6, 4)
    assert image.header.get_zooms() == (1.0, 1.0, 3.0)
    np.testing.assert_array_equal(image.get_fdata(dtype=np.float32), tensor[0, 0].numpy().transpose(1, 2, 0))


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("half.nii.gz", lambda data: data[: len(data) // 2]),  # a download cut short
        ("header_only.nii.gz", lambda data: data[:200]),
        ("zeroed.nii.gz", lambda data: data[:5000] + bytes(100) + data[5100:]),  # damaged compressed stream
    ],
)
def test_truncated_or_corrupt_files_raise_a_value_error_naming_the_file(tmp_path, name, damage):
    damaged = tmp_path / name
    damaged.write_bytes(damage(EXAMPLE_VOLUME.read_bytes()))
    with pytest.raises(ValueError, match=rf"Could not read '{damaged}' as NIfTI.*truncated or corrupt"):
        load_nifti(damaged)


def test_truncated_uncompressed_file_raises_a_value_error(tmp_path):
    nib.save(nib.load(EXAMPLE_VOLUME), tmp_path / "full.nii")
    data = (tmp_path / "full.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.nii' as NIfTI \(OSError: Expected \d+ bytes, got \d+ bytes"):
        load_nifti(tmp_path / "cut.nii", canonical=True)


def test_bad_files_and_shapes_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_nifti(tmp_path / "absent.nii.gz")
    (tmp_path / "text.nii.gz").write_text("hello")
    with pytest.raises(ValueError, match="Could not read"):
        load_nifti(tmp_path / "text.nii.gz")
    with pytest.raises(ValueError, match="3D NIfTI"):
        load_nifti(write(tmp_path, np.zeros((4, 5), np.float32), np.eye(4), name="flat.nii.gz"))
    with pytest.raises(ValueError, match="one volume at a time"):
        save_nifti(torch.zeros(2, 1, 3, 3, 3), tmp_path / "batch.nii.gz")


def invesalius_ct_head():
    return shared_volume(
        "ct_head_invesalius_cranium.nii.gz", "it is GPL-2 licensed, so it cannot ship with the Apache-2.0 tests"
    )


@pytest.mark.parametrize(
    ("volume", "orientation"),
    [
        (lambda: CT_CHEST_CROP, ("L", "P", "S")),
        (lambda: MR_BRAIN_CROP, ("L", "A", "S")),
        (lambda: EXAMPLE_VOLUME, ("L", "S", "A")),
        (invesalius_ct_head, ("R", "A", "S")),
    ],
    ids=["ct-chest-lps", "mr-brain-las", "mr-t1-lsa", "ct-head-ras"],
)
def test_real_volumes_round_trip_exactly(volume, orientation, tmp_path):
    path = volume()
    first, _ = assert_round_trip_exact(path, tmp_path)
    stored = nib.load(path)
    x, y, z = stored.shape[:3]
    assert first.tensor.shape == (1, 1, z, x, y)
    assert first.orientation == orientation
    assert first.spacing == pytest.approx(tuple(float(s) for s in np.array(stored.header.get_zooms())[[2, 0, 1]]))
    np.testing.assert_array_equal(first.tensor[0, 0, :, :, 0].numpy(), stored.get_fdata()[:, 0, :].T)


def test_mni152_template_from_installed_nilearn(tmp_path):
    datasets = pytest.importorskip("nilearn.datasets")
    template = datasets.load_mni152_template(resolution=2)
    nib.save(template, tmp_path / "mni152.nii.gz")
    first, _ = assert_round_trip_exact(tmp_path / "mni152.nii.gz", tmp_path)
    assert first.orientation == ("R", "A", "S")
    assert first.spacing == (2.0, 2.0, 2.0)
    assert first.tensor.shape == (1, 1, 95, 99, 117)
    assert isinstance(first, NiftiVolume) and first.tensor.max() > 0
