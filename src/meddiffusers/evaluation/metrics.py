"""Distribution metrics on `(N, F)` feature sets (Fréchet distance, KID, MMD) and voxel metrics (PSNR, Dice).

Every feature metric works in float64 whatever the input dtype, so that the differences of large, nearly equal terms
stay accurate. The structural similarity metrics are in [`ssim`](ssim.py).
"""

from __future__ import annotations

import torch


def _check_features(features, name: str, minimum: int = 2) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"`{name}` must be an (N, F) tensor of features, got {shape}.")
    if features.shape[0] < minimum:
        raise ValueError(f"`{name}` has {features.shape[0]} sample(s); this metric needs at least {minimum}.")
    if not torch.isfinite(features).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return features.detach().to(torch.float64)


def _check_pair(a, b, minimum: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _check_features(a, "a", minimum), _check_features(b, "b", minimum)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"`a` and `b` must have the same feature size, got {a.shape[1]} and {b.shape[1]}.")
    return a, b.to(a.device)


def _symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues clamped to 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

    `d² = ||μ_a - μ_b||² + tr(Σ_a) + tr(Σ_b) - 2 tr((Σ_a Σ_b)^½)`, with the means `μ` and the unbiased covariances
    `Σ` (divisor `N - 1`) of the rows. The trace of the matrix square root is computed stably, without a general
    (non-symmetric) `sqrtm`: `Σ_a Σ_b` has the same eigenvalues as the symmetric positive semi-definite matrix
    `Σ_a^½ Σ_b Σ_a^½`, so `tr((Σ_a Σ_b)^½) = Σ_i sqrt(λ_i(Σ_a^½ Σ_b Σ_a^½))` with both square roots taken by symmetric
    eigen-decomposition in float64 (tiny negative eigenvalues from round-off are clamped to 0). This stays finite
    when there are fewer samples than features (singular covariances), where scipy's `sqrtm` may return complex
    values.

    Args:
        a: `(N_a, F)` features, `N_a >= 2`.
        b: `(N_b, F)` features, `N_b >= 2`.

    Returns:
        The squared distance `d²` (what FID reports), as a Python float.
    """
    a, b = _check_pair(a, b)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T, correction=1), torch.cov(b.T, correction=1)
    if cov_a.ndim == 0:  # one feature: torch.cov returns a scalar
        cov_a, cov_b = cov_a.reshape(1, 1), cov_b.reshape(1, 1)
    root_a = _symmetric_sqrt(cov_a)
    product = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    value = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    return float(value.clamp(min=0))


def _unbiased_mmd2(k_aa: torch.Tensor, k_bb: torch.Tensor, k_ab: torch.Tensor) -> torch.Tensor:
    """`E k(a, a') + E k(b, b') - 2 E k(a, b)` with the diagonals (a sample with itself) left out of the first two."""
    n, m = k_aa.shape[0], k_bb.shape[0]
    term_aa = (k_aa.sum() - k_aa.diagonal().sum()) / (n * (n - 1))
    term_bb = (k_bb.sum() - k_bb.diagonal().sum()) / (m * (m - 1))
    return term_aa + term_bb - 2 * k_ab.mean()


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int, gamma: float, coef0: float) -> torch.Tensor:
    return (gamma * x @ y.T + coef0) ** degree


def kernel_inception_distance(
    a: torch.Tensor,
    b: torch.Tensor,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: the unbiased MMD² with a polynomial kernel, averaged over random subsets.

    `k(x, y) = (γ x·y + c)^p` (default `γ = 1/F`, `c = 1`, `p = 3`, as in Bińkowski et al. 2018). For each of
    `num_subsets` subsets of `s = min(subset_size, N_a, N_b)` rows drawn without replacement from each set,
    `MMD²_u = 1/(s(s-1)) Σ_{i≠j} k(a_i, a_j) + 1/(s(s-1)) Σ_{i≠j} k(b_i, b_j) - 2/s² Σ_{i,j} k(a_i, b_j)`.
    The unbiased estimate can be slightly negative when the two sets come from the same distribution.

    Args:
        a: `(N_a, F)` features.
        b: `(N_b, F)` features.
        num_subsets: Number of random subsets.
        subset_size: Rows per subset (capped by the smaller set; at least 2 are needed).
        degree, gamma, coef0: Kernel parameters `p`, `γ` (default `1 / F`) and `c`.
        seed: Seed of the subset draws (the result is reproducible).

    Returns:
        `(mean, std)` of `MMD²_u` over the subsets (std with divisor `num_subsets`; 0 for one subset).
    """
    a, b = _check_pair(a, b)
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(f"`num_subsets` must be >= 1 and `subset_size` >= 2, got {num_subsets} and {subset_size}.")
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    size = min(subset_size, a.shape[0], b.shape[0])
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_subsets):
        x = a[torch.randperm(a.shape[0], generator=generator)[:size].to(a.device)]
        y = b[torch.randperm(b.shape[0], generator=generator)[:size].to(b.device)]
        values.append(
            _unbiased_mmd2(
                _polynomial_kernel(x, x, degree, gamma, coef0),
                _polynomial_kernel(y, y, degree, gamma, coef0),
                _polynomial_kernel(x, y, degree, gamma, coef0),
            )
        )
    values = torch.stack(values)
    return float(values.mean()), float(values.std(correction=0))


def median_bandwidth(a: torch.Tensor, b: torch.Tensor) -> float:
    """The median heuristic: the median Euclidean distance between distinct rows of `a` and `b` pooled together
    (1.0 when all rows coincide, so that the kernel stays defined)."""
    a, b = _check_pair(a, b, minimum=1)
    pooled = torch.cat([a, b])
    distances = torch.cdist(pooled, pooled)
    upper = torch.triu_indices(len(pooled), len(pooled), offset=1, device=pooled.device)
    median = float(distances[upper[0], upper[1]].median())
    return median if median > 0 else 1.0


def maximum_mean_discrepancy(
    a: torch.Tensor,
    b: torch.Tensor,
    kernel: str = "gaussian",
    bandwidth: float | None = None,
    unbiased: bool = True,
) -> float:
    """Squared maximum mean discrepancy between two feature sets.

    `MMD² = E k(a, a') + E k(b, b') - 2 E k(a, b)`, with
    - `kernel="gaussian"`: `k(x, y) = exp(-||x - y||² / (2 σ²))`, `σ` = `bandwidth` or, by default, the median
      heuristic ([`median_bandwidth`]: the median distance between distinct rows of the pooled set);
    - `kernel="linear"`: `k(x, y) = x·y`; the biased estimate is then exactly `||mean(a) - mean(b)||²`.

    The unbiased estimate (default) leaves the `i = j` terms out of the first two expectations
    (`1/(n(n-1)) Σ_{i≠j}`) and needs at least 2 rows per set; the biased one (`unbiased=False`, a V-statistic, always
    >= 0) averages over all pairs and works with one row per set.

    Args:
        a: `(N_a, F)` features.
        b: `(N_b, F)` features.
        kernel: `"gaussian"` or `"linear"`.
        bandwidth: Gaussian `σ` (ignored by the linear kernel).
        unbiased: Unbiased U-statistic (default) or biased V-statistic.

    Returns:
        `MMD²` as a Python float.
    """
    if kernel not in ("gaussian", "linear"):
        raise ValueError(f"`kernel` must be 'gaussian' or 'linear', got {kernel!r}.")
    a, b = _check_pair(a, b, minimum=2 if unbiased else 1)
    if kernel == "gaussian":
        sigma = median_bandwidth(a, b) if bandwidth is None else float(bandwidth)
        if not sigma > 0:
            raise ValueError(f"`bandwidth` must be positive, got {bandwidth}.")

        def k(x, y):
            return torch.exp(-torch.cdist(x, y).square() / (2 * sigma**2))

    else:

        def k(x, y):
            return x @ y.T

    k_aa, k_bb, k_ab = k(a, a), k(b, b), k(a, b)
    if unbiased:
        return float(_unbiased_mmd2(k_aa, k_bb, k_ab))
    return float(k_aa.mean() + k_bb.mean() - 2 * k_ab.mean())


def _check_volumes(x, y) -> None:
    for name, value in (("x", x), ("y", y)):
        if not isinstance(value, torch.Tensor) or value.ndim != 5 or value.numel() == 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"`{name}` must be a non-empty (B, C, D, H, W) tensor, got {shape}.")
    if x.shape != y.shape:
        raise ValueError(f"`x` and `y` must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}.")


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"`reduction` must be 'mean' or 'none', got {reduction!r}.")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio of each volume: `10 log10(R² / MSE)`, `MSE` over all voxels of the volume.

    Args:
        x: `(B, C, D, H, W)` volumes (e.g. restorations).
        y: `(B, C, D, H, W)` references, same shape.
        data_range: `R`, the width of the intensity range the volumes live in: 2 for the `[-1, 1]` model space,
            `max_hu - min_hu` for volumes in a HU window (e.g. 2000 for `[-1000, 1000]`).
        reduction: `"mean"` over the batch, or `"none"` for a `(B,)` tensor.

    Returns:
        PSNR in dB (float64; `inf` for identical volumes).
    """
    _check_volumes(x, y)
    if not data_range > 0:
        raise ValueError(f"`data_range` must be positive, got {data_range}.")
    error = (x.detach().double() - y.detach().double()).square().flatten(1).mean(1)
    return _reduce(10 * torch.log10(data_range**2 / error), reduction)


def dice(a: torch.Tensor, b: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Dice overlap of binary masks, one value per batch element: `2 |A ∩ B| / (|A| + |B|)` (1 when both are empty).

    Args:
        a: `(B, ...)` masks (any dtype; non-zero voxels are foreground), e.g. `(B, 1, D, H, W)`.
        b: Masks of the same shape.
        reduction: `"mean"` over the batch, or `"none"` for a `(B,)` tensor.
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape or a.ndim < 2:
        raise ValueError(
            "`a` and `b` must be (B, ...) mask tensors of the same shape, got "
            f"{getattr(a, 'shape', type(a).__name__)} and {getattr(b, 'shape', type(b).__name__)}."
        )
    a, b = a.detach().flatten(1) != 0, b.detach().flatten(1) != 0
    overlap = (a & b).sum(1).double()
    total = a.sum(1).double() + b.sum(1).double()
    values = torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.ones_like(total))
    return _reduce(values, reduction)


__all__ = [
    "dice",
    "frechet_distance",
    "kernel_inception_distance",
    "maximum_mean_discrepancy",
    "median_bandwidth",
    "psnr",
]
