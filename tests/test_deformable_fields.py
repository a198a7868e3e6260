"""Closed-form and reference checks of field operations and deformable transforms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medreg.core.axes import vectors_to_channels
from medreg.core.grid import Grid
from medreg.deformable.fields import (
    compose_displacements,
    integrate_velocity,
    invert_displacement,
    jacobian_determinant,
    jacobian_matrix,
    warp_field,
)
from medreg.deformable.synthetic import random_velocity
from medreg.deformable.transforms import (
    BSplineTransform,
    DisplacementField,
    StationaryVelocityField,
    control_grid,
    dense_from_transform,
)
from medreg.errors import MedregError
from medreg.transforms import Affine, Compose, Translation
from tests.conftest import oblique_grid


def _field_from(fn, grid: Grid, dtype=torch.float64) -> torch.Tensor:
    """``(1, dim, *S)`` field from a function of world points ``(..., dim) -> (..., dim)``."""
    pts = grid.world_points(dtype)
    return vectors_to_channels(fn(pts)[None])


def test_scaling_and_squaring_matches_analytic_rotation_flow():
    """v(x) = w J (x - c) (a 2D rotation field) integrates to a rotation by w about c."""
    grid = Grid((65, 65), (1.0, 1.0), (-32.0, -32.0))
    w = 0.3
    rot90 = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    vel = _field_from(lambda p: w * p @ rot90.T, grid)
    disp = integrate_velocity(vel, grid, steps=10)
    c, s = math.cos(w), math.sin(w)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    truth = _field_from(lambda p: p @ rot.T - p, grid)
    inner = (grid.world_points(torch.float64).norm(dim=-1) < 20)
    err = (disp - truth)[0].norm(dim=0)[inner]
    assert float(err.max()) < 0.02  # mm, at up to 6 mm of displacement


def test_scaling_and_squaring_matches_analytic_linear_flow_3d():
    """A linear velocity v(x) = L x flows to exp(L) x (matrix exponential)."""
    grid = Grid((33, 31, 29), (1.5, 1.5, 1.5), (-24.0, -22.5, -21.0))
    lmat = torch.tensor([[0.05, -0.08, 0.0], [0.08, 0.02, 0.03], [0.0, -0.03, -0.04]],
                        dtype=torch.float64)
    vel = _field_from(lambda p: p @ lmat.T, grid)
    disp = integrate_velocity(vel, grid, steps=8)
    expm = torch.linalg.matrix_exp(lmat)
    truth = _field_from(lambda p: p @ expm.T - p, grid)
    inner = grid.world_points(torch.float64).abs().max(-1).values < 12
    assert float((disp - truth)[0].norm(dim=0)[inner].max()) < 0.01


def test_svf_inverse_and_composition_residuals():
    grid = oblique_grid((24, 26, 22))
    svf = random_velocity(grid, mean_mm=2.0, smoothness_mm=8.0, seed=3)
    u = svf.displacement().detach()
    w = svf.inverse().displacement().detach()
    resid = compose_displacements(u, w, grid)[0].norm(dim=0)  # exp(-v) o exp(v) - id
    inner = resid[3:-3, 3:-3, 3:-3]
    assert float(inner.mean()) < 0.02 and float(inner.max()) < 0.15


def test_fixed_point_inversion_reports_small_residual():
    grid = oblique_grid((24, 26, 22))
    u = random_velocity(grid, mean_mm=2.0, smoothness_mm=8.0, seed=4).displacement().detach()
    res = invert_displacement(u, grid, iterations=100, tol=1e-4)
    assert res.residual_max < 5e-3 and res.residual_mean < 1e-3
    # and the inverse composed after u gives the identity away from the border
    back = compose_displacements(u, res.displacement, grid)[0].norm(dim=0)[3:-3, 3:-3, 3:-3]
    assert float(back.max()) < 0.2


def test_inversion_converges_where_the_field_stretches_faster_than_it_moves():
    """u_x = s (0.6 sin(x/s) + 0.4 sin(2x/s)) is unfolded (det J in [0.14, 2.4]), but
    du_x/dx reaches 1.4, where the plain fixed-point step ``w <- -u(y + w)`` diverges."""
    s = 3.0
    grid = Grid((96, 8), (0.5, 1.0), (-24.0, -4.0))

    def fn(p):
        t = p[..., :1] / s
        ux = s * (0.6 * torch.sin(t) + 0.4 * torch.sin(2 * t))
        return torch.cat([ux, torch.zeros_like(ux)], dim=-1)

    u = _field_from(fn, grid).float()
    assert float(jacobian_determinant(u.double(), grid).min()) > 0.1
    res = invert_displacement(u, grid, iterations=30, tol=1e-3)
    assert res.residual_max < 1e-3 and res.iterations < 30
    assert float(jacobian_determinant(res.displacement.double(), grid).min()) > 0
    w = -u  # the plain fixed point, for contrast: residual w + u(y + w) = compose(w, u)
    for _ in range(30):
        w = w - compose_displacements(w, u, grid)
    assert float(compose_displacements(w, u, grid)[0].norm(dim=0).max()) > 0.1


def test_displacement_field_inverse_transform():
    grid = oblique_grid((20, 22, 18))
    field = DisplacementField(grid, random_velocity(grid, mean_mm=1.5, smoothness_mm=6.0,
                                                    seed=5).displacement().detach())
    inv = field.inverse()
    pts = grid.world_points()[4:-4, 4:-4, 4:-4]
    with torch.no_grad():
        err = (field(inv(pts)) - pts).norm(dim=-1)
    assert float(err.max()) < 0.05 and inv.inversion.residual_max < 1e-2


def test_compose_linear_and_dense_equals_dense_collapse():
    grid = oblique_grid((16, 18, 14))
    svf = random_velocity(grid, mean_mm=2.0, smoothness_mm=6.0, seed=6)
    aff = Affine(3, linear=np.eye(3) * 1.03, translation=[1.0, -2.0, 0.5], center=grid.center())
    full = Compose(svf, aff)
    dense = dense_from_transform(full, grid)
    pts = grid.world_points()
    with torch.no_grad():
        assert torch.allclose(dense(pts), full(pts), atol=1e-4)
        assert torch.allclose(full(pts), aff(svf(pts)), atol=1e-5)


def test_known_shift_moves_field_points_exactly():
    grid = Grid((10, 12), (2.0, 1.0))
    shift = torch.zeros(1, 2, *grid.shape)
    shift[:, 0] = 4.0  # 4 mm along x = 2 voxels
    field = DisplacementField(grid, shift)
    pts = grid.world_points()
    with torch.no_grad():
        assert torch.allclose(field(pts), Translation(2, [4.0, 0.0])(pts))


def test_jacobian_of_affine_field_is_its_matrix_on_oblique_grid():
    grid = oblique_grid((12, 14, 10))
    a = torch.tensor([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.05], [0.0, 0.1, 1.2]], dtype=torch.float64)
    disp = _field_from(lambda p: p @ a.T - p, grid)
    jac = jacobian_matrix(disp, grid)
    assert torch.allclose(jac, a.expand_as(jac), atol=1e-9)
    det = jacobian_determinant(disp, grid)
    assert torch.allclose(det, torch.linalg.det(a).expand_as(det), atol=1e-9)


def test_bspline_separable_evaluation_matches_pointwise_and_interpolates():
    grid = oblique_grid((20, 18, 16))
    bsp = BSplineTransform(grid, 6.0)
    with torch.no_grad():
        bsp.coefficients.normal_()
    pts = grid.world_points()
    with torch.no_grad():
        direct = bsp(pts) - pts
    dense = bsp.displacement()
    assert torch.allclose(vectors_to_channels(direct[None]), dense, atol=1e-4)
    # constant coefficients reproduce a constant displacement (partition of unity)
    with torch.no_grad():
        bsp.coefficients.fill_(2.5)
    assert torch.allclose(bsp.displacement(), torch.full_like(dense, 2.5), atol=1e-5)


def test_bspline_transform_gradcheck():
    grid = Grid((6, 7), (2.0, 2.0))
    bsp = BSplineTransform(grid, 4.0).double()
    pts = (torch.rand(5, 2, dtype=torch.float64) * 10).requires_grad_(True)
    coef = torch.randn_like(bsp.coefficients).requires_grad_(True)

    def call(c, p):
        return torch.func.functional_call(bsp, {"coefficients": c}, (p,))

    assert torch.autograd.gradcheck(call, (coef, pts))
    # the separable dense evaluation has the same derivatives
    assert torch.autograd.gradcheck(lambda c: bsp.displacement_on(grid, c), (coef,))


def test_integrate_velocity_gradcheck():
    grid = Grid((5, 6), (1.5, 1.0))
    vel = (0.3 * torch.randn(1, 2, *grid.shape, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: integrate_velocity(v, grid, steps=2), (vel,))


def test_svf_transform_points_and_inverse():
    grid = oblique_grid((16, 18, 14))
    svf = random_velocity(grid, mean_mm=2.0, smoothness_mm=6.0, seed=7)
    assert isinstance(svf, StationaryVelocityField)
    pts = grid.world_points()[3:-3, 3:-3, 3:-3]
    with torch.no_grad():
        back = svf.inverse()(svf(pts))
    assert float((back - pts).norm(dim=-1).max()) < 0.1


@pytest.mark.parametrize("spacing", [0.0, -3.0, float("nan"), 0.5, [4.0, 5.0]])
def test_impossible_control_spacing_is_a_clear_error(spacing):
    grid = Grid((10, 10, 10), (1.0, 1.0, 1.0))
    with pytest.raises(MedregError, match="control-point spacing"):
        control_grid(grid, spacing)


def test_field_of_wrong_shape_is_rejected():
    grid = Grid((10, 12, 8))
    with pytest.raises(MedregError, match="must have shape"):
        DisplacementField(grid, torch.zeros(1, 2, 8, 12, 10))
    with pytest.raises(MedregError, match="must have shape"):
        StationaryVelocityField(grid, torch.zeros(1, 3, 10, 12, 8))


def test_inversion_retires_converged_voxels_without_changing_the_answer():
    """Voxels stop once below ``RETIRE_FRACTION * tol``; the rest keep iterating: the result
    equals an inversion run to a 10x tighter tolerance, within that tolerance."""
    grid = oblique_grid((20, 22, 18))
    u = random_velocity(grid, mean_mm=2.0, smoothness_mm=8.0, seed=4).displacement().detach()
    res = invert_displacement(u, grid, iterations=60, tol=1e-3)
    tight = invert_displacement(u, grid, iterations=60, tol=1e-4)
    assert res.residual_max < 1e-3 and res.residual_mean < 1e-4
    assert float((res.displacement - tight.displacement).abs().max()) < 2e-3
    direct = (res.displacement + warp_field(u, grid, res.displacement))[0].norm(dim=0)
    assert abs(float(direct.max()) - res.residual_max) < 1e-5  # the reported residual is true
