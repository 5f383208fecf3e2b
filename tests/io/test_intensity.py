"""Percentile scaling and CT windows to and from the models' [-1, 1] space."""

import numpy as np
import pytest
import torch

from meddiffusers import HUWindow, PercentileScaling, load_nifti
from tests.conftest import CT_CHEST_CROP, EXAMPLE_VOLUME, shared_volume


def test_percentile_scaling_maps_percentiles_to_unit_range():
    torch.manual_seed(0)
    volume = torch.randn(2, 1, 8, 8, 8) * torch.tensor([10.0, 300.0]).view(2, 1, 1, 1, 1)
    scaled, (low, high) = PercentileScaling()(volume, return_range=True)
    for item in range(2):
        values = volume[item].flatten().double().numpy()
        assert low[item].item() == pytest.approx(np.percentile(values, 0.5), rel=1e-5)
        assert high[item].item() == pytest.approx(np.percentile(values, 99.5), rel=1e-5)
    assert scaled.min() == -1 and scaled.max() == 1
    inside = (volume >= low) & (volume <= high)
    restored = PercentileScaling.inverse(scaled, (low, high))
    torch.testing.assert_close(restored[inside], volume[inside], atol=1e-3, rtol=1e-5)


def test_percentile_scaling_of_constant_volume_is_background():
    assert torch.equal(PercentileScaling()(torch.full((1, 1, 4, 4, 4), 7.0)), torch.full((1, 1, 4, 4, 4), -1.0))


def test_percentile_scaling_rejects_bad_input():
    with pytest.raises(ValueError, match="lower < upper"):
        PercentileScaling(lower=99, upper=1)
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        PercentileScaling()(torch.zeros(4, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        PercentileScaling()(torch.full((1, 1, 2, 2, 2), float("nan")))


def test_hu_window_and_inverse():
    window = HUWindow(-1000, 1000)
    hu = torch.tensor([-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0])
    scaled = window(hu)
    torch.testing.assert_close(scaled, torch.tensor([-1.0, -1.0, 0.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(window.inverse(scaled), hu.clamp(-1000, 1000))


def test_hu_window_constructors():
    assert HUWindow.from_center_width(40, 400) == HUWindow(-160, 240)
    assert HUWindow.preset("lung").min_hu < -1000
    with pytest.raises(ValueError, match="Unknown CT window"):
        HUWindow.preset("liver-ish")
    with pytest.raises(ValueError, match="must exceed"):
        HUWindow(100, 100)


@pytest.mark.parametrize(
    "volume",
    [
        lambda: CT_CHEST_CROP,
        lambda: shared_volume(
            "ct_head_invesalius_cranium.nii.gz", "it is GPL-2 licensed, so it cannot ship with the Apache-2.0 tests"
        ),
    ],
    ids=["ct-chest-shipped", "ct-head-shared"],
)
def test_real_ct_to_model_space_and_back(volume):
    volume = load_nifti(volume())
    assert volume.tensor.min() < -1000 and volume.tensor.max() > 1000  # air and bone in Hounsfield units
    window = HUWindow.preset("wide")
    scaled = window(volume.tensor)
    assert scaled.min() >= -1 and scaled.max() <= 1
    air = volume.tensor < -1000
    assert torch.all(scaled[air] == -1)
    inside = (volume.tensor >= -1000) & (volume.tensor <= 1000)
    torch.testing.assert_close(window.inverse(scaled)[inside], volume.tensor[inside], atol=1e-3, rtol=0)


def test_real_mri_percentile_scaling():
    volume = load_nifti(EXAMPLE_VOLUME)
    scaled = PercentileScaling()(volume.tensor)
    assert scaled.min() == -1 and scaled.max() == 1
    assert ((scaled > -1) & (scaled < 1)).float().mean() > 0.15  # the head, not the air around it
