"""Volume geometry: padding to a multiple or a size, cropping back, centre crop/pad, resampling to a spacing.

Every function acts on the last three axes `(D, H, W)`, so it takes `(D, H, W)`, `(C, D, H, W)` and `(B, C, D, H, W)`
tensors alike. Padding goes at the end of each axis unless the name says centre; the default pad value is -1, the
background of the models' `[-1, 1]` intensity space.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .validation import as_triple

RESAMPLE_MODES = ("nearest", "nearest-exact", "trilinear", "area")


def _check_spatial(volume, name: str = "volume") -> None:
    if not isinstance(volume, torch.Tensor) or volume.ndim < 3:
        shape = tuple(volume.shape) if isinstance(volume, torch.Tensor) else type(volume).__name__
        raise ValueError(f"`{name}` must be a tensor whose last three axes are (D, H, W), got {shape}.")


def _pad_end(volume: torch.Tensor, amounts: Sequence[int], value: float) -> torch.Tensor:
    """Pad the end of the last three axes by `amounts` `(D, H, W)` voxels with `value`."""
    if not any(amounts):
        return volume
    pads = []
    for amount in reversed(amounts):  # F.pad lists the last axis first
        pads += [0, amount]
    return F.pad(volume, pads, value=value)


def pad_to_multiple(volume: torch.Tensor, multiple: int | Sequence[int], value: float = -1.0) -> torch.Tensor:
    """Pad the end of each spatial axis with `value` up to the next multiple of `multiple`.

    Args:
        volume: Tensor whose last three axes are `(D, H, W)`.
        multiple: One multiple for all axes or one per axis `(D, H, W)`.
        value: Pad value (-1 is the background of the `[-1, 1]` model space).

    Returns:
        The padded tensor (the input itself when every side is already a multiple). Undo with [`crop_to_size`].
    """
    _check_spatial(volume)
    steps = as_triple(multiple, "multiple")
    return _pad_end(volume, [(-side) % step for side, step in zip(volume.shape[-3:], steps)], value)


def pad_to_size(volume: torch.Tensor, size: int | Sequence[int], value: float = -1.0) -> torch.Tensor:
    """Pad the end of each spatial axis with `value` up to at least `size`; longer axes are kept as they are.

    Args:
        volume: Tensor whose last three axes are `(D, H, W)`.
        size: Minimum `(D, H, W)` (an int for a cube).
        value: Pad value.
    """
    _check_spatial(volume)
    wanted = as_triple(size, "size")
    return _pad_end(volume, [max(want - side, 0) for side, want in zip(volume.shape[-3:], wanted)], value)


def crop_to_size(volume: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Keep the first `size` voxels of each spatial axis: the inverse of [`pad_to_multiple`] and [`pad_to_size`].

    Args:
        volume: Tensor whose last three axes are `(D, H, W)`.
        size: `(D, H, W)` to keep (an int for a cube); no side may exceed the volume's.

    Returns:
        A view of `volume`.
    """
    _check_spatial(volume)
    wanted = as_triple(size, "size")
    if any(want > side for side, want in zip(volume.shape[-3:], wanted)):
        raise ValueError(
            f"`size` {wanted} is larger than the volume's (D, H, W) {tuple(volume.shape[-3:])} on some axis; "
            "crop_to_size only removes voxels (pad first with pad_to_size)."
        )
    depth, height, width = wanted
    return volume[..., :depth, :height, :width]


def center_crop_or_pad(volume: torch.Tensor, size: int | Sequence[int], value: float = -1.0) -> torch.Tensor:
    """Centre-crop longer axes and centre-pad (with `value`) shorter ones so the spatial size becomes `size`.

    When the difference on an axis is odd, the extra voxel is removed from, or added at, the end of the axis, so
    padding to a size and centre-cropping back returns the original tensor.

    Args:
        volume: Tensor whose last three axes are `(D, H, W)`.
        size: Target `(D, H, W)` (an int for a cube).
        value: Pad value.
    """
    _check_spatial(volume)
    wanted = as_triple(size, "size")
    first_axis = volume.ndim - 3
    pads = [0, 0] * 3
    for axis, (have, want) in enumerate(zip(volume.shape[-3:], wanted)):
        if have > want:
            volume = volume.narrow(first_axis + axis, (have - want) // 2, want)
        elif have < want:
            before = (want - have) // 2
            pads[2 * (2 - axis) : 2 * (2 - axis) + 2] = [before, want - have - before]
    return F.pad(volume, pads, value=value) if any(pads) else volume


def size_for_spacing(
    spatial_size: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """The `(D, H, W)` size covering the same extent at `target_spacing`: `round(size * spacing / target_spacing)`,
    at least 1 voxel per axis."""
    spacing = _as_spacing(spacing, "spacing")
    target_spacing = _as_spacing(target_spacing, "target_spacing")
    return tuple(max(round(n * s / t), 1) for n, s, t in zip(spatial_size, spacing, target_spacing))


def resample_to_spacing(
    volume: torch.Tensor,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    mode: str = "trilinear",
) -> torch.Tensor:
    """Resample a volume from voxel `spacing` to `target_spacing` (both `(D, H, W)` in mm).

    The output size is [`size_for_spacing`]; the grid keeps the volume's extent (`align_corners=False`). Integer
    tensors (label maps) need a nearest mode and keep their dtype.

    Args:
        volume: `(D, H, W)`, `(C, D, H, W)` or `(B, C, D, H, W)` tensor.
        spacing: Current voxel spacing `(D, H, W)` (for a NIfTI file: `NiftiVolume.spacing`).
        target_spacing: Wanted voxel spacing `(D, H, W)`.
        mode: `"trilinear"` (intensities), `"nearest"` / `"nearest-exact"` (labels) or `"area"`.
    """
    _check_spatial(volume)
    if volume.ndim > 5:
        raise ValueError(f"`volume` must have 3 to 5 axes (..., D, H, W), got shape {tuple(volume.shape)}.")
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"`mode` must be one of {RESAMPLE_MODES}, got {mode!r}.")
    integer = not (volume.is_floating_point() or volume.is_complex())
    if integer and not mode.startswith("nearest"):
        raise ValueError(
            f"An integer volume (dtype {volume.dtype}) needs mode 'nearest' or 'nearest-exact', got {mode!r}."
        )
    size = size_for_spacing(volume.shape[-3:], spacing, target_spacing)
    if size == tuple(volume.shape[-3:]):
        return volume
    batched = volume[(None,) * (5 - volume.ndim)]
    resampled = F.interpolate(
        batched.float() if integer else batched,
        size=size,
        mode=mode,
        align_corners=False if mode == "trilinear" else None,
    )
    resampled = resampled.reshape(*volume.shape[:-3], *size)
    return resampled.to(volume.dtype) if integer else resampled


def _as_spacing(value, name: str) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3 or not all(0 < v < float("inf") for v in triple):
        raise ValueError(f"`{name}` must be three positive spacings (D, H, W) in mm, got {value!r}.")
    return triple
