"""Feature and voxel metrics against closed forms and brute-force reference implementations written here."""

import itertools
import math
import statistics

import numpy as np
import pytest
import torch

from meddiffusers.evaluation import (
    dice,
    frechet_distance,
    kernel_inception_distance,
    maximum_mean_discrepancy,
    median_bandwidth,
    psnr,
)


def samples_with_moments(mean, cov, n, seed):
    """`n` rows whose sample mean and unbiased sample covariance are exactly `mean` and `cov`."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    # whiten: sample covariance of z becomes the identity
    values, vectors = np.linalg.eigh(np.cov(z, rowvar=False))
    z = z @ vectors @ np.diag(values**-0.5) @ vectors.T
    return torch.from_numpy(z @ np.linalg.cholesky(cov).T + mean)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mean_a, mean_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    a = samples_with_moments(mean_a, np.diag(var_a), 50, 0)
    b = samples_with_moments(mean_b, np.diag(var_b), 60, 1)
    closed_form = ((mean_a - mean_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert closed_form == pytest.approx(1 + 6.25 + 4 + 1)  # 12.25
    assert frechet_distance(a, b) == pytest.approx(closed_form, rel=1e-9)


def test_frechet_distance_matches_the_general_formula_with_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    m_a, m_b = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    cov_a, cov_b = m_a @ m_a.T + 0.1 * np.eye(5), m_b @ m_b.T + 0.1 * np.eye(5)
    mean_a, mean_b = rng.standard_normal(5), rng.standard_normal(5)
    a = samples_with_moments(mean_a, cov_a, 30, 4)
    b = samples_with_moments(mean_b, cov_b, 30, 5)
    root = scipy_linalg.sqrtm(cov_a @ cov_b).real
    expected = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_stays_finite_with_fewer_samples_than_features():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 64, generator=generator), torch.randn(5, 64, generator=generator) + 1
    value = frechet_distance(a, b)
    assert math.isfinite(value) and value > 64 * 0.5  # the mean shift alone contributes about 64


def brute_force_unbiased_mmd2(x, y, kernel):
    n, m = len(x), len(y)
    xx = sum(kernel(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(kernel(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_kid_matches_a_brute_force_polynomial_mmd_on_full_subsets():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.randn(7, 5, generator=generator, dtype=torch.float64), torch.randn(6, 5, generator=generator) + 0.3
    size = 6  # min(N_a, N_b): each subset of b is all of b, each subset of a 6 of its 7 rows

    def cubic(x, y):
        return (float(x @ y) / 5 + 1) ** 3

    subsets_of_a = [
        brute_force_unbiased_mmd2(a[list(rows)], b.double(), cubic) for rows in itertools.combinations(range(7), size)
    ]
    mean, std = kernel_inception_distance(a, b, num_subsets=200, subset_size=1000, seed=0)
    # every draw is one of the 7 subsets of a (with b whole): the mean lies in their range, close to their average
    assert min(subsets_of_a) - 1e-12 <= mean <= max(subsets_of_a) + 1e-12
    assert mean == pytest.approx(statistics.mean(subsets_of_a), abs=3 * statistics.pstdev(subsets_of_a))
    assert 0 < std <= (max(subsets_of_a) - min(subsets_of_a))


def test_kid_of_equal_sized_sets_equals_the_brute_force_value_with_zero_spread():
    generator = torch.Generator().manual_seed(5)
    a, b = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator) * 2

    def cubic(x, y):
        return (float(x.double() @ y.double()) / 4 + 1) ** 3

    mean, std = kernel_inception_distance(a, b, num_subsets=5)
    assert mean == pytest.approx(brute_force_unbiased_mmd2(a, b, cubic), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)
    assert kernel_inception_distance(a, b, num_subsets=5, seed=3) == kernel_inception_distance(
        a, b, num_subsets=5, seed=3
    )


def test_gaussian_mmd_matches_brute_force_with_the_median_bandwidth():
    generator = torch.Generator().manual_seed(7)
    a, b = torch.randn(6, 3, generator=generator), torch.randn(5, 3, generator=generator) + 1
    pooled = torch.cat([a, b]).double()
    distances = [float((pooled[i] - pooled[j]).norm()) for i in range(11) for j in range(i + 1, 11)]
    sigma = statistics.median(distances)
    assert median_bandwidth(a, b) == pytest.approx(sigma, rel=1e-12)

    def gaussian(x, y):
        return math.exp(-float((x.double() - y.double()).square().sum()) / (2 * sigma**2))

    expected = brute_force_unbiased_mmd2(a, b, gaussian)
    assert maximum_mean_discrepancy(a, b, kernel="gaussian") == pytest.approx(expected, rel=1e-10)
    biased = (
        sum(gaussian(x, y) for x in a for y in a) / 36
        + sum(gaussian(x, y) for x in b for y in b) / 25
        - 2 * sum(gaussian(x, y) for x in a for y in b) / 30
    )
    assert maximum_mean_discrepancy(a, b, unbiased=False) == pytest.approx(biased, rel=1e-10)


def test_linear_mmd_is_the_squared_distance_of_the_means_when_biased():
    generator = torch.Generator().manual_seed(8)
    a, b = torch.randn(9, 4, generator=generator), torch.randn(7, 4, generator=generator) + 2
    expected = float((a.double().mean(0) - b.double().mean(0)).square().sum())
    assert maximum_mean_discrepancy(a, b, kernel="linear", unbiased=False) == pytest.approx(expected, rel=1e-12)

    def dot(x, y):
        return float(x.double() @ y.double())

    unbiased = maximum_mean_discrepancy(a, b, kernel="linear")
    assert unbiased == pytest.approx(brute_force_unbiased_mmd2(a, b, dot), rel=1e-10)


def test_feature_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="same feature size"):
        frechet_distance(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        maximum_mean_discrepancy(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="'gaussian' or 'linear'"):
        maximum_mean_discrepancy(torch.zeros(3, 2), torch.zeros(3, 2), kernel="rbf")
    with pytest.raises(ValueError, match="NaN"):
        kernel_inception_distance(torch.full((3, 2), float("nan")), torch.zeros(3, 2))


def test_psnr_matches_scikit_image_in_model_and_hu_units():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    generator = torch.Generator().manual_seed(9)
    reference = torch.rand(2, 1, 12, 14, 10, generator=generator, dtype=torch.float64) * 2 - 1
    noisy = reference + 0.05 * torch.randn(reference.shape, generator=generator, dtype=torch.float64)
    values = psnr(noisy, reference, data_range=2.0, reduction="none")
    for index in range(2):
        expected = skimage_metrics.peak_signal_noise_ratio(
            reference[index, 0].numpy(), noisy[index, 0].numpy(), data_range=2.0
        )
        assert float(values[index]) == pytest.approx(expected, rel=1e-12)
    # the same volumes in HU of a [-1000, 1000] window, with the window's width as the data range
    hu = psnr(noisy * 1000, reference * 1000, data_range=2000.0, reduction="none")
    torch.testing.assert_close(hu, values)
    assert float(psnr(noisy, reference, data_range=2.0)) == pytest.approx(float(values.mean()))


def test_dice_of_known_masks():
    a = torch.zeros(2, 1, 4, 4, 4, dtype=torch.bool)
    b = torch.zeros_like(a)
    a[0, 0, :2] = True  # 32 voxels
    b[0, 0, 1:3] = True  # 32 voxels, 16 shared
    values = dice(a, b, reduction="none")
    assert values.tolist() == [0.5, 1.0]  # the second pair is empty in both: 1 by convention
    assert float(dice(a.float() * 3, b.int())) == 0.75
