"""Cutting volumes into non-overlapping patches and putting them back together.

Overlapping, blended windows are [`~meddiffusers.utils.sliding_window_inference`]; padding lives in `utils.volume`.
"""

from __future__ import annotations

import torch

from .volume import pad_to_multiple

__all__ = ["merge_patches", "pad_to_multiple", "split_into_patches"]


def split_into_patches(volume: torch.Tensor, patch_size: tuple[int, int, int]) -> tuple[torch.Tensor, tuple]:
    """Cut `(B, C, D, H, W)` into non-overlapping patches stacked on the batch axis.

    Patches are ordered batch-major, then row-major over the `(D, H, W)` patch grid (W fastest). The sides must be
    multiples of `patch_size`. Returns the `(B * n, C, pd, ph, pw)` patches and the grid `(nD, nH, nW)`.
    """
    batch, channels, depth, height, width = volume.shape
    pd, ph, pw = patch_size
    grid = (depth // pd, height // ph, width // pw)
    patches = volume.reshape(batch, channels, grid[0], pd, grid[1], ph, grid[2], pw)
    patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(-1, channels, pd, ph, pw)
    return patches, grid


def merge_patches(patches: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of [`split_into_patches`]: place `(B * n, C, pd, ph, pw)` patches back on their grid."""
    _, channels, pd, ph, pw = patches.shape
    nd, nh, nw = grid
    volume = patches.reshape(-1, nd, nh, nw, channels, pd, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return volume.reshape(-1, channels, nd * pd, nh * ph, nw * pw)
