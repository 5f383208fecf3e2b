"""The affine map between data space (HU, scanner intensities) and the model's `[-1, 1]`, used by restoration
pipelines to run a data step on physical values and come back."""

from __future__ import annotations

import torch

from ...io.intensity import HUWindow


class IntensityMap:
    """`model = (data - low) / (high - low) * 2 - 1` and back, **without clipping** (a data step needs the exact
    affine map; [`HUWindow`] clips to its window on the way in).

    Args:
        low: Data value mapped to -1: a number, or one per volume shaped `(B, 1, 1, 1, 1)` (e.g. the `(low, high)`
            of [`PercentileScaling`] with `return_range=True`).
        high: Data value mapped to 1.
    """

    def __init__(self, low: float | torch.Tensor, high: float | torch.Tensor):
        self.low, self.high = low, high
        if not bool(torch.all(torch.as_tensor(high) > torch.as_tensor(low))):
            raise ValueError(f"`high` must exceed `low` for every volume; got low={low!r}, high={high!r}.")

    @classmethod
    def from_hu_window(cls, window: HUWindow) -> IntensityMap:
        """The window's HU range `[min_hu, max_hu]` ↔ `[-1, 1]`."""
        return cls(window.min_hu, window.max_hu)

    def _bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.as_tensor(v, device=like.device, dtype=like.dtype) for v in (self.low, self.high))

    def to_model(self, data: torch.Tensor) -> torch.Tensor:
        """Data space → model space."""
        low, high = self._bounds(data)
        return (data - low) / (high - low) * 2 - 1

    def to_data(self, model: torch.Tensor) -> torch.Tensor:
        """Model space → data space."""
        low, high = self._bounds(model)
        return (model + 1) / 2 * (high - low) + low

    def __repr__(self) -> str:
        return f"IntensityMap(low={self.low!r}, high={self.high!r})"


def as_intensity_map(value) -> IntensityMap | None:
    """An intensity map from `None` (model space is data space), an [`HUWindow`], a `(low, high)` pair, or any object
    with `to_model` and `to_data` methods (returned as is)."""
    if value is None or (callable(getattr(value, "to_model", None)) and callable(getattr(value, "to_data", None))):
        return value
    if isinstance(value, HUWindow):
        return IntensityMap.from_hu_window(value)
    if isinstance(value, tuple | list) and len(value) == 2:
        return IntensityMap(*value)
    raise ValueError(
        f"`intensity_map` must be None, an HUWindow, a (low, high) pair or an object with `to_model` / `to_data`; "
        f"got {type(value).__name__}."
    )
