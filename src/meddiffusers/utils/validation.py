"""Checks that give bad input a clear error before any heavy work starts."""

from __future__ import annotations

import torch


def check_volume_tensor(tensor, name: str, channels: int | None = None, allow_integer: bool = False) -> None:
    """Raise `ValueError` unless `tensor` is a finite, non-empty `(B, C, D, H, W)` tensor.

    Args:
        tensor: The value to check.
        name: Argument name used in the message.
        channels: Required number of channels, if any.
        allow_integer: Accept integer dtypes (code indices).
    """
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor of shape (B, C, D, H, W), got {type(tensor).__name__}.")
    if tensor.ndim != 5:
        raise ValueError(
            f"`{name}` must have 5 dimensions (B, C, D, H, W), got shape {tuple(tensor.shape)}. "
            "Add batch and channel axes with `volume[None, None]` for a single 3D volume."
        )
    if tensor.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(tensor.shape)}).")
    if channels is not None and tensor.shape[1] != channels:
        raise ValueError(f"`{name}` must have {channels} channel(s) on axis 1, got shape {tuple(tensor.shape)}.")
    if tensor.is_floating_point() or tensor.is_complex():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"`{name}` contains NaN or infinite values; clean or mask them before calling the model.")
    elif not allow_integer:
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {tensor.dtype}.")


def as_triple(value, name: str) -> tuple[int, int, int]:
    """Return `value` as a `(D, H, W)` triple of positive ints (an int is repeated on the three axes)."""
    triple = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(triple) != 3 or not all(isinstance(v, int) and v > 0 for v in triple):
        raise ValueError(f"`{name}` must be a positive int or three positive ints (D, H, W), got {value!r}.")
    return triple
