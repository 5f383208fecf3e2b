"""Undersampling masks reach their acceleration; the masked Fourier operator and its adjoint; mask conditions."""

import pytest
import torch

from meddiffusers.operators import (
    UndersampledMRI,
    cartesian_mask,
    poisson_disc_mask,
    segmentation_condition,
    undersampled_mri_condition,
)


@pytest.mark.parametrize("pattern", ["random", "gaussian"])
@pytest.mark.parametrize("acceleration", [4, 8])
def test_cartesian_masks_reach_acceleration_and_centre(pattern, acceleration):
    mask = cartesian_mask(256, acceleration, center_fraction=0.08, pattern=pattern, seed=1)
    assert mask.sum().item() == round(256 / acceleration)
    centre = round(256 * 0.08)
    start = (256 - centre) // 2
    assert mask[start : start + centre].all()
    assert UndersampledMRI(mask).acceleration((128, 256)) == pytest.approx(acceleration, rel=0.02)


def test_poisson_disc_mask_reaches_acceleration():
    mask = poisson_disc_mask((64, 64), acceleration=4, center_fraction=0.1, seed=0)
    assert 64 * 64 / mask.sum().item() == pytest.approx(4, rel=0.01)
    assert mask[29:35, 29:35].all()


def test_fourier_operator_adjoint_and_full_sampling():
    torch.manual_seed(0)
    operator = UndersampledMRI(cartesian_mask(32, 4))
    x = torch.randn(1, 1, 2, 16, 32)
    y = torch.randn(1, 1, 2, 16, 32, dtype=torch.complex64)
    lhs = (operator(x) * y.conj()).sum()
    rhs = (x.to(torch.complex64) * operator.adjoint(y).conj()).sum()
    assert abs(lhs - rhs) / abs(lhs) < 1e-5
    full = UndersampledMRI(torch.ones(32, dtype=torch.bool))
    torch.testing.assert_close(full.zero_filled(full(x.abs())), x.abs(), atol=1e-5, rtol=1e-5)


def test_conditions():
    volume = torch.rand(1, 1, 2, 16, 32) * 2 - 1
    condition = undersampled_mri_condition(volume, acceleration=4)
    assert condition.shape == volume.shape and not torch.allclose(condition, volume, atol=1e-2)
    labels = torch.tensor([0, 1, 2]).view(1, 1, 1, 1, 3).float()
    torch.testing.assert_close(segmentation_condition(labels), torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 1, 3))
    with pytest.raises(ValueError, match="num_classes"):
        segmentation_condition(labels, num_classes=2)
