"""GEM-3D input preparation: label scaling, resizing, VAE posterior sampling, mask augmentation recipes."""

import pytest
import torch

from meddiffusers.pipelines.gem3d import (
    augment_abdomen_mask,
    augment_brain_mask,
    check_label_mask,
    encode_slices,
    prepare_image_slice,
    prepare_mask,
    resize_slices,
    scale_intensities,
    scale_labels,
)


def test_labels_map_to_the_original_conditioning_values():
    labels = torch.tensor([0.0, 1, 2, 3]).view(1, 1, 4, 1, 1)
    torch.testing.assert_close(scale_labels(labels, 3).flatten(), torch.tensor([-1, -1 / 3, 1 / 3, 1]))
    torch.testing.assert_close(scale_labels(labels, 4).flatten(), torch.tensor([-1, -0.5, 0, 0.5]))


def test_prepare_mask_resizes_with_nearest_neighbour_and_keeps_the_slices():
    labels = torch.zeros(1, 1, 3, 4, 4)
    labels[:, :, :, :2, :2] = 2
    prepared = prepare_mask(labels, max_label=4, resolution=8)
    assert prepared.shape == (1, 1, 3, 8, 8)
    expected = torch.full((8, 8), -1.0)
    expected[:4, :4] = 0.0
    for index in range(3):
        torch.testing.assert_close(prepared[0, 0, index], expected, atol=0, rtol=0)


def test_images_are_min_max_scaled_over_the_volume():
    volume = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(1, 1, 6, 2, 2)
    scaled = scale_intensities(volume)
    assert scaled.min() == -1 and scaled.max() == 1
    image = prepare_image_slice(volume, 0, resolution=2)
    torch.testing.assert_close(image, scaled[:, :, 0])
    with pytest.raises(ValueError, match="outside"):
        prepare_image_slice(volume, 6, resolution=2)


def test_bilinear_resize_of_a_constant_slice_is_constant():
    volume = torch.full((1, 1, 2, 5, 7), 0.25)
    torch.testing.assert_close(resize_slices(volume, (9, 4), mode="bilinear"), torch.full((1, 1, 2, 9, 4), 0.25))


def test_encode_slices_reproduces_the_original_posterior_sample(stage2_pipeline, reference):
    # [d] of the fixture: 0.18215 * (mean + std * noise) of the grayscale slices repeated to 3 channels.
    r = reference
    gray = r["vae_x_gray3"][:, :1]
    with torch.no_grad():
        latents = encode_slices(stage2_pipeline.vae, gray, r["vae_gray3_sample_noise"])
    torch.testing.assert_close(latents, r["vae_gray3_z_scaled"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.zeros(1, 2, 4, 4, 4), "label volume"),
        (torch.full((1, 1, 4, 4, 4), float("inf")), "NaN or infinite"),
        (torch.full((1, 1, 4, 4, 4), -1.0), r"\[-1, -1\]"),
        (torch.full((1, 1, 4, 4, 4), 1.5), "integer"),
    ],
)
def test_bad_label_maps_are_rejected(labels, message):
    with pytest.raises(ValueError, match=message):
        check_label_mask(labels, 3)


def cube_mask(size=24, low=8, high=16, value=1.0):
    mask = torch.full((size, size, size), -1.0)
    mask[low:high, low:high, low:high] = value
    return mask


def test_abdomen_augmentation_rotates_slightly_and_keeps_the_labels():
    mask = cube_mask(size=48, low=4, high=20)  # off-centre, so that a small rotation moves its faces
    augmented = augment_abdomen_mask(mask, generator=torch.Generator().manual_seed(0))
    again = augment_abdomen_mask(mask, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(augmented, again, atol=0, rtol=0)
    assert set(augmented.unique().tolist()) <= {-1.0, 1.0}
    inside, moved = mask > -1, augmented > -1
    overlap = (inside & moved).sum() / (inside | moved).sum()
    assert 0.7 < overlap < 0.99  # a rotation by at most 2.5 degrees about each axis


def test_brain_augmentation_moves_the_lesion_towards_the_centre():
    mask = cube_mask(size=64, low=8, high=16, value=1 / 3)  # a lesion off-centre, clear of the borders
    augmented = augment_brain_mask(mask, generator=torch.Generator().manual_seed(0))
    lesion = (augmented > -1).nonzero().double()
    original = (mask > -1).nonzero().double()
    centre = torch.full((3,), 31.5, dtype=torch.float64)
    moved = (original.mean(0) - centre).norm() - (lesion.mean(0) - centre).norm()
    assert 9 <= moved <= 31  # half of a random 20..59 voxels, along the direction to the centre
    assert abs(len(lesion) - len(original)) <= 0.25 * len(original)
    torch.testing.assert_close(augmented[augmented > -1], torch.full((len(lesion),), 1 / 3), atol=1e-6, rtol=0)
