"""Regularizers and deformable metrics: closed forms, reference implementations, gradchecks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medreg.core.axes import vectors_to_channels
from medreg.core.grid import Grid
from medreg.core.resize import block_mean, resize_linear
from medreg.deformable.filters import (
    box_mean,
    central_difference,
    gaussian_smooth,
)
from medreg.deformable.metrics import (
    get_deformable_metric,
    lncc,
    lncc_force,
    lncc_reference,
    mind_ssc,
    mind_ssc_descriptors,
    ngf,
)
from medreg.deformable.regularizers import (
    FieldRegularizer,
    RegularizerWeights,
    bending,
    diffusion,
    folding,
    linear_elastic,
    total_variation,
)
from medreg.errors import MedregError
from tests.conftest import blob_image, oblique_grid


def _field(fn, grid: Grid) -> torch.Tensor:
    return vectors_to_channels(fn(grid.world_points(torch.float64))[None])


def _inner(x: torch.Tensor, b: int = 2) -> torch.Tensor:
    return x[(slice(None),) * 2 + (slice(b, -b),) * (x.ndim - 2)]


def test_energies_of_affine_and_quadratic_fields_in_physical_units():
    """u = A x: diffusion |A|_F^2, bending 0; u = (x^2 / 2, 0): bending 1 mm^-2 everywhere."""
    a = torch.tensor([[0.1, 0.2, 0.0], [0.0, -0.1, 0.05], [0.03, 0.0, 0.2]], dtype=torch.float64)
    for grid in (oblique_grid((14, 12, 10)), Grid((14, 12, 10), (0.5, 2.0, 3.0))):
        u = _field(lambda p, a=a: p @ a.T, grid)
        assert torch.isclose(diffusion(u, grid), (a**2).sum(), rtol=1e-9)
        assert float(bending(u, grid)) < 1e-20
        eps = 0.5 * (a + a.T)
        want = (eps**2).sum() + 0.5 * torch.trace(eps) ** 2
        assert torch.isclose(linear_elastic(u, grid, mu=1.0, lam=1.0), want, rtol=1e-9)
        assert torch.isclose(total_variation(u, grid, eps=0.0), (a**2).sum().sqrt(), rtol=1e-9)
    grid = Grid((20, 9, 8), (0.5, 1.0, 1.0))
    quad = _field(lambda p: torch.stack([p[..., 0] ** 2 / 2, 0 * p[..., 0], 0 * p[..., 0]], -1),
                  grid)
    # interior only: one-sided differences at the borders are not exact for x^2
    g = grid.with_(size=(20, 9, 8))
    full = bending(quad, g)
    assert 0.5 < float(full) <= 1.0 + 1e-9


def test_folding_penalty_is_zero_without_folds_and_positive_with_one():
    grid = Grid((12, 12, 12))
    assert float(folding(torch.zeros(1, 3, 12, 12, 12, dtype=torch.float64), grid)) == 0.0
    flip = _field(lambda p: torch.stack([-2 * p[..., 0], 0 * p[..., 1], 0 * p[..., 2]], -1), grid)
    assert float(folding(flip, grid)) > 0.9  # det J = -1 everywhere


@pytest.mark.parametrize("energy", [diffusion, bending, linear_elastic, total_variation, folding])
def test_regularizer_gradcheck(energy):
    grid = Grid((5, 6, 4), (1.5, 1.0, 2.0))
    u = (0.2 * torch.randn(1, 3, 4, 6, 5, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: energy(x, grid), (u,))


def test_regularizer_weights_validate():
    with pytest.raises(MedregError, match="bending"):
        RegularizerWeights(bending=-1.0)
    reg = FieldRegularizer(RegularizerWeights(diffusion=2.0, folding=1.0))
    grid = Grid((8, 8, 8))
    u = torch.randn(1, 3, 8, 8, 8, dtype=torch.float64)
    assert torch.isclose(reg(u, grid), 2 * diffusion(u, grid) + folding(u, grid))


def test_box_mean_matches_avg_pool_reference():
    x = torch.randn(2, 3, 11, 12, 13, dtype=torch.float64)
    ref = F.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=True)
    assert torch.allclose(box_mean(x, 5), ref, atol=1e-12)
    with pytest.raises(MedregError, match="odd"):
        box_mean(x, 4)


def test_gaussian_smooth_preserves_constants_and_matches_per_axis_sigma():
    x = torch.full((1, 2, 9, 10, 11), 3.0, dtype=torch.float64)
    assert torch.allclose(gaussian_smooth(x, [1.0, 2.0, 0.5]), x)
    impulse = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
    impulse[0, 0, 10, 10] = 1
    out = gaussian_smooth(impulse, [2.0, 0.0])  # sigma along x (last tensor axis) only
    assert float(out[0, 0, 9].abs().max()) == 0.0  # nothing leaks along y
    var = (out[0, 0, 10] * (torch.arange(21) - 10.0) ** 2).sum()
    assert abs(float(var) - 4.0) < 0.05


def _reference_lncc(f: torch.Tensor, m: torch.Tensor, win: int) -> torch.Tensor:
    """Plain per-voxel loop-free reference with unfold (no running sums)."""
    r = win // 2
    pf = F.pad(f, [r] * 4).unfold(2, win, 1).unfold(3, win, 1).reshape(*f.shape, -1)
    pm = F.pad(m, [r] * 4).unfold(2, win, 1).unfold(3, win, 1).reshape(*m.shape, -1)
    mf, mm = pf.mean(-1), pm.mean(-1)
    cov = (pf * pm).mean(-1) - mf * mm
    vf = (pf * pf).mean(-1) - mf * mf
    vm = (pm * pm).mean(-1) - mm * mm
    return -(cov * cov / (vf * vm + 1e-5)).mean()


def test_lncc_fast_path_matches_reference_and_is_minus_one_for_identical_images():
    img = torch.rand(1, 1, 20, 24, dtype=torch.float64)
    other = img.roll(2, -1) + 0.1 * torch.randn_like(img)
    assert torch.isclose(lncc(img, other, window=5), _reference_lncc(img, other, 5), atol=1e-10)
    assert float(lncc(img, 3 * img, window=5)) < -0.99


@pytest.mark.parametrize("loss", [lncc, ngf, mind_ssc])
def test_metric_gradcheck(loss):
    f = torch.rand(1, 1, 7, 8, 6, dtype=torch.float64)
    m = torch.rand(1, 1, 7, 8, 6, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss(f, x), (m,))


@pytest.mark.parametrize("masked", [False, True])
def test_lncc_closed_form_backward_matches_autograd_and_gradcheck(masked):
    """The analytic backward of :func:`lncc` (both images, with a mask) against autograd through
    the plain reference and against finite differences (float64)."""
    gen = torch.Generator().manual_seed(3)
    f = torch.rand(1, 1, 7, 8, 9, dtype=torch.float64, generator=gen).requires_grad_(True)
    m = torch.rand(1, 1, 7, 8, 9, dtype=torch.float64, generator=gen).requires_grad_(True)
    mask = (torch.rand(1, 1, 7, 8, 9, generator=gen) > 0.3).double() if masked else None
    fast = torch.autograd.grad(lncc(f, m, mask, window=3), (f, m))
    ref = torch.autograd.grad(lncc_reference(f, m, mask, window=3), (f, m))
    for a, b in zip(fast, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-14, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda x, y: lncc(x, y, mask, window=3), (f, m))


def test_lncc_force_is_the_centre_voxel_derivative_with_window_statistics_fixed():
    """ANTs' / DIPY's CC force: -d(cc^2)/dw(x) (times the window size) at one voxel, local
    means held fixed, by central finite differences."""
    gen = torch.Generator().manual_seed(5)
    f = torch.rand(1, 1, 9, 10, 11, dtype=torch.float64, generator=gen)
    w = 0.5 * f + 0.5 * torch.rand(1, 1, 9, 10, 11, dtype=torch.float64, generator=gen)
    loss, force_f, force_w = lncc_force(f, w, window=3, eps=1e-5)
    inner = torch.zeros_like(f)
    inner[:, :, 1:-1, 1:-1, 1:-1] = 1  # boxes fully inside the image: the same cc^2 as lncc
    assert float(loss) < 0
    assert torch.isclose(lncc_force(f, w, inner, window=3)[0], lncc(f, w, inner, window=3))
    z, y, x = 4, 5, 6
    pf, pw = f[0, 0, 3:6, 4:7, 5:8], w[0, 0, 3:6, 4:7, 5:8]
    mf, mw = pf.mean(), pw.mean()

    def cc2(df: float, dw: float) -> torch.Tensor:
        a, b = pf.clone(), pw.clone()
        a[1, 1, 1] += df
        b[1, 1, 1] += dw
        cov = ((a - mf) * (b - mw)).mean()
        return cov**2 / (((a - mf) ** 2).mean() * ((b - mw) ** 2).mean() + 1e-5)

    h, n = 1e-6, 27
    fd_w = -n * (cc2(0, h) - cc2(0, -h)) / (2 * h)
    fd_f = -n * (cc2(h, 0) - cc2(-h, 0)) / (2 * h)
    assert torch.isclose(force_w[0, 0, z, y, x], fd_w, rtol=1e-5)
    assert torch.isclose(force_f[0, 0, z, y, x], fd_f, rtol=1e-5)


def test_ngf_and_mind_are_minimal_for_a_contrast_inverted_copy():
    img = blob_image(oblique_grid((20, 18, 16))).tensor[None].double()
    inverted = 2.0 - 0.5 * img
    shifted = inverted.roll(3, -1)
    assert float(ngf(img, inverted)) < float(ngf(img, shifted))
    assert float(ngf(img, inverted)) < float(ngf(img, img.roll(1, -1)))
    assert float(mind_ssc(img, inverted)) < 1e-6 < float(mind_ssc(img, shifted))
    assert mind_ssc_descriptors(img).shape == (1, 12, 16, 18, 20)


def test_unknown_metric_is_a_clear_error():
    with pytest.raises(MedregError, match="unknown deformable metric"):
        get_deformable_metric("nope")


@pytest.mark.parametrize("shape,window", [((1, 1, 40, 13, 11), 5), ((1, 1, 23, 10, 9), 9),
                                          ((1, 1, 17, 12), 3)])
def test_lncc_force_in_slabs_equals_one_pass(shape, window):
    """Slabs with a halo of window // 2 slices see every box whole: the same forces exactly,
    the same loss up to the order of summation."""
    gen = torch.Generator().manual_seed(2)
    f, w = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)
    mask = (torch.rand((1, 1) + shape[2:], generator=gen) > 0.3).float()
    per_slice = int(np.prod(shape[3:]))
    for m in (None, mask):
        whole = lncc_force(f, w, m, window, slab_voxels=10**9)
        slabs = lncc_force(f, w, m, window, slab_voxels=3 * per_slice)  # one window thick
        torch.testing.assert_close(slabs[1], whole[1], rtol=0, atol=0)
        torch.testing.assert_close(slabs[2], whole[2], rtol=0, atol=0)
        torch.testing.assert_close(slabs[0], whole[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(7, 9, 11), (2, 5, 3), (6, 4)])
def test_central_difference_matches_torch_gradient(shape):
    x = torch.randn(1, 1, *shape, dtype=torch.float64)
    for axis in range(len(shape)):
        fast = central_difference(x, 2 + axis, 1.7)
        ref = torch.gradient(x, spacing=1.7, dim=2 + axis, edge_order=1)[0]
        assert torch.allclose(fast, ref, atol=1e-12)
    xg = x.clone().requires_grad_(True)  # with autograd it is torch.gradient itself
    central_difference(xg, 2, 1.0).sum().backward()
    assert xg.grad is not None
    with pytest.raises(MedregError, match="2 or more samples"):
        central_difference(torch.zeros(1, 1, 1, 4), 2, 1.0)


@pytest.mark.parametrize("size", [(10, 2, 8), (5, 2, 4), (10, 1, 4), (9, 3, 7), (3, 1, 2),
                                  (15, 3, 12), (5, 4, 20), (20, 1, 8)])
def test_resize_linear_matches_trilinear_interpolate(size):
    """Whole factors (2, 3, 4, 5; odd ones have a phase on the sample itself), other factors
    up and down, and unchanged axes."""
    x = torch.randn(1, 3, 5, 1, 4, dtype=torch.float64)
    ref = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    assert torch.allclose(resize_linear(x, size), ref, atol=1e-12)


@pytest.mark.parametrize("kernel", [(2, 2, 2), (1, 2, 3), (3, 1, 1)])
def test_block_mean_matches_avg_pool(kernel):
    x = torch.randn(1, 2, 6, 4, 6, dtype=torch.float64)
    assert torch.allclose(block_mean(x, kernel), F.avg_pool3d(x, kernel), atol=1e-12)
    with pytest.raises(MedregError, match="not a multiple"):
        block_mean(x, (4, 1, 1))
