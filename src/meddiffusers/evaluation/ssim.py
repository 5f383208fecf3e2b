"""Structural similarity of 3D volumes: SSIM and multi-scale SSIM with a separable Gaussian window.

Conventions (those of Wang et al. 2004 and of scikit-image's `structural_similarity(..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)`, which `ssim_3d` reproduces on 3D arrays):

- local means, variances and covariance are Gaussian-weighted averages over a `kernel_size`³ window
  (`sigma` = 1.5, `kernel_size` = 11 by default; weights normalised to sum to 1);
- only windows that lie entirely inside the volume are used ("valid" filtering), so every side must be at least
  `kernel_size`;
- `C1 = (K1 R)²`, `C2 = (K2 R)²` with `K1 = 0.01`, `K2 = 0.03` and `R` the `data_range`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .metrics import _check_volumes, _reduce

#: Scale weights of MS-SSIM (Wang, Simoncelli and Bovik 2003), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gaussian_window(kernel_size: int, sigma: float, dtype, device) -> torch.Tensor:
    offsets = torch.arange(kernel_size, dtype=dtype, device=device) - (kernel_size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def _filter(volume: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filtering of a `(N, 1, D, H, W)` tensor along D, H and W."""
    size = window.numel()
    for shape in ((size, 1, 1), (1, size, 1), (1, 1, size)):
        volume = F.conv3d(volume, window.view(1, 1, *shape))
    return volume


def _check(x, y, data_range: float, kernel_size: int, sigma: float) -> None:
    _check_volumes(x, y)
    if not data_range > 0:
        raise ValueError(f"`data_range` must be positive, got {data_range}.")
    if not (isinstance(kernel_size, int) and kernel_size >= 1 and kernel_size % 2 == 1):
        raise ValueError(f"`kernel_size` must be a positive odd int, got {kernel_size!r}.")
    if not sigma > 0:
        raise ValueError(f"`sigma` must be positive, got {sigma}.")


def _ssim_and_contrast(x, y, window, data_range, k1, k2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-volume mean SSIM and mean contrast-structure term over valid windows; `x`, `y` are `(N, 1, D, H, W)`."""
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = _filter(x, window), _filter(y, window)
    var_x = _filter(x * x, window) - mu_x**2
    var_y = _filter(y * y, window) - mu_y**2
    cov = _filter(x * y, window) - mu_x * mu_y
    contrast = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * contrast).flatten(1).mean(1), contrast.flatten(1).mean(1)


def _as_channels(volume: torch.Tensor) -> torch.Tensor:
    """`(B, C, D, H, W)` to `(B * C, 1, D, H, W)` float64: channels are compared separately, then averaged."""
    return volume.detach().double().reshape(-1, 1, *volume.shape[2:])


def ssim_3d(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float,
    kernel_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: str = "mean",
) -> torch.Tensor:
    """Structural similarity of 3D volumes, averaged over all valid windows (and channels) of each volume.

    `SSIM(x, y) = mean over windows of ((2 μ_x μ_y + C1)(2 σ_xy + C2)) / ((μ_x² + μ_y² + C1)(σ_x² + σ_y² + C2))`,
    with Gaussian-weighted local statistics (population variances) and `C1 = (k1 R)²`, `C2 = (k2 R)²`.

    Args:
        x: `(B, C, D, H, W)` volumes.
        y: `(B, C, D, H, W)` references, same shape.
        data_range: `R`, the width of the intensity range: 2 for the `[-1, 1]` model space, `max_hu - min_hu` for
            volumes in Hounsfield units inside a window.
        kernel_size: Side of the Gaussian window (odd); every spatial side must be at least this.
        sigma: Standard deviation of the window in voxels.
        k1, k2: Stabilising constants.
        reduction: `"mean"` over the batch, or `"none"` for a `(B,)` tensor.

    Returns:
        SSIM in `[-1, 1]` (float64; 1 for identical volumes).
    """
    _check(x, y, data_range, kernel_size, sigma)
    if min(x.shape[2:]) < kernel_size:
        raise ValueError(
            f"Volumes of spatial size {tuple(x.shape[2:])} are smaller than the {kernel_size}-voxel SSIM window on "
            "some axis; pass a smaller odd `kernel_size`."
        )
    window = _gaussian_window(kernel_size, sigma, torch.float64, x.device)
    ssim, _ = _ssim_and_contrast(_as_channels(x), _as_channels(y), window, data_range, k1, k2)
    values = ssim.view(x.shape[0], x.shape[1]).mean(1)
    return _reduce(values, reduction)


def ms_ssim_min_size(kernel_size: int = 11, num_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """The smallest spatial side MS-SSIM accepts: `kernel_size * 2^(num_scales - 1)` (the coarsest scale, after
    `num_scales - 1` halvings, must still hold one window). With the defaults (11, 5 scales) it is 176 voxels."""
    return kernel_size * 2 ** (num_scales - 1)


def ms_ssim_3d(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
    kernel_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multi-scale structural similarity of 3D volumes (Wang, Simoncelli and Bovik 2003, in 3D).

    `MS-SSIM = Π_{j=1}^{M-1} cs_j^{w_j} · ssim_M^{w_M}`: at each of the `M = len(weights)` scales (the full
    resolution first) the mean contrast-structure term `cs_j = mean((2 σ_xy + C2) / (σ_x² + σ_y² + C2))` is taken,
    and at the coarsest the full SSIM; between scales both volumes are halved by 2x2x2 average pooling. Negative
    terms are clamped to 0 before the (fractional) powers. The default weights are the 2D paper's five
    (`MS_SSIM_WEIGHTS`); they need every side >= 176 voxels ([`ms_ssim_min_size`]). For smaller volumes pass fewer
    weights and/or a smaller `kernel_size`, e.g. `weights=MS_SSIM_WEIGHTS[:3], kernel_size=7` for sides >= 28,
    and report the choice: MS-SSIM values are only comparable at equal settings.

    Args:
        x: `(B, C, D, H, W)` volumes.
        y: `(B, C, D, H, W)` volumes, same shape.
        data_range: Width of the intensity range (2 for `[-1, 1]`).
        weights: Exponent of each scale, finest first (not renormalised).
        kernel_size: Side of the Gaussian window (odd).
        sigma: Standard deviation of the window in voxels.
        k1, k2: Stabilising constants.
        reduction: `"mean"` over the batch, or `"none"` for a `(B,)` tensor.

    Returns:
        MS-SSIM (float64; 1 for identical volumes).
    """
    _check(x, y, data_range, kernel_size, sigma)
    weights = torch.as_tensor(list(weights), dtype=torch.float64, device=x.device)
    if weights.ndim != 1 or weights.numel() < 1 or (weights < 0).any():
        raise ValueError(f"`weights` must be a non-empty sequence of non-negative numbers, got {weights.tolist()}.")
    minimum = ms_ssim_min_size(kernel_size, weights.numel())
    if min(x.shape[2:]) < minimum:
        raise ValueError(
            f"MS-SSIM with {weights.numel()} scales and a {kernel_size}-voxel window needs every spatial side >= "
            f"{minimum} voxels, got {tuple(x.shape[2:])}. Pass fewer `weights` (scales) or a smaller odd "
            "`kernel_size` (e.g. weights=MS_SSIM_WEIGHTS[:3], kernel_size=7 for sides >= 28)."
        )
    window = _gaussian_window(kernel_size, sigma, torch.float64, x.device)
    a, b = _as_channels(x), _as_channels(y)
    terms = []
    for scale in range(weights.numel()):
        ssim, contrast = _ssim_and_contrast(a, b, window, data_range, k1, k2)
        terms.append(ssim if scale == weights.numel() - 1 else contrast)
        if scale < weights.numel() - 1:
            a, b = F.avg_pool3d(a, 2), F.avg_pool3d(b, 2)
    stacked = torch.stack(terms, dim=1).clamp(min=0)  # (B * C, M)
    values = (stacked**weights).prod(dim=1).view(x.shape[0], x.shape[1]).mean(1)
    return _reduce(values, reduction)


__all__ = ["MS_SSIM_WEIGHTS", "ms_ssim_3d", "ms_ssim_min_size", "ssim_3d"]
