"""Inpainting and missing slices: observing only the voxels of a mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import LinearOperator, as_rho, real_dtype


class MaskOperator(LinearOperator):
    """`A x = m ⊙ x`: keeps the voxels where the mask is 1 (inpainting, missing slices); `m` may also be fractional.

    The measurement has the volume's shape with zeros where nothing is observed. The proximal step is the closed form
    `(m ⊙ y + rho z) / (m² + rho)`: `y` where observed (for small `rho`), `z` elsewhere.

    Args:
        mask: A tensor broadcastable to the volumes (e.g. `(D, H, W)`, `(1, 1, D, H, W)` or `(B, C, D, H, W)`);
            booleans are read as 0/1.
    """

    has_closed_form_prox = True

    def __init__(self, mask: torch.Tensor):
        mask = torch.as_tensor(mask)
        if mask.is_complex():
            raise ValueError("`mask` must be real (0/1 or weights), got a complex tensor.")
        self.mask = mask.float() if not mask.is_floating_point() else mask

    @classmethod
    def keep_slices(cls, volume_size: Sequence[int], kept: Sequence[int], axis: int = 0) -> MaskOperator:
        """Observe only the slices `kept` along `axis` (0 = D, 1 = H, 2 = W) of `(D, H, W)` volumes."""
        volume_size = tuple(int(side) for side in volume_size)
        if len(volume_size) != 3 or axis not in (0, 1, 2, -1, -2, -3):
            raise ValueError(f"Expected a (D, H, W) `volume_size` and an axis in 0..2, got {volume_size}, {axis}.")
        kept = torch.as_tensor(list(kept), dtype=torch.long)
        length = volume_size[axis]
        if kept.numel() and (kept.min() < -length or kept.max() >= length):
            raise ValueError(f"Slice indices {kept.tolist()} fall outside an axis of {length} slices.")
        line = torch.zeros(length)
        line[kept] = 1.0
        shape = [1, 1, 1]
        shape[axis] = length
        return cls(line.view(shape).expand(volume_size)[None, None].contiguous())

    def _mask_like(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.mask.to(device=tensor.device, dtype=real_dtype(tensor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`m ⊙ x`."""
        return self._mask_like(x) * x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """`m ⊙ y` (the mask is real, so the operator is self-adjoint)."""
        return self._mask_like(y) * y

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """`y / m` where `m != 0`, 0 elsewhere (`m ⊙ y` for a binary mask)."""
        mask = self._mask_like(y)
        return torch.where(mask != 0, y / torch.where(mask != 0, mask, 1), 0)

    def prox_l2(self, z: torch.Tensor, y: torch.Tensor, rho: float | torch.Tensor) -> torch.Tensor:
        """`(m ⊙ y + rho z) / (m² + rho)`."""
        rho = as_rho(rho, z)
        mask = self._mask_like(z)
        return (mask * y + rho * z) / (mask * mask + rho)
