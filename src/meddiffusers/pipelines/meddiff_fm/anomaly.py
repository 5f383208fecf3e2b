"""Post-processing of reconstruction-based anomaly maps: Gaussian smoothing, organ masking, image-level scores."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCORE_REDUCTIONS = ("max", "mean")


def gaussian_smooth_3d(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a `(B, C, D, H, W)` volume with standard deviation `sigma` voxels (edges
    replicated); `sigma <= 0` returns the volume unchanged."""
    if sigma <= 0:
        return volume
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=volume.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(volume.dtype)
    channels = volume.shape[1]
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = kernel.numel()
        weight = kernel.reshape(1, 1, *shape).repeat(channels, 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        volume = F.conv3d(F.pad(volume, pad, mode="replicate"), weight, groups=channels)
    return volume


def anomaly_scores(anomaly_map: torch.Tensor, mask: torch.Tensor | None, reduction: str | float) -> torch.Tensor:
    """One score per volume from its anomaly map, over the voxels of `mask` (all voxels without one).

    `reduction` is `"max"`, `"mean"` or a quantile in `(0, 1)` (e.g. 0.99, robust to single hot voxels).
    """
    scores = []
    for index, item in enumerate(anomaly_map):
        values = item.flatten() if mask is None else item[mask[index].expand_as(item).bool()]
        if values.numel() == 0:
            scores.append(torch.zeros((), dtype=anomaly_map.dtype, device=anomaly_map.device))
        elif reduction == "max":
            scores.append(values.max())
        elif reduction == "mean":
            scores.append(values.mean())
        else:
            scores.append(torch.quantile(values.float(), float(reduction)).to(anomaly_map.dtype))
    return torch.stack(scores)


def check_score_reduction(reduction) -> None:
    """A `ValueError` unless `reduction` is `"max"`, `"mean"` or a number in `(0, 1)`."""
    is_quantile = isinstance(reduction, float | int) and not isinstance(reduction, bool) and 0 < reduction < 1
    if reduction not in SCORE_REDUCTIONS and not is_quantile:
        raise ValueError(
            f"`score_reduction` must be one of {SCORE_REDUCTIONS} or a quantile in (0, 1), got {reduction!r}."
        )  # noqa: E501
