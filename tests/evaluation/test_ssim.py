"""3D SSIM against scikit-image, MS-SSIM's identities, monotonicity and minimum sizes."""

import pytest
import torch

from meddiffusers.evaluation import MS_SSIM_WEIGHTS, ms_ssim_3d, ms_ssim_min_size, ssim_3d


def noisy_pair(shape=(2, 1, 18, 20, 16), noise=0.1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=generator, dtype=torch.float64)
    return x, (x + noise * torch.randn(shape, generator=generator, dtype=torch.float64)).clamp(0, 1)


def test_ssim_3d_matches_scikit_image_on_3d_arrays():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    x, y = noisy_pair()
    values = ssim_3d(x, y, data_range=1.0, reduction="none")
    for index in range(2):
        expected = skimage_metrics.structural_similarity(
            x[index, 0].numpy(),
            y[index, 0].numpy(),
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert float(values[index]) == pytest.approx(expected, rel=1e-10)


def test_ssim_in_hu_equals_ssim_in_model_space_with_scaled_range():
    x, y = noisy_pair()
    model = ssim_3d(x * 2 - 1, y * 2 - 1, data_range=2.0)
    hu = ssim_3d((x * 2 - 1) * 1000, (y * 2 - 1) * 1000, data_range=2000.0)
    assert float(hu) == pytest.approx(float(model), rel=1e-12)


def test_ms_ssim_of_a_volume_with_itself_is_one():
    x, _ = noisy_pair(shape=(1, 1, 32, 32, 32))
    assert float(ms_ssim_3d(x, x, data_range=1.0, weights=MS_SSIM_WEIGHTS[:3], kernel_size=7)) == pytest.approx(1.0)


def test_ms_ssim_decreases_monotonically_with_added_noise():
    x, _ = noisy_pair(shape=(1, 1, 32, 32, 32))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values = [
        float(ms_ssim_3d(x, x + level * noise, data_range=1.0, weights=MS_SSIM_WEIGHTS[:3], kernel_size=7))
        for level in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)
    ]
    assert values[0] == pytest.approx(1.0)
    assert all(later < earlier for earlier, later in zip(values, values[1:])), values
    assert values[-1] < 0.8


def test_ms_ssim_with_one_scale_is_ssim():
    x, y = noisy_pair(shape=(1, 1, 16, 16, 16))
    one_scale = ms_ssim_3d(x, y, data_range=1.0, weights=(1.0,), kernel_size=7)
    assert float(one_scale) == pytest.approx(float(ssim_3d(x, y, data_range=1.0, kernel_size=7)), rel=1e-12)


def test_ms_ssim_needs_the_documented_minimum_size():
    assert ms_ssim_min_size() == 176  # 11 * 2^4: the five default scales
    assert ms_ssim_min_size(7, 3) == 28
    x = torch.zeros(1, 1, 27, 40, 40)
    with pytest.raises(ValueError, match=r"needs every spatial side >= 28 voxels"):
        ms_ssim_3d(x, x, data_range=2.0, weights=MS_SSIM_WEIGHTS[:3], kernel_size=7)
    with pytest.raises(ValueError, match=r">= 176 voxels"):
        ms_ssim_3d(torch.zeros(1, 1, 64, 64, 64), torch.zeros(1, 1, 64, 64, 64), data_range=2.0)
    with pytest.raises(ValueError, match="smaller than the 11-voxel SSIM window"):
        ssim_3d(torch.zeros(1, 1, 8, 20, 20), torch.zeros(1, 1, 8, 20, 20), data_range=2.0)
    with pytest.raises(ValueError, match="same shape"):
        ssim_3d(torch.zeros(1, 1, 12, 12, 12), torch.zeros(1, 1, 12, 12, 13), data_range=2.0)
