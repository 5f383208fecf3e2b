"""Thick-slice condition: slice averaging along D, repeated back to the thin-slice grid."""

import pytest
import torch

from meddiffusers.operators import slice_average_pool, thick_slice_condition


def test_runs_of_slices_are_averaged_and_repeated_back():
    volume = torch.arange(7, dtype=torch.float32).view(1, 1, 7, 1, 1).expand(2, 1, 7, 3, 2).contiguous()
    pooled = slice_average_pool(volume, 3)
    assert pooled.shape == (2, 1, 3, 3, 2)
    torch.testing.assert_close(pooled[0, 0, :, 0, 0], torch.tensor([1.0, 4.0, 6.0]))  # the last run is one slice
    condition = thick_slice_condition(volume, 3)
    assert condition.shape == volume.shape
    torch.testing.assert_close(condition[1, 0, :, 2, 1], torch.tensor([1.0, 1, 1, 4, 4, 4, 6]))
    torch.testing.assert_close(thick_slice_condition(volume, 1), volume)
    # In-plane detail is untouched: each thick slice is the plain mean of its thin slices.
    noisy = torch.randn(1, 2, 10, 4, 4)
    torch.testing.assert_close(slice_average_pool(noisy, 5), noisy.view(1, 2, 2, 5, 4, 4).mean(3))


def test_bad_arguments():
    with pytest.raises(ValueError, match="slice_factor"):
        thick_slice_condition(torch.zeros(1, 1, 4, 4, 4), 0)
    with pytest.raises(ValueError, match="5 dimensions"):
        slice_average_pool(torch.zeros(4, 4, 4), 2)
