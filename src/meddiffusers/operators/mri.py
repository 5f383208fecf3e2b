"""Accelerated MRI: Cartesian k-space undersampling masks and the masked Fourier operator, slice by slice."""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import LinearOperator, as_rho, real_dtype


def cartesian_mask(
    num_lines: int, acceleration: float, center_fraction: float = 0.08, pattern: str = "random", seed: int = 0
) -> torch.Tensor:
    """A 1D phase-encoding mask: a fully sampled centre plus random lines, `num_lines / acceleration` lines in all.

    Args:
        num_lines: Phase-encoding lines (the W axis of the slices).
        acceleration: Undersampling factor R (e.g. 4 keeps a quarter of the lines).
        center_fraction: Fraction of lines around k-space centre that are always sampled.
        pattern: `"random"` (uniform) or `"gaussian"` (density falling off from the centre).
        seed: Random seed.

    Returns:
        A boolean mask of `num_lines` entries.
    """
    if acceleration < 1 or not 0 <= center_fraction < 1:
        raise ValueError("`acceleration` must be >= 1 and `center_fraction` in [0, 1).")
    if pattern not in ("random", "gaussian"):
        raise ValueError(f"`pattern` must be 'random' or 'gaussian', got {pattern!r}.")
    rng = np.random.default_rng(seed)
    total = max(1, round(num_lines / acceleration))
    center = min(total, round(num_lines * center_fraction))
    mask = np.zeros(num_lines, dtype=bool)
    start = (num_lines - center) // 2
    mask[start : start + center] = True
    remaining = np.flatnonzero(~mask)
    if pattern == "random":
        weights = np.ones(len(remaining))
    else:
        weights = np.exp(-0.5 * ((remaining - num_lines / 2) / (num_lines / 6)) ** 2)
    chosen = rng.choice(remaining, size=total - center, replace=False, p=weights / weights.sum())
    mask[chosen] = True
    return torch.from_numpy(mask)


def poisson_disc_mask(
    shape: tuple[int, int], acceleration: float, center_fraction: float = 0.08, seed: int = 0
) -> torch.Tensor:
    """A 2D Poisson-disc mask (samples no closer than a radius, tuned by bisection to reach `acceleration`), with a
    fully sampled central square covering `center_fraction` of each axis."""
    if acceleration < 1:
        raise ValueError("`acceleration` must be >= 1.")
    height, width = shape
    target = height * width / acceleration

    ch, cw = max(1, round(height * center_fraction)), max(1, round(width * center_fraction))
    center = np.zeros(shape, dtype=bool)
    center[(height - ch) // 2 : (height - ch) // 2 + ch, (width - cw) // 2 : (width - cw) // 2 + cw] = True

    def draw(radius: float) -> np.ndarray:
        rng = np.random.default_rng(seed)
        mask, occupied = center.copy(), np.zeros(shape, dtype=bool)
        r = int(math.ceil(radius))
        for index in rng.permutation(height * width):
            y, x = divmod(int(index), width)
            if occupied[y, x]:
                continue
            mask[y, x] = True
            y0, y1, x0, x1 = max(0, y - r), min(height, y + r + 1), max(0, x - r), min(width, x + r + 1)
            yy, xx = np.ogrid[y0:y1, x0:x1]
            occupied[y0:y1, x0:x1] |= (yy - y) ** 2 + (xx - x) ** 2 < radius**2
        return mask

    # The largest radius whose pattern still has at least the target number of samples...
    low, high = 0.5, max(height, width) / 2.0
    best = draw(low)
    for _ in range(16):
        middle = (low + high) / 2
        mask = draw(middle)
        if mask.sum() >= target:
            low, best = middle, mask
        else:
            high = middle
    # ...thinned at random (outside the centre) to exactly the target count.
    extra = int(best.sum() - round(target))
    if extra > 0:
        removable = np.flatnonzero(best & ~center)
        drop = np.random.default_rng(seed + 1).choice(removable, size=min(extra, len(removable)), replace=False)
        best.flat[drop] = False
    return torch.from_numpy(best)


class UndersampledMRI(LinearOperator):
    """`y = M · F x` per axial slice: the centred orthonormal 2D FFT over `(H, W)` followed by a k-space mask.

    A [`LinearOperator`] on complex volumes (real inputs are cast): `F` is unitary and the mask real, so the proximal
    step has the closed form `Fᴴ[(M y + rho F z) / (M² + rho)]` in k-space, and the adjoint (zero-filled inverse
    FFT) is also [`pinv`]. For real images, take the real part of the (complex) proximal step.

    Args:
        mask: Mask broadcastable to `(H, W)`: a 1D line mask over W (`cartesian_mask`), or a 2D mask; booleans are
            read as 0/1.
    """

    has_closed_form_prox = True

    def __init__(self, mask: torch.Tensor):
        mask = torch.as_tensor(mask)
        self.mask = mask[None, :] if mask.ndim == 1 else mask

    def acceleration(self, shape: tuple[int, int]) -> float:
        """Achieved undersampling factor on a `(H, W)` k-space."""
        full = self.mask.bool().expand(shape)
        return full.numel() / full.sum().item()

    def _mask_like(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.mask.to(device=tensor.device, dtype=real_dtype(tensor))

    @staticmethod
    def _fft(volume: torch.Tensor) -> torch.Tensor:
        if not volume.is_complex():
            volume = volume.to(torch.complex128 if volume.dtype == torch.float64 else torch.complex64)
        return torch.fft.fftshift(torch.fft.fft2(volume, norm="ortho"), dim=(-2, -1))

    @staticmethod
    def _ifft(kspace: torch.Tensor) -> torch.Tensor:
        return torch.fft.ifft2(torch.fft.ifftshift(kspace, dim=(-2, -1)), norm="ortho")

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """Masked, centred k-space (complex) of `(B, C, D, H, W)` volumes."""
        kspace = self._fft(volume)
        return kspace * self._mask_like(kspace)

    def adjoint(self, kspace: torch.Tensor) -> torch.Tensor:
        """`Fᴴ Mᵀ y`: the exact adjoint (complex images)."""
        return self._ifft(kspace * self._mask_like(kspace))

    def pinv(self, kspace: torch.Tensor) -> torch.Tensor:
        """The zero-filled inverse FFT (complex; equal to the adjoint, a pseudo-inverse for a binary mask)."""
        return self.adjoint(kspace)

    def zero_filled(self, kspace: torch.Tensor) -> torch.Tensor:
        """Zero-filled reconstruction: the magnitude of the adjoint."""
        return self.adjoint(kspace).abs()

    def prox_l2(self, z: torch.Tensor, y: torch.Tensor, rho: float | torch.Tensor) -> torch.Tensor:
        """`Fᴴ[(M y + rho F z) / (M² + rho)]` (complex)."""
        rho = as_rho(rho, z)
        spectrum = self._fft(z)
        mask = self._mask_like(spectrum)
        return self._ifft((mask * y + rho * spectrum) / (mask * mask + rho))


def undersampled_mri_condition(volume: torch.Tensor, acceleration: float = 4.0, seed: int = 0) -> torch.Tensor:
    """The fast-MRI condition: zero-filled reconstruction of a Cartesian `acceleration`x undersampling, rescaled to
    the input's range."""
    operator = UndersampledMRI(cartesian_mask(volume.shape[-1], acceleration, seed=seed))
    low = volume.amin(dim=(-3, -2, -1), keepdim=True)
    recon = operator.zero_filled(operator(volume - low)) + low
    return recon.to(volume.dtype)
