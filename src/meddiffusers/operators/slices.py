"""Thick slices: averaging runs of consecutive axial slices, the degradation of the super-resolution task."""

from __future__ import annotations

import torch

from ..utils.validation import check_volume_tensor


def _slice_groups(depth: int, slice_factor: int, device) -> torch.Tensor:
    if not isinstance(slice_factor, int) or slice_factor < 1:
        raise ValueError(f"`slice_factor` must be a positive int, got {slice_factor!r}.")
    return torch.arange(depth, device=device) // slice_factor


def slice_average_pool(volume: torch.Tensor, slice_factor: int = 5) -> torch.Tensor:
    """Average every run of `slice_factor` consecutive `D` slices of a `(B, C, D, H, W)` volume.

    Returns `(B, C, ceil(D / slice_factor), H, W)` thick slices; where `D` is not a multiple, the last thick slice
    averages the slices left over.
    """
    check_volume_tensor(volume, "volume")
    groups = _slice_groups(volume.shape[2], slice_factor, volume.device)
    count = int(groups[-1]) + 1
    sums = volume.new_zeros((*volume.shape[:2], count, *volume.shape[3:])).index_add_(2, groups, volume)
    sizes = torch.bincount(groups, minlength=count).to(volume.dtype)
    return sums / sizes.view(1, 1, -1, 1, 1)


def thick_slice_condition(volume: torch.Tensor, slice_factor: int = 5) -> torch.Tensor:
    """The super-resolution condition: [`slice_average_pool`] repeated back to the volume's `D` slices.

    A thick-slice acquisition (e.g. 5 mm slices of a 1 mm volume for `slice_factor=5`) on the thin-slice grid, so
    condition and volume have the same shape and can be cropped by the same window.
    """
    thick = slice_average_pool(volume, slice_factor)
    return thick.index_select(2, _slice_groups(volume.shape[2], slice_factor, volume.device))
