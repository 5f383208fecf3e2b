"""Sparse-view CT: a differentiable 2D ray transform (parallel or fan beam) applied slice by slice, its exact adjoint,
and filtered back-projection. Pure PyTorch, CPU or GPU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import LinearOperator


class RayTransform(LinearOperator):
    """Line integrals through each axial slice of `(B, C, D, H, W)` volumes, for `num_views` angles over a full circle.

    Rays are sampled at `samples_per_pixel` points per pixel and interpolated bilinearly (`grid_sample`); the adjoint
    is computed by automatic differentiation of that same discrete operator, so `<A x, y> = <x, Aᵀ y>` holds to
    floating-point precision. Lengths are in pixels. As a [`LinearOperator`], its proximal step runs `cg_iterations`
    conjugate-gradient steps (no closed form), and [`pinv`] is the filtered back-projection.

    Args:
        image_size: `(H, W)` of the slices.
        num_views: Projection angles, evenly spaced over `[0, 2π)`.
        geometry: `"parallel"` or `"fan"` (flat detector).
        num_detectors: Detector elements (default: the slice diagonal).
        source_distance: Fan beam: source to rotation centre, in pixels (default 2 x the diagonal).
        detector_distance: Fan beam: rotation centre to detector (default: the diagonal).
        samples_per_pixel: Sampling density along each ray.
        cg_iterations: Conjugate-gradient iterations of [`~LinearOperator.prox_l2`].
    """

    def __init__(
        self,
        image_size: tuple[int, int],
        num_views: int,
        geometry: str = "parallel",
        num_detectors: int | None = None,
        source_distance: float | None = None,
        detector_distance: float | None = None,
        samples_per_pixel: float = 2.0,
        cg_iterations: int = 10,
    ):
        if geometry not in ("parallel", "fan"):
            raise ValueError(f"`geometry` must be 'parallel' or 'fan', got {geometry!r}.")
        if num_views < 1:
            raise ValueError(f"`num_views` must be at least 1, got {num_views}.")
        if not isinstance(cg_iterations, int) or cg_iterations < 1:
            raise ValueError(f"`cg_iterations` must be a positive int, got {cg_iterations!r}.")
        self.image_size = tuple(image_size)
        self.num_views = num_views
        self.cg_iterations = cg_iterations
        self.geometry = geometry
        height, width = self.image_size
        diagonal = math.ceil(math.hypot(height, width))
        self.num_detectors = num_detectors or diagonal
        self.source_distance = source_distance or 2.0 * diagonal
        self.detector_distance = detector_distance or float(diagonal)
        self.num_samples = int(math.ceil(diagonal * samples_per_pixel))
        self.angles = torch.arange(num_views, dtype=torch.float64) * (2 * math.pi / num_views)
        self._grid, self._step = self._sampling_grid()

    def _sampling_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = self.image_size
        diagonal = math.hypot(height, width)
        detectors = torch.arange(self.num_detectors, dtype=torch.float64) - (self.num_detectors - 1) / 2
        cos, sin = self.angles.cos()[:, None, None], self.angles.sin()[:, None, None]
        t = torch.linspace(-0.5, 0.5, self.num_samples, dtype=torch.float64)[None, None, :]
        if self.geometry == "parallel":
            # ray at offset s, direction (-sin, cos): points s·(cos, sin) + t·L·(-sin, cos)
            s = detectors[None, :, None]
            x = s * cos - t * diagonal * sin
            y = s * sin + t * diagonal * cos
            step = torch.full((self.num_views, self.num_detectors), diagonal / (self.num_samples - 1))
        else:
            source = torch.stack([-self.source_distance * sin, self.source_distance * cos], dim=-1)  # (V,1,1,2)
            # flat detector through the far side, perpendicular to the central ray
            u = detectors[None, :, None]
            detector = torch.stack(
                [self.detector_distance * sin + u * cos, -self.detector_distance * cos + u * sin], dim=-1
            )
            ray = detector - source
            length = ray.norm(dim=-1)  # (V, N, 1)
            closest = -(source * ray).sum(dim=-1) / length**2  # ray parameter of the point nearest the centre
            # sample a segment of length `diagonal` centred there along each ray
            fraction = closest + t * diagonal / length
            points = source + fraction[..., None] * ray
            x, y = points[..., 0], points[..., 1]
            step = (diagonal / (self.num_samples - 1)) * torch.ones(self.num_views, self.num_detectors)
        # normalised grid_sample coordinates (align_corners=True: -1 and 1 are the centres of the edge pixels)
        grid_x = x / ((width - 1) / 2)
        grid_y = y / ((height - 1) / 2)
        grid = torch.stack([grid_x, grid_y], dim=-1).reshape(1, self.num_views * self.num_detectors, -1, 2)
        return grid.float(), step.float()

    def _slices(self, volume: torch.Tensor) -> torch.Tensor:
        if volume.ndim != 5 or tuple(volume.shape[3:]) != self.image_size:
            raise ValueError(
                f"Expected (B, C, D, {self.image_size[0]}, {self.image_size[1]}), got {tuple(volume.shape)}."
            )
        batch, channels, depth, height, width = volume.shape
        return volume.permute(0, 2, 1, 3, 4).reshape(batch * depth, channels, height, width)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """Sinograms `(B, C, D, num_views, num_detectors)` of `(B, C, D, H, W)` volumes."""
        batch, channels, depth = volume.shape[:3]
        slices = self._slices(volume)
        grid = self._grid.to(slices.device, slices.dtype).expand(slices.shape[0], -1, -1, -1)
        samples = F.grid_sample(slices, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        sums = samples.sum(dim=-1).reshape(batch, depth, channels, self.num_views, self.num_detectors)
        return sums.permute(0, 2, 1, 3, 4) * self._step.to(slices.device, slices.dtype)

    def adjoint(self, sinogram: torch.Tensor) -> torch.Tensor:
        """Back-projection: the exact adjoint of [`RayTransform.forward`], `(B, C, D, V, N)` → `(B, C, D, H, W)`."""
        batch, channels, depth = sinogram.shape[:3]
        with torch.enable_grad():
            probe = torch.zeros(
                batch,
                channels,
                depth,
                *self.image_size,
                device=sinogram.device,
                dtype=sinogram.dtype,
                requires_grad=True,
            )
            (gradient,) = torch.autograd.grad(self.forward(probe), probe, grad_outputs=sinogram)
        return gradient

    def fbp(self, sinogram: torch.Tensor) -> torch.Tensor:
        """Filtered back-projection (ramp filter): an approximate inverse of `forward`.

        Fan-beam sinograms are first rebinned to parallel-beam ones (each parallel ray is looked up on the fan ray
        that carries the same line), then reconstructed like those.
        """
        if self.geometry == "fan":
            parallel = RayTransform(self.image_size, self.num_views, "parallel", self.num_detectors)
            return parallel.fbp(self._rebin_to_parallel(sinogram))
        detectors = sinogram.shape[-1]
        padded = 2 ** math.ceil(math.log2(2 * detectors))
        frequencies = torch.fft.rfftfreq(padded, device=sinogram.device).to(sinogram.dtype)
        spectrum = torch.fft.rfft(sinogram, n=padded, dim=-1) * frequencies.abs()
        filtered = torch.fft.irfft(spectrum, n=padded, dim=-1)[..., :detectors]
        # Each line is measured twice over the full circle: integrate over [0, 2π) and halve, dθ = 2π / views.
        return self.adjoint(filtered) * (math.pi / self.num_views)

    def pinv(self, sinogram: torch.Tensor) -> torch.Tensor:
        """The filtered back-projection [`fbp`]."""
        return self.fbp(sinogram)

    def _rebin_to_parallel(self, sinogram: torch.Tensor) -> torch.Tensor:
        """Fan-beam `(B, C, D, V, N)` sinogram → parallel-beam sinogram on the same angles and detector spacing."""
        views, detectors = self.num_views, self.num_detectors
        theta = self.angles[:, None]
        offsets = (torch.arange(detectors, dtype=torch.float64) - (detectors - 1) / 2)[None, :]
        gamma = torch.asin((offsets / self.source_distance).clamp(-1, 1))  # line (θ, s) is seen from β = θ - γ
        beta = torch.remainder(theta - gamma, 2 * math.pi)
        u = (offsets + self.detector_distance * torch.sin(gamma)) / torch.cos(gamma)
        view_index = beta / (2 * math.pi / views)  # in [0, V); row V of the wrapped sinogram repeats view 0
        detector_index = u + (detectors - 1) / 2
        grid_x = detector_index / (detectors - 1) * 2 - 1
        grid_y = view_index / views * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(grid_x, grid_y), dim=-1).float()[None]
        batch, channels, depth = sinogram.shape[:3]
        flat = sinogram.reshape(batch * channels * depth, 1, views, detectors)
        wrapped = torch.cat([flat, flat[:, :, :1]], dim=2)  # views 0..V, V ≡ 0
        grid = grid.to(flat.device, flat.dtype).expand(flat.shape[0], -1, -1, -1)
        rebinned = F.grid_sample(wrapped, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return rebinned.reshape(batch, channels, depth, views, detectors)


def sparse_view_ct_condition(volume: torch.Tensor, num_views: int) -> torch.Tensor:
    """The sparse-view CT condition: parallel-beam FBP of a `num_views` sinogram of each axial slice."""
    transform = RayTransform(tuple(volume.shape[3:]), num_views, "parallel")
    return transform.fbp(transform(volume))
