"""The intensity convention of an evaluation: how file intensities become the `[-1, 1]` model space.

Metrics are only comparable at the same convention, so it is an explicit argument and is written into every
result. Three conventions:

- `model`: the files already hold model-space values in `[-1, 1]` (e.g. `meddiffusers generate` output of a
  MedDiffusion model); values are used as they are;
- `hu:MIN:MAX` (or a named window `ct-wide`, `ct-soft-tissue`, `ct-lung`, `ct-bone`, `ct-brain`): Hounsfield units
  clipped to the window and mapped linearly to `[-1, 1]` (PSNR / SSIM with `data_range=2` then equal those computed
  in HU with `data_range = MAX - MIN`);
- `percentile[:LOW:HIGH]`: per-volume clipping to the LOW-th / HIGH-th percentiles (default 0.5 / 99.5, 3D
  MedDiffusion's preprocessing) mapped to `[-1, 1]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..io import CT_WINDOWS, HUWindow, PercentileScaling


@dataclass(frozen=True)
class IntensityConvention:
    """One of the conventions above.

    Args:
        kind: `"model"`, `"hu"` or `"percentile"`.
        low, high: HU window bounds (`"hu"`) or percentiles (`"percentile"`); unused for `"model"`.
    """

    kind: str = "model"
    low: float | None = None
    high: float | None = None

    def __post_init__(self):
        if self.kind not in ("model", "hu", "percentile"):
            raise ValueError(f"Intensity convention must be 'model', 'hu' or 'percentile', got {self.kind!r}.")
        if self.kind == "hu":
            HUWindow(self.low, self.high)  # validates
        if self.kind == "percentile":
            PercentileScaling(self.low, self.high)

    @classmethod
    def parse(cls, text: str) -> IntensityConvention:
        """`"model"`, `"hu:-1000:1000"`, `"ct-wide"` (any name of `CT_WINDOWS`), `"percentile"` or
        `"percentile:0.5:99.5"`."""
        name, _, rest = text.partition(":")
        try:
            if name == "model" and not rest:
                return cls("model")
            if name == "hu":
                low, high = (float(v) for v in rest.split(":"))
                return cls("hu", low, high)
            if name.startswith("ct-") and not rest:
                window = name[3:].replace("-", "_")
                if window not in CT_WINDOWS:
                    raise ValueError(f"unknown CT window {name!r} (known: ct-{', ct-'.join(sorted(CT_WINDOWS))})")
                return cls("hu", *CT_WINDOWS[window])
            if name == "percentile":
                low, high = (float(v) for v in rest.split(":")) if rest else (0.5, 99.5)
                return cls("percentile", low, high)
        except ValueError as error:
            raise ValueError(f"--intensity {text!r}: {error}.") from None
        raise ValueError(
            f"--intensity {text!r} is not a convention; use model, hu:MIN:MAX, ct-<window> (e.g. ct-wide) or "
            "percentile[:LOW:HIGH]."
        )

    def to_model_space(self, volume: torch.Tensor) -> torch.Tensor:
        """File intensities of a `(B, C, D, H, W)` tensor → `[-1, 1]` (float32)."""
        volume = volume.float()
        if self.kind == "hu":
            return HUWindow(self.low, self.high)(volume)
        if self.kind == "percentile":
            return PercentileScaling(self.low, self.high)(volume)
        return volume

    def describe(self) -> str:
        """The convention in words, as written into results."""
        if self.kind == "hu":
            return f"HU window [{self.low:g}, {self.high:g}] clipped and mapped linearly to [-1, 1]"
        if self.kind == "percentile":
            return f"per-volume percentiles {self.low:g} / {self.high:g} clipped and mapped linearly to [-1, 1]"
        return "model space: values used as stored (expected in [-1, 1])"

    def to_dict(self) -> dict:
        """JSON-ready record of the convention."""
        return {"kind": self.kind, "low": self.low, "high": self.high, "description": self.describe()}
