"""The linear-operator interface every degradation implements: `A`, its exact adjoint `Aᴴ`, the proximal step of the
least-squares data term (closed form where one exists, conjugate gradients otherwise) and the operator norm.

Operators act on data-space tensors (HU, scanner intensities, or the model's `[-1, 1]` when no intensity map is
used), batch first: item `b` of the output depends on item `b` of the input only. They import nothing else of the
package, so any pipeline, training script or test can use them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def real_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The real dtype of a tensor (`float32` for `complex64`, the tensor's own dtype for real ones)."""
    return tensor.real.dtype if tensor.is_complex() else tensor.dtype


def batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`Re <a, b>` of each batch item: `sum(conj(a) * b)` over every axis but the first, shape `(B,)`."""
    product = a.conj() * b if a.is_complex() else a * b
    return product.real.flatten(1).sum(1) if product.is_complex() else product.flatten(1).sum(1)


def per_item(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A `(B,)` (or scalar) tensor reshaped to broadcast over the items of `like` (`(B, 1, ..., 1)`)."""
    return value.reshape(-1, *([1] * (like.ndim - 1))) if value.ndim == 1 else value


def as_rho(rho: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The proximal weight `rho` as a real tensor on `like`'s device that broadcasts over its batch.

    `rho` is a number, a 0-d tensor, or one value per batch item (`(B,)`); it must be positive.
    """
    rho = torch.as_tensor(rho, device=like.device, dtype=real_dtype(like))
    if rho.ndim > 1 or (rho.ndim == 1 and rho.shape[0] not in (1, like.shape[0])):
        raise ValueError(
            f"`rho` must be a number or one value per batch item ({like.shape[0]},), got shape {tuple(rho.shape)}."
        )
    if not bool((rho > 0).all()):
        raise ValueError(f"`rho` must be positive, got {rho.tolist()}.")
    return per_item(rho, like)


class LinearOperator:
    """A linear map `A` from volumes to measurements, with everything a restoration algorithm needs from it.

    Subclasses implement [`forward`] and an **exact** [`adjoint`] (`<A x, y> = <x, Aᴴ y>` to rounding error, tested
    in float64); they may override [`normal`] (`AᴴA x`) for speed, [`pinv`] (a cheap inverse for initial guesses and
    baselines), and [`prox_l2`] with a closed form (then they set `has_closed_form_prox = True`).

    `prox_l2(z, y, rho)` returns `argmin_x ||A x - y||² + rho ||x - z||²`. Without a closed form it runs
    `cg_iterations` conjugate-gradient steps on `(AᴴA + rho I) x = Aᴴ y + rho z`, warm-started at `z`
    ([`prox_l2_cg`]). [`gradient_step`] is the one-step first-order approximation `z - Aᴴ(A z - y) / rho`.

    Complex operators (MRI) treat volumes as complex vectors: `adjoint` returns complex volumes and so do their
    proximal steps given real `z`; take the real part for real-valued images.
    """

    #: Whether [`prox_l2`] is an exact closed form (else it runs conjugate gradients).
    has_closed_form_prox: bool = False
    #: Conjugate-gradient iterations of the generic [`prox_l2`].
    cg_iterations: int = 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`A x`: measurements of the volumes `x`."""
        raise NotImplementedError(f"{type(self).__name__} must implement `forward`.")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Same as [`forward`]."""
        return self.forward(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """`Aᴴ y`: the exact adjoint, measurements back to volumes."""
        raise NotImplementedError(f"{type(self).__name__} must implement `adjoint`.")

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """`AᴴA x` (override where a direct form is cheaper)."""
        return self.adjoint(self.forward(x))

    @property
    def has_pinv(self) -> bool:
        """Whether the operator provides [`pinv`]."""
        return type(self).pinv is not LinearOperator.pinv

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """A cheap (pseudo-)inverse of `A` (filtered back-projection, zero-filled inverse FFT, replication), used for
        initial guesses and baselines. Optional: the base class raises `NotImplementedError`."""
        raise NotImplementedError(f"{type(self).__name__} has no pseudo-inverse.")

    def prox_l2(self, z: torch.Tensor, y: torch.Tensor, rho: float | torch.Tensor) -> torch.Tensor:
        """`argmin_x ||A x - y||² + rho ||x - z||²` (here by [`prox_l2_cg`]; subclasses with a closed form override).

        Args:
            z: `(B, ...)` volumes the solution is pulled towards.
            y: `(B, ...)` measurements.
            rho: Weight of `||x - z||²`: a positive number or one per batch item.
        """
        return self.prox_l2_cg(z, y, rho)

    def prox_l2_cg(
        self,
        z: torch.Tensor,
        y: torch.Tensor,
        rho: float | torch.Tensor,
        num_iterations: int | None = None,
        tol: float = 0.0,
    ) -> torch.Tensor:
        """`prox_l2` by conjugate gradients on `(AᴴA + rho I) x = Aᴴ y + rho z`, warm-started at `z`.

        Args:
            z, y, rho: As in [`prox_l2`].
            num_iterations: CG iterations (default: the operator's `cg_iterations`).
            tol: Stop early once every item's residual is below `tol` times the norm of its right-hand side.
        """
        rho = as_rho(rho, z)
        rhs = self.adjoint(y) + rho * z
        return conjugate_gradient(
            lambda v: self.normal(v) + rho * v,
            rhs,
            z.to(rhs.dtype),
            self.cg_iterations if num_iterations is None else num_iterations,
            tol,
        )

    def gradient_step(self, z: torch.Tensor, y: torch.Tensor, rho: float | torch.Tensor) -> torch.Tensor:
        """The first-order data step `z - Aᴴ(A z - y) / rho` (one gradient step of step `1 / (2 rho)` on the
        proximal objective). Unstable where `||A||² / rho > 2`."""
        rho = as_rho(rho, z)
        return z - self.adjoint(self.forward(z) - y) / rho

    def opnorm(
        self, like: torch.Tensor | Sequence[int], num_iterations: int = 50, tol: float = 1e-6, seed: int = 0
    ) -> float:
        """The spectral norm `||A||₂` by power iteration on `AᴴA`, for inputs shaped like `like`.

        Args:
            like: A tensor (its shape, dtype and device are used) or a shape (float32 on CPU).
            num_iterations: Most power iterations.
            tol: Stop when the estimate changes by less than this fraction.
            seed: Seed of the random starting vector (the result is deterministic).
        """
        if isinstance(like, torch.Tensor):
            shape, dtype, device = tuple(like.shape), like.dtype, like.device
        else:
            shape, dtype, device = tuple(like), torch.float32, torch.device("cpu")
        generator = torch.Generator().manual_seed(seed)
        vector = torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
        vector = vector / vector.norm()
        estimate = 0.0
        for _ in range(num_iterations):
            image = self.normal(vector)
            norm = float(image.norm())
            if norm == 0:
                return 0.0
            previous, estimate = estimate, norm**0.5
            vector = image / norm
            if abs(estimate - previous) <= tol * estimate:
                break
        return estimate


def conjugate_gradient(operator, rhs: torch.Tensor, x: torch.Tensor, num_iterations: int, tol: float = 0.0):
    """Solve `operator(x) = rhs` for a Hermitian positive-definite, batch-separable `operator`, item by item.

    Args:
        operator: Callable applying the system matrix to a `(B, ...)` tensor.
        rhs: `(B, ...)` right-hand side.
        x: `(B, ...)` starting point.
        num_iterations: Most iterations.
        tol: Stop once every item's residual norm is below `tol * ||rhs||` (0: run every iteration).
    """
    residual = rhs - operator(x)
    direction = residual
    squared = batch_dot(residual, residual)
    threshold = (tol**2) * batch_dot(rhs, rhs)
    for _ in range(num_iterations):
        if bool((squared <= threshold).all()):
            break
        image = operator(direction)
        curvature = batch_dot(direction, image)
        alpha = torch.where(curvature > 0, squared / curvature.clamp_min(torch.finfo(curvature.dtype).tiny), 0)
        x = x + per_item(alpha, x) * direction
        residual = residual - per_item(alpha, x) * image
        updated = batch_dot(residual, residual)
        beta = torch.where(squared > 0, updated / squared.clamp_min(torch.finfo(squared.dtype).tiny), 0)
        direction = residual + per_item(beta, x) * direction
        squared = updated
    return x


class IdentityOperator(LinearOperator):
    """`A = I`: denoising. The proximal step is `(y + rho z) / (1 + rho)`."""

    has_closed_form_prox = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` itself."""
        return x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """`y` itself."""
        return y

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """`y` itself."""
        return y

    def prox_l2(self, z: torch.Tensor, y: torch.Tensor, rho: float | torch.Tensor) -> torch.Tensor:
        """`(y + rho z) / (1 + rho)`."""
        rho = as_rho(rho, z)
        return (y + rho * z) / (1 + rho)
