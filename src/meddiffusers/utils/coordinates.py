"""Global voxel coordinates of a window (or of a resized crop) inside a whole volume.

Patch models such as MedDiff-FM's see a window of a larger volume together with where the window lies in it. The
maps built here are what such a model is given: in training for each random crop, in sampling for each window, from
the same function, so both see the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .validation import as_triple


def _axis_coordinates(length: int, start: int, stop: int, samples: int, dtype: torch.dtype) -> torch.Tensor:
    """Coordinates in `[-1, 1]` of voxels `start .. stop - 1` of an axis of `length` voxels, at `samples` points."""
    if not 0 <= start < stop <= length:
        raise ValueError(f"Window [{start}, {stop}) does not lie inside an axis of {length} voxels.")
    # Voxel centres: the first voxel of the volume is at -1, the last at +1 (0 for a single voxel).
    scale = 2.0 / (length - 1) if length > 1 else 0.0
    first, last = start * scale - (length > 1), (stop - 1) * scale - (length > 1)
    return torch.linspace(first, last, samples, dtype=torch.float64).to(dtype)


def window_coordinates(
    volume_size: Sequence[int],
    window: Sequence[slice] | None = None,
    output_size: int | Sequence[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The `(3, d, h, w)` map of each voxel's global `(D, H, W)` coordinates in `[-1, 1]` inside a volume.

    The whole volume spans `[-1, 1]` on every axis (voxel centres, first voxel at -1, last at +1). A window spans
    its sub-interval. With `output_size`, the window is resized (the crop-and-resize of multi-level training): the
    coordinates are then sampled at the resized grid, exactly what trilinear interpolation with
    `align_corners=True` gives for these linear maps.

    Args:
        volume_size: `(D, H, W)` of the whole (region) volume.
        window: Three slices `(D, H, W)` of the window inside the volume; the whole volume when omitted.
        output_size: Size `(d, h, w)` (or one int) the window is resized to; its own size when omitted.
        device: Device of the map.
        dtype: Its dtype.

    Example:

    ```py
    >>> from meddiffusers.utils import window_coordinates
    >>> window_coordinates((5, 5, 5), (slice(0, 3), slice(0, 5), slice(2, 5)))[:, :, 0, 0]
    tensor([[-1.0000, -0.5000,  0.0000],
            [-1.0000, -1.0000, -1.0000],
            [ 0.0000,  0.0000,  0.0000]])
    ```
    """
    size = as_triple(tuple(int(side) for side in volume_size), "volume_size")
    window = tuple(window) if window is not None else tuple(slice(0, side) for side in size)
    if len(window) != 3 or not all(isinstance(part, slice) for part in window):
        raise ValueError(f"`window` must be three slices (D, H, W), got {window!r}.")
    bounds = [(part.start or 0, side if part.stop is None else part.stop) for part, side in zip(window, size)]
    samples = as_triple(output_size, "output_size") if output_size is not None else [b - a for a, b in bounds]
    axes = [_axis_coordinates(side, a, b, n, dtype) for side, (a, b), n in zip(size, bounds, samples)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return grid.to(device)
