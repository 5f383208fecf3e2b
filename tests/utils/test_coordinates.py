"""window_coordinates: global voxel coordinates of windows and resized crops."""

import pytest
import torch
import torch.nn.functional as F

from meddiffusers.utils import window_coordinates


def test_the_whole_volume_spans_minus_one_to_one_on_every_axis():
    grid = window_coordinates((4, 5, 9))
    assert grid.shape == (3, 4, 5, 9)
    for axis in range(3):
        line = grid[axis].movedim(axis, 0).flatten(1)[:, 0]
        torch.testing.assert_close(line, torch.linspace(-1, 1, grid.shape[axis + 1]))
    assert torch.equal(window_coordinates((1, 2, 2))[0], torch.zeros(1, 2, 2))


def test_a_window_is_the_slice_of_the_whole_map():
    size, window = (12, 10, 16), (slice(4, 12), slice(0, 8), slice(5, 13))
    torch.testing.assert_close(window_coordinates(size, window), window_coordinates(size)[(slice(None), *window)])


def test_a_resized_crop_is_what_trilinear_resizing_gives():
    size, window = (16, 16, 16), (slice(2, 10), slice(0, 16), slice(8, 16))
    crop = window_coordinates(size)[(slice(None), *window)]
    resized = F.interpolate(crop[None].double(), size=(4, 4, 4), mode="trilinear", align_corners=True)[0]
    torch.testing.assert_close(window_coordinates(size, window, output_size=4), resized.float())


def test_windows_outside_the_volume_are_refused():
    with pytest.raises(ValueError, match="inside"):
        window_coordinates((8, 8, 8), (slice(4, 12), slice(0, 8), slice(0, 8)))
    with pytest.raises(ValueError, match="three slices"):
        window_coordinates((8, 8, 8), (slice(0, 8),))
