"""Intensity transforms between scanner values and the models' `[-1, 1]` space, with their inverses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: Common CT windows as (minimum, maximum) Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "wide": (-1000.0, 1000.0),
    "soft_tissue": (-160.0, 240.0),
    "lung": (-1350.0, 150.0),
    "bone": (-500.0, 1300.0),
    "brain": (0.0, 80.0),
}


def _to_unit_range(volume: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    span = torch.where(high > low, high - low, torch.ones_like(high))
    return ((volume.clamp(min=low, max=high) - low) / span) * 2 - 1


@dataclass
class PercentileScaling:
    """Per-volume percentile scaling to `[-1, 1]` (3D MedDiffusion's preprocessing for CT and MRI alike).

    Intensities are clipped to the `lower`-th and `upper`-th percentiles of each volume, then mapped linearly so that
    they become -1 and 1. A constant volume maps to -1.

    Args:
        lower: Lower percentile (0-100).
        upper: Upper percentile (0-100).
    """

    lower: float = 0.5
    upper: float = 99.5

    def __post_init__(self):
        if not 0 <= self.lower < self.upper <= 100:
            raise ValueError(f"Percentiles must satisfy 0 <= lower < upper <= 100; got {self.lower}, {self.upper}.")

    def compute_range(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The `(low, high)` intensities of each volume in a `(B, C, D, H, W)` batch, shaped `(B, 1, 1, 1, 1)`."""
        _check_batch(volume)
        values = volume.detach().reshape(volume.shape[0], -1).cpu().double().numpy()
        bounds = np.percentile(values, [self.lower, self.upper], axis=1)
        low, high = (torch.as_tensor(b, dtype=volume.dtype, device=volume.device).view(-1, 1, 1, 1, 1) for b in bounds)
        return low, high

    def __call__(self, volume: torch.Tensor, return_range: bool = False):
        """Scale `(B, C, D, H, W)` volumes to `[-1, 1]`; `return_range=True` also returns `(low, high)`."""
        low, high = self.compute_range(volume)
        scaled = _to_unit_range(volume, low, high)
        return (scaled, (low, high)) if return_range else scaled

    @staticmethod
    def inverse(scaled: torch.Tensor, value_range: tuple) -> torch.Tensor:
        """Map `[-1, 1]` back to intensities with the `(low, high)` returned by `__call__(..., return_range=True)`."""
        low, high = value_range
        return (scaled + 1) / 2 * (high - low) + low


@dataclass
class HUWindow:
    """Fixed CT window: Hounsfield units in `[min_hu, max_hu]` map linearly to `[-1, 1]` (values outside are clipped).

    Args:
        min_hu: HU mapped to -1.
        max_hu: HU mapped to 1.
    """

    min_hu: float = -1000.0
    max_hu: float = 1000.0

    def __post_init__(self):
        if not self.max_hu > self.min_hu:
            raise ValueError(f"`max_hu` must exceed `min_hu`; got [{self.min_hu}, {self.max_hu}].")

    @classmethod
    def from_center_width(cls, center: float, width: float) -> HUWindow:
        """Window from the radiological level/width convention (e.g. soft tissue: center 40, width 400)."""
        return cls(center - width / 2, center + width / 2)

    @classmethod
    def preset(cls, name: str) -> HUWindow:
        """One of the named windows in `CT_WINDOWS` (`"wide"`, `"soft_tissue"`, `"lung"`, `"bone"`, `"brain"`)."""
        if name not in CT_WINDOWS:
            raise ValueError(f"Unknown CT window {name!r}; choose one of {sorted(CT_WINDOWS)}.")
        return cls(*CT_WINDOWS[name])

    def __call__(self, hounsfield: torch.Tensor) -> torch.Tensor:
        """Hounsfield units to `[-1, 1]`."""
        low = torch.tensor(self.min_hu, dtype=hounsfield.dtype, device=hounsfield.device)
        high = torch.tensor(self.max_hu, dtype=hounsfield.dtype, device=hounsfield.device)
        return _to_unit_range(hounsfield, low, high)

    def inverse(self, scaled: torch.Tensor) -> torch.Tensor:
        """`[-1, 1]` back to Hounsfield units (values clipped by the window stay at its bounds)."""
        return (scaled + 1) / 2 * (self.max_hu - self.min_hu) + self.min_hu


def _check_batch(volume: torch.Tensor) -> None:
    if not isinstance(volume, torch.Tensor) or volume.ndim != 5 or volume.numel() == 0:
        shape = tuple(volume.shape) if isinstance(volume, torch.Tensor) else type(volume).__name__
        raise ValueError(f"Expected a non-empty (B, C, D, H, W) tensor, got {shape}.")
    if volume.is_floating_point() and torch.isnan(volume).any():
        raise ValueError("The volume contains NaN values; replace them (e.g. torch.nan_to_num) before scaling.")
