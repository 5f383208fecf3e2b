"""Multi-level patches: the coordinate maps and labels go through exactly the crop and resize of the image."""

import pytest
import torch
import torch.nn.functional as F

from meddiffusers.training.multilevel import (
    LEVELS,
    level_crop_size,
    resize_labels,
    sample_multilevel_patch,
)
from meddiffusers.utils import window_coordinates

SIZE = (20, 24, 28)  # (D, H, W): every axis its own length, larger than twice the patch on H and W
PATCH = 6


def volume_and_labels():
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand((1, *SIZE), generator=generator) * 2 - 1
    labels = torch.zeros((1, *SIZE), dtype=torch.long)
    labels[:, 3:9, 4:15, 5:20] = 2
    labels[:, 10:18, 2:8, 9:25] = 7
    return volume, labels


def test_native_crop_coordinates_are_the_slice_of_the_whole_volume_map():
    volume, labels = volume_and_labels()
    whole = window_coordinates(SIZE)
    for seed in range(5):
        patch = sample_multilevel_patch(volume, PATCH, torch.Generator().manual_seed(seed), labels, level="native")
        assert patch.image.shape == (1, PATCH, PATCH, PATCH) and patch.position.shape == (3, PATCH, PATCH, PATCH)
        torch.testing.assert_close(patch.position, whole[(slice(None), *patch.window)], atol=1e-6, rtol=0)
        assert torch.equal(patch.image, volume[(slice(None), *patch.window)])
        assert torch.equal(patch.anatomy, labels[(slice(None), *patch.window)])


def test_whole_level_spans_minus_one_to_one_exactly():
    volume, labels = volume_and_labels()
    patch = sample_multilevel_patch(volume, PATCH, torch.Generator().manual_seed(1), labels, level="whole")
    assert patch.window == tuple(slice(0, side) for side in SIZE)
    for axis in range(3):
        values = patch.position[axis].movedim(axis, 0)
        assert torch.all(values[0] == -1) and torch.all(values[-1] == 1)
    # Corners are kept by align_corners=True: the image's corner voxels are the volume's.
    assert patch.image[0, 0, 0, 0] == volume[0, 0, 0, 0] and patch.image[0, -1, -1, -1] == volume[0, -1, -1, -1]


@pytest.mark.parametrize("level", ["whole", "double"])
def test_resized_coordinates_are_the_trilinear_resize_of_the_whole_map(level):
    volume, labels = volume_and_labels()
    whole = window_coordinates(SIZE)
    for seed in range(4):
        patch = sample_multilevel_patch(volume, PATCH, torch.Generator().manual_seed(seed), labels, level=level)
        crop = whole[(slice(None), *patch.window)]
        expected = F.interpolate(crop[None], size=(PATCH,) * 3, mode="trilinear", align_corners=True)[0]
        torch.testing.assert_close(patch.position, expected, atol=1e-6, rtol=0)
        image = F.interpolate(volume[(None, slice(None), *patch.window)], size=(PATCH,) * 3, mode="trilinear",
                              align_corners=True)[0]  # fmt: skip
        torch.testing.assert_close(patch.image, image)


def test_labels_are_resampled_by_nearest_neighbour():
    volume, labels = volume_and_labels()
    for level in LEVELS:
        for seed in range(6):
            patch = sample_multilevel_patch(volume, 5, torch.Generator().manual_seed(seed), labels, level=level)
            assert patch.anatomy.dtype == torch.long and patch.anatomy.shape == (1, 5, 5, 5)
            assert set(patch.anatomy.unique().tolist()) <= set(labels[(slice(None), *patch.window)].unique().tolist())
    # On a linear ramp, nearest neighbour at the align_corners points is the rounded source index.
    ramp = torch.arange(9).view(1, 9, 1, 1).expand(1, 9, 2, 2)
    assert resize_labels(ramp, (5, 2, 2))[0, :, 0, 0].tolist() == [0, 2, 4, 6, 8]


def test_same_generator_state_gives_the_same_patch():
    volume, labels = volume_and_labels()
    first = [sample_multilevel_patch(volume, PATCH, g, labels) for g in [torch.Generator().manual_seed(3)] * 6]
    second = [sample_multilevel_patch(volume, PATCH, g, labels) for g in [torch.Generator().manual_seed(3)] * 6]
    for a, b in zip(first, second):
        assert a.level == b.level and a.window == b.window
        for name in ("image", "position", "anatomy"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    assert len({(p.level, str(p.window)) for p in first}) > 1  # one generator is a stream, not one repeated draw


def test_level_frequencies_follow_the_probabilities():
    volume = torch.zeros((1, 16, 16, 16))
    generator = torch.Generator().manual_seed(0)
    counts = {level: 0 for level in LEVELS}
    for _ in range(1500):
        counts[sample_multilevel_patch(volume, 4, generator).level] += 1
    assert all(abs(count / 1500 - 1 / 3) < 0.05 for count in counts.values()), counts
    only_native = [sample_multilevel_patch(volume, 4, generator, probabilities=(0, 0, 1)).level for _ in range(50)]
    assert set(only_native) == {"native"}


def test_crops_larger_than_the_volume_are_clipped_and_resized():
    volume = torch.rand((1, 5, 30, 30))
    assert level_crop_size("double", (5, 30, 30), 8) == (5, 16, 16)
    assert level_crop_size("native", (5, 30, 30), 8) == (5, 8, 8)
    patch = sample_multilevel_patch(volume, 8, torch.Generator().manual_seed(0), level="native")
    assert patch.window[0] == slice(0, 5) and patch.image.shape == (1, 8, 8, 8)
    whole = window_coordinates((5, 30, 30))
    expected = F.interpolate(whole[(None, slice(None), *patch.window)], size=(8, 8, 8), mode="trilinear",
                             align_corners=True)[0]  # fmt: skip
    torch.testing.assert_close(patch.position, expected, atol=1e-6, rtol=0)
    assert patch.position[0, 0].min() == -1 and patch.position[0, -1].max() == 1


def test_bad_inputs_are_refused():
    volume = torch.zeros((1, 8, 8, 8))
    with pytest.raises(ValueError, match="probabilities"):
        sample_multilevel_patch(volume, 4, probabilities=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="anatomy"):
        sample_multilevel_patch(volume, 4, anatomy=torch.zeros((1, 8, 8, 4), dtype=torch.long))
    with pytest.raises(ValueError, match="level"):
        sample_multilevel_patch(volume, 4, level="half")
