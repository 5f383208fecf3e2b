"""Cutting volumes into patches or overlapping tiles and putting them back together."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(volume: torch.Tensor, multiple: tuple[int, int, int], value: float) -> torch.Tensor:
    """Pad the end of each spatial axis of `(B, C, D, H, W)` with `value` up to a multiple of `multiple`."""
    pads = []
    for size, step in zip(reversed(volume.shape[2:]), reversed(multiple)):
        pads += [0, (-size) % step]
    return F.pad(volume, pads, value=value) if any(pads) else volume


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


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering `[0, length)` with at least `overlap` shared voxels.

    The last tile ends exactly at `length`. A `tile` at least as long as the axis gives a single tile.
    """
    if tile >= length:
        return [0]
    stride = max(tile - overlap, 1)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_weights(start: int, size: int, length: int, ramp: int, device, dtype) -> torch.Tensor:
    """1-D weights of a tile at `start` (of `size` voxels on an axis of `length`): linear ramps of `ramp` voxels
    towards the inside of the volume, flat 1 at the volume's borders, so overlapping tiles fade into each other."""
    weights = torch.ones(size, device=device, dtype=dtype)
    if ramp <= 0:
        return weights
    position = torch.arange(size, device=device, dtype=dtype) + 0.5
    if start > 0:
        weights = torch.minimum(weights, position / ramp)
    if start + size < length:
        weights = torch.minimum(weights, (size - position) / ramp)
    return weights
