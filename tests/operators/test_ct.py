"""Ray transform: adjointness, FBP accuracy on a 3D phantom, sparse-view conditions."""

import pytest
import torch

from meddiffusers.operators import RayTransform, sparse_view_ct_condition


def ellipsoid_phantom(depth=4, size=64):
    """A small 3D Shepp-Logan-like phantom: a skull-like shell, a brain, and a few ellipsoidal structures."""
    z, y, x = torch.meshgrid(
        torch.linspace(-1, 1, depth), torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij"
    )
    phantom = torch.zeros_like(x)
    for value, (cx, cy, cz), (ax, ay, az) in [
        (1.0, (0, 0, 0), (0.69, 0.92, 2.0)),
        (-0.8, (0, -0.0184, 0), (0.6624, 0.874, 2.0)),
        (-0.2, (0.22, 0, 0), (0.11, 0.31, 2.0)),
        (-0.2, (-0.22, 0, 0), (0.16, 0.41, 2.0)),
        (0.1, (0, 0.35, 0), (0.21, 0.25, 2.0)),
        (0.1, (0, -0.1, 0), (0.046, 0.046, 2.0)),
    ]:
        inside = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1
        phantom = phantom + value * inside.float()
    return phantom[None, None]


@pytest.mark.parametrize("geometry", ["parallel", "fan"])
def test_adjoint_identity(geometry):
    torch.manual_seed(0)
    transform = RayTransform((32, 40), num_views=30, geometry=geometry)
    x = torch.randn(2, 1, 3, 32, 40, dtype=torch.float64).float()
    y = torch.randn(2, 1, 3, 30, transform.num_detectors)
    lhs, rhs = (transform(x) * y).sum(), (x * transform.adjoint(y)).sum()
    assert abs(lhs - rhs) / abs(lhs) < 1e-4


def test_projection_of_a_disc_has_the_expected_line_integrals():
    transform = RayTransform((65, 65), num_views=8)
    y, x = torch.meshgrid(torch.arange(65.0) - 32, torch.arange(65.0) - 32, indexing="ij")
    disc = ((x**2 + y**2) <= 20**2).float()[None, None, None]
    sinogram = transform(disc)
    centre = sinogram[0, 0, 0, :, transform.num_detectors // 2]
    torch.testing.assert_close(centre, torch.full_like(centre, 41.0), atol=1.5, rtol=0)  # chord through the centre


def test_fbp_with_many_views_recovers_the_phantom_and_sparse_views_do_not():
    phantom = ellipsoid_phantom()
    inside = phantom[0, 0] != 0
    errors = {}
    for views in (360, 12):
        transform = RayTransform(tuple(phantom.shape[3:]), num_views=views)
        recon = transform.fbp(transform(phantom))
        errors[views] = ((recon - phantom)[0, 0][inside].norm() / phantom[0, 0][inside].norm()).item()
    print(f"FBP relative error inside the phantom: 360 views {errors[360]:.3f}, 12 views {errors[12]:.3f}")
    assert errors[360] < 0.35  # low-contrast Shepp-Logan inserts on a 64² grid
    assert errors[12] > 1.4 * errors[360]
    condition = sparse_view_ct_condition(phantom, num_views=12)
    assert condition.shape == phantom.shape


def test_fan_beam_fbp_by_rebinning():
    phantom = ellipsoid_phantom()
    inside = phantom[0, 0] != 0
    fan = RayTransform(tuple(phantom.shape[3:]), num_views=360, geometry="fan")
    recon = fan.fbp(fan(phantom))
    error = ((recon - phantom)[0, 0][inside].norm() / phantom[0, 0][inside].norm()).item()
    print(f"fan-beam FBP relative error inside the phantom (360 views): {error:.3f}")
    assert error < 0.4


def test_bad_arguments():
    with pytest.raises(ValueError, match="geometry"):
        RayTransform((8, 8), 4, geometry="cone")
    with pytest.raises(ValueError, match="Expected"):
        RayTransform((8, 8), 4)(torch.zeros(1, 1, 2, 8, 9))


def test_real_ct_sparse_view_condition():
    from meddiffusers import HUWindow, load_nifti
    from tests.conftest import shared_volume

    ct = HUWindow.preset("wide")(load_nifti(shared_volume("ct_chest_pyradiomics_lung1.nii.gz")).tensor)
    volume = ct[:, :, 20:22, ::4, ::4]  # two 128 x 128 slices
    psnr = {}
    for views in (180, 18):
        condition = sparse_view_ct_condition(volume, views).clamp(-1, 1)
        psnr[views] = (10 * torch.log10(4 / ((condition - volume) ** 2).mean())).item()
    assert psnr[180] > 25 and psnr[180] > psnr[18] + 5
