"""Slice thickness: averaging `s` consecutive voxels along chosen axes, the degradation of z-super-resolution."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import LinearOperator, as_rho


class AveragePoolOperator(LinearOperator):
    """`P x`: the mean of each run of `factor` consecutive voxels along `axes` (a thick-slice acquisition for
    `axes=(0,)`, the slice axis D).

    With `d` pooled axes and `n = factor^d` voxels per block, `Pᴴ = U / n` (`U`: replicate each measurement over its
    block) and `P U = I`, so the proximal step has the closed form `z + U(y - P z) / (1 + rho n)`, and [`pinv`] is
    `U` (nearest-neighbour upsampling).

    Args:
        factor: Voxels averaged per measurement along each pooled axis (one int, or one per axis).
        axes: Pooled axes of the `(D, H, W)` volume: 0 = D, 1 = H, 2 = W. Their sizes must be multiples of the factor.
    """

    has_closed_form_prox = True

    def __init__(self, factor: int | Sequence[int], axes: Sequence[int] = (0,)):
        axes = tuple(axes)
        if not axes or any(not isinstance(axis, int) or not -3 <= axis <= 2 for axis in axes):
            raise ValueError(f"`axes` must be axes of (D, H, W) (0, 1 or 2), got {axes!r}.")
        if len({axis % 3 for axis in axes}) != len(axes):
            raise ValueError(f"`axes` must be distinct, got {axes!r}.")
        axes = tuple(axis % 3 for axis in axes)
        factors = (factor,) * len(axes) if isinstance(factor, int) else tuple(factor)
        if len(factors) != len(axes) or not all(isinstance(f, int) and f >= 1 for f in factors):
            raise ValueError(f"`factor` must be a positive int or one per axis {axes}, got {factor!r}.")
        self.axes = axes
        self.factors = factors
        self.block_size = 1
        for item in factors:
            self.block_size *= item

    def _dims(self, tensor: torch.Tensor) -> list[tuple[int, int]]:
        if tensor.ndim < 3:
            raise ValueError(f"Expected volumes (..., D, H, W), got shape {tuple(tensor.shape)}.")
        return [(tensor.ndim - 3 + axis, factor) for axis, factor in zip(self.axes, self.factors)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block means: each pooled axis shrinks by its factor."""
        for dim, factor in self._dims(x):
            size = x.shape[dim]
            if size % factor:
                raise ValueError(
                    f"Axis {dim} of the volume has {size} voxels, not a multiple of the pooling factor {factor}; "
                    "crop or pad the volume first."
                )
            x = x.unflatten(dim, (size // factor, factor)).mean(dim + 1)
        return x

    def upsample(self, y: torch.Tensor) -> torch.Tensor:
        """`U y`: each measurement replicated over its block (nearest-neighbour upsampling)."""
        for dim, factor in self._dims(y):
            y = y.repeat_interleave(factor, dim=dim)
        return y

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """`Pᴴ y = U y / factor^d`."""
        return self.upsample(y) / self.block_size

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """`U y`, the replication (`P U = I`)."""
        return self.upsample(y)

    def prox_l2(self, z: torch.Tensor, y: torch.Tensor, rho: float | torch.Tensor) -> torch.Tensor:
        """`z + U(y - P z) / (1 + rho factor^d)`."""
        rho = as_rho(rho, z)
        return z + self.upsample(y - self.forward(z)) / (1 + rho * self.block_size)
