"""Every LinearOperator: exact adjoints (float64 dot tests), proximal optimality, closed forms equal to conjugate
gradients, batch and dtype handling, operator norms and input checks."""

import math

import pytest
import torch

from meddiffusers.operators import (
    AveragePoolOperator,
    IdentityOperator,
    LinearOperator,
    MaskOperator,
    RayTransform,
    UndersampledMRI,
    cartesian_mask,
    conjugate_gradient,
)


class MatrixOperator(LinearOperator):
    """A dense matrix acting on each flattened batch item (a stand-in for an operator without a closed form)."""

    def __init__(self, matrix, shape):
        self.matrix, self.shape = matrix, tuple(shape)

    def forward(self, x):
        return x.flatten(1) @ self.matrix.to(x.dtype).T

    def adjoint(self, y):
        return (y @ self.matrix.to(y.dtype)).reshape(-1, *self.shape)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def random_mask(shape, seed=0):
    return torch.rand(shape, generator=seeded(seed)) < 0.5


OPERATORS = {
    "identity": (lambda: IdentityOperator(), (2, 1, 3, 4, 5)),
    "mask": (lambda: MaskOperator(random_mask((1, 1, 3, 4, 5))), (2, 1, 3, 4, 5)),
    "mask_weights": (lambda: MaskOperator(torch.rand(3, 4, 5, generator=seeded(1))), (2, 1, 3, 4, 5)),
    "pool_depth": (lambda: AveragePoolOperator(2), (2, 1, 4, 3, 5)),
    "pool_in_plane": (lambda: AveragePoolOperator((2, 3), axes=(1, 2)), (2, 1, 2, 4, 6)),
    "mri_lines": (lambda: UndersampledMRI(cartesian_mask(8, 4, seed=1)), (2, 1, 2, 6, 8)),
    "mri_2d": (lambda: UndersampledMRI(random_mask((6, 8), seed=2)), (2, 1, 2, 6, 8)),
    "ct_parallel": (lambda: RayTransform((8, 8), num_views=6), (2, 1, 2, 8, 8)),
    "ct_fan": (lambda: RayTransform((8, 8), num_views=6, geometry="fan"), (2, 1, 2, 8, 8)),
    "matrix": (lambda: MatrixOperator(torch.randn(20, 24, generator=seeded(3)), (1, 2, 3, 4)), (2, 1, 2, 3, 4)),
}  # fmt: skip
CLOSED_FORMS = [name for name, (build, _) in OPERATORS.items() if build().has_closed_form_prox]


def randn(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=seeded(seed), dtype=dtype)


def problem(name, dtype=torch.float64):
    """The operator, a volume `z` and a measurement `y` of the right kind (complex for MRI)."""
    build, shape = OPERATORS[name]
    operator = build()
    z = randn(shape, 0).to(dtype)
    measured = operator(randn(shape, 1))
    kind = (torch.complex128 if dtype == torch.float64 else torch.complex64) if measured.is_complex() else dtype
    y = randn(measured.shape, 2, measured.dtype).to(kind)
    return operator, z, y


def inner(a, b):
    return (a.conj() * b).sum() if a.is_complex() or b.is_complex() else (a * b).sum()


@pytest.mark.parametrize("name", list(OPERATORS))
def test_adjoint_is_exact_in_float64(name):
    operator, x, y = problem(name)
    lhs, rhs = inner(operator(x), y), inner(x.to(operator.adjoint(y).dtype), operator.adjoint(y))
    assert abs(lhs - rhs) / abs(lhs) < 1e-10
    torch.testing.assert_close(operator.normal(x), operator.adjoint(operator(x)))


@pytest.mark.parametrize("name", list(OPERATORS))
def test_prox_is_the_minimiser(name):
    operator, z, y = problem(name)
    rho = torch.tensor([0.3, 2.0], dtype=torch.float64)
    if operator.has_closed_form_prox:
        x = operator.prox_l2(z, y, rho)
    else:
        x = operator.prox_l2_cg(z, y, rho, num_iterations=500, tol=1e-12)
    weights = rho.view(-1, 1, 1, 1, 1)
    gradient = operator.adjoint(operator(x) - y) + weights * (x - z)
    scale = operator.adjoint(y).abs().amax() + weights.amax() * z.abs().amax()
    assert gradient.abs().amax() / scale < 1e-8


@pytest.mark.parametrize("name", CLOSED_FORMS)
def test_closed_form_equals_conjugate_gradients(name):
    operator, z, y = problem(name)
    closed = operator.prox_l2(z, y, 0.7)
    iterative = operator.prox_l2_cg(z, y, 0.7, num_iterations=300, tol=1e-13)
    torch.testing.assert_close(closed, iterative.to(closed.dtype), atol=1e-9, rtol=1e-9)


def test_ray_transform_prox_runs_its_cg_iterations_from_z():
    operator, z, y = problem("ct_parallel")
    assert not operator.has_closed_form_prox
    torch.testing.assert_close(operator.prox_l2(z, y, 0.5), operator.prox_l2_cg(z, y, 0.5, num_iterations=10))
    torch.testing.assert_close(operator.prox_l2_cg(z, y, 0.5, num_iterations=0), z)
    exact = operator.prox_l2_cg(z, y, 0.5, num_iterations=500, tol=1e-12)
    errors = [(operator.prox_l2_cg(z, y, 0.5, num_iterations=k) - exact).norm() for k in (1, 5, 20)]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("name", list(OPERATORS))
def test_batch_items_are_independent_and_float32_stays_float32(name):
    operator, z, y = problem(name, torch.float32)
    rho = torch.tensor([0.5, 3.0])
    batched = operator.prox_l2(z, y, rho)
    assert batched.dtype in (torch.float32, torch.complex64) and operator(z).dtype in (torch.float32, torch.complex64)
    for item in range(2):
        alone = operator.prox_l2(z[item : item + 1], y[item : item + 1], rho[item])
        torch.testing.assert_close(batched[item : item + 1], alone, atol=1e-4, rtol=1e-4)  # float32 CG rounding


def test_operator_norms():
    assert IdentityOperator().opnorm((1, 1, 2, 3, 4)) == pytest.approx(1.0)
    weights = torch.rand(2, 3, 4) + 0.1
    assert MaskOperator(weights).opnorm((1, 1, 2, 3, 4), num_iterations=500, tol=1e-10) == pytest.approx(
        float(weights.max()), rel=1e-3
    )
    assert AveragePoolOperator(2, axes=(0, 1)).opnorm((1, 1, 4, 4, 3)) == pytest.approx(0.5, rel=1e-4)
    assert UndersampledMRI(cartesian_mask(8, 2)).opnorm((1, 1, 1, 6, 8)) == pytest.approx(1.0, rel=1e-4)
    operator, z, _ = problem("matrix")
    expected = torch.linalg.matrix_norm(operator.matrix, ord=2).item()
    assert operator.opnorm(z, num_iterations=1000, tol=1e-12) == pytest.approx(expected, rel=1e-5)


def test_gradient_step_and_pseudo_inverses():
    operator, z, y = problem("matrix")
    torch.testing.assert_close(operator.gradient_step(z, y, 4.0), z - operator.adjoint(operator(z) - y) / 4.0)
    assert not operator.has_pinv
    with pytest.raises(NotImplementedError):
        operator.pinv(y)
    pool = AveragePoolOperator(4)
    thick = randn((1, 1, 2, 3, 3), 5)
    torch.testing.assert_close(pool(pool.pinv(thick)), thick)
    mask = MaskOperator(torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(mask.pinv(torch.tensor([3.0, 3.0, 3.0])), torch.tensor([0.0, 6.0, 3.0]))
    mri = UndersampledMRI(torch.ones(8))
    volume = randn((1, 1, 1, 4, 8), 6)
    torch.testing.assert_close(mri.pinv(mri(volume)).real, volume)


def test_mask_operator_keeps_slices():
    operator = MaskOperator.keep_slices((6, 2, 3), kept=range(0, 6, 3), axis=0)
    assert operator.mask.shape == (1, 1, 6, 2, 3)
    assert operator.mask[0, 0, :, 0, 0].tolist() == [1, 0, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="outside"):
        MaskOperator.keep_slices((6, 2, 3), kept=[7])


def test_conjugate_gradient_solves_per_item_systems():
    matrix = randn((5, 5), 7)
    system = matrix @ matrix.T + torch.eye(5, dtype=torch.float64)
    scales = torch.tensor([1.0, 10.0], dtype=torch.float64)
    rhs = randn((2, 5), 8)
    solution = conjugate_gradient(lambda v: (v @ system) * scales[:, None], rhs, torch.zeros_like(rhs), 50, 1e-14)
    expected = torch.linalg.solve(system, rhs.T).T / scales[:, None]
    torch.testing.assert_close(solution, expected)


def test_bad_arguments():
    operator, z, y = problem("identity")
    with pytest.raises(ValueError, match="positive"):
        operator.prox_l2(z, y, -1.0)
    with pytest.raises(ValueError, match="batch item"):
        operator.prox_l2(z, y, torch.ones(3))
    with pytest.raises(ValueError, match="multiple"):
        AveragePoolOperator(4)(torch.zeros(1, 1, 6, 2, 2))
    with pytest.raises(ValueError, match="distinct"):
        AveragePoolOperator(2, axes=(0, -3))
    with pytest.raises(ValueError, match="factor"):
        AveragePoolOperator((2, 2), axes=(0,))
    with pytest.raises(ValueError, match="cg_iterations"):
        RayTransform((8, 8), 4, cg_iterations=0)
    assert math.isclose(AveragePoolOperator((2, 3), axes=(1, 2)).block_size, 6)
