"""Multi-level training patches of MedDiff-FM: one patch-sized input per sample, from one of three scales.

Each sample is, with the configured probabilities (1/3 each by default):

- `"whole"`: the whole region volume resized to the patch size (the global layout, coarsely);
- `"double"`: a random crop of twice the patch size resized to the patch size (half resolution);
- `"native"`: a random crop of the patch size (full resolution, no resizing).

The image is resized trilinearly with `align_corners=True`, so the voxel-coordinate map of the crop
([`~utils.window_coordinates`] with `output_size`) is exactly the resized whole-volume map; the anatomy labels are
resampled at the same points by nearest neighbour, so they keep only labels present in the input. Sampling uses the
same coordinate function, so the model sees the same numbers in training and in sliding-window sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..utils.coordinates import window_coordinates
from ..utils.validation import as_triple

LEVELS = ("whole", "double", "native")
"""The three levels, in the order of the `probabilities` of [`sample_multilevel_patch`]."""

DEFAULT_LEVEL_PROBABILITIES = (1 / 3, 1 / 3, 1 / 3)


class MultiLevelPatch(NamedTuple):
    """One multi-level training input (see [`sample_multilevel_patch`]).

    Args:
        image: `(C, p, p, p)` patch (the patch size on each axis).
        position: `(3, p, p, p)` global `(D, H, W)` coordinates in `[-1, 1]` of each patch voxel in the whole volume.
        anatomy: `(1, p, p, p)` int64 labels (nearest neighbour), or `None` when no labels were given.
        level: The level drawn: `"whole"`, `"double"` or `"native"`.
        window: The three slices `(D, H, W)` of the volume the patch was taken from (before resizing).
    """

    image: torch.Tensor
    position: torch.Tensor
    anatomy: torch.Tensor | None
    level: str
    window: tuple[slice, slice, slice]


def check_level_probabilities(probabilities: Sequence[float]) -> tuple[float, float, float]:
    """Three non-negative probabilities (`whole`, `double`, `native`) that sum to 1 (within 1e-6), as floats."""
    values = tuple(float(p) for p in probabilities)
    if len(values) != 3 or any(p < 0 for p in values) or abs(sum(values) - 1) > 1e-6:
        raise ValueError(
            f"Level probabilities must be three non-negative numbers (whole, double, native) summing to 1, got "
            f"{list(probabilities)}."
        )
    return values


def level_crop_size(level: str, volume_size: Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, ...]:
    """Size of the crop a level takes from a volume of `volume_size`: the whole volume, twice the patch or the patch,
    clipped to the volume on every axis where the volume is smaller."""
    if level not in LEVELS:
        raise ValueError(f"`level` must be one of {LEVELS}, got {level!r}.")
    patch = as_triple(patch_size, "patch_size")
    if level == "whole":
        return tuple(int(side) for side in volume_size)
    factor = 2 if level == "double" else 1
    return tuple(min(factor * p, int(side)) for p, side in zip(patch, volume_size))


def resize_image(volume: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear resize of a `(C, D, H, W)` float volume with `align_corners=True` (the corner voxels stay in
    place), so that linear maps such as voxel coordinates are resampled exactly; unchanged at its own size."""
    size = tuple(int(side) for side in size)
    if tuple(volume.shape[1:]) == size:
        return volume
    return F.interpolate(volume[None], size=size, mode="trilinear", align_corners=True)[0]


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of `(C, D, H, W)` integer labels on the grid of [`resize_image`]
    (`align_corners=True`): output voxel `i` of an axis takes the input voxel nearest to `i * (n - 1) / (size - 1)`."""
    for axis, (have, want) in enumerate(zip(labels.shape[1:], size)):
        if have != want:
            index = torch.linspace(0, have - 1, int(want), dtype=torch.float64).round().long()
            labels = labels.index_select(axis + 1, index.to(labels.device))
    return labels


def _draw_level(probabilities: tuple[float, float, float], generator: torch.Generator | None) -> str:
    draw = float(torch.rand((), generator=generator))
    total = 0.0
    for level, probability in zip(LEVELS, probabilities):
        total += probability
        if draw < total:
            return level
    return next(level for level, p in zip(reversed(LEVELS), reversed(probabilities)) if p > 0)


def sample_multilevel_patch(
    volume: torch.Tensor,
    patch_size: int | Sequence[int],
    generator: torch.Generator | None = None,
    anatomy: torch.Tensor | None = None,
    probabilities: Sequence[float] = DEFAULT_LEVEL_PROBABILITIES,
    level: str | None = None,
) -> MultiLevelPatch:
    """Draw one multi-level training patch of a whole (region) volume in model space.

    The level is drawn with `probabilities` (`whole`, `double`, `native`), then a crop position uniformly among those
    that keep the crop inside the volume. Where the volume is smaller than the crop on an axis, the crop is clipped to
    the volume on that axis (it starts at 0) and then resized to the patch size like the other levels; a native crop
    therefore is only resized on axes shorter than the patch. The image is resized trilinearly with
    `align_corners=True`, the anatomy by nearest neighbour at the same points, and the coordinate map is
    `window_coordinates(volume_size, window, output_size=patch_size)`, the same function sampling uses.

    Args:
        volume: `(C, D, H, W)` float volume (model space, e.g. HU windowed to `[-1, 1]`).
        patch_size: Patch side (one int) or `(d, h, w)`.
        generator: The random stream; the same generator state gives the same patch.
        anatomy: Optional `(1, D, H, W)` integer labels on the volume's grid (0 background).
        probabilities: Probabilities of the levels `("whole", "double", "native")`.
        level: Force this level instead of drawing one (no draw is made for it).

    Returns:
        A [`MultiLevelPatch`] `(image, position, anatomy, level, window)`.
    """
    if volume.ndim != 4 or not volume.is_floating_point():
        raise ValueError(f"`volume` must be a float (C, D, H, W) tensor, got {volume.dtype} {tuple(volume.shape)}.")
    volume_size = tuple(volume.shape[1:])
    if anatomy is not None:
        if anatomy.ndim != 4 or anatomy.is_floating_point() or tuple(anatomy.shape[1:]) != volume_size:
            raise ValueError(
                f"`anatomy` must be integer labels (1, D, H, W) on the volume's grid {volume_size}, got "
                f"{anatomy.dtype} {tuple(anatomy.shape)}."
            )
    patch = as_triple(patch_size, "patch_size")
    probabilities = check_level_probabilities(probabilities)
    level = _draw_level(probabilities, generator) if level is None else level
    crop = level_crop_size(level, volume_size, patch)
    starts = [
        int(torch.randint(0, side - want + 1, (), generator=generator)) if side > want else 0
        for side, want in zip(volume_size, crop)
    ]
    window = tuple(slice(start, start + want) for start, want in zip(starts, crop))
    image = resize_image(volume[(slice(None), *window)], patch)
    labels = None if anatomy is None else resize_labels(anatomy[(slice(None), *window)].long(), patch)
    position = window_coordinates(volume_size, window, output_size=patch, device=volume.device, dtype=volume.dtype)
    return MultiLevelPatch(image.contiguous(), position, labels, level, window)
