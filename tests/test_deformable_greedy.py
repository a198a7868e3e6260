"""Greedy symmetric SyN: image gradients, the final field algebra, and closed-form micro-cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medreg.core.axes import vectors_to_channels
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.deformable import greedy
from medreg.deformable.fields import jacobian_determinant, sample_field
from medreg.deformable.greedy import (
    GreedySchedule,
    GreedySyN,
    _Resizer,
    area_average,
    syn_mappings,
    world_gradient,
)
from medreg.deformable.optimize import SolverOptions
from medreg.deformable.pyramid import doubled_grid, doubling_factors
from medreg.deformable.stages import PRESETS as STAGE_PRESETS
from medreg.deformable.synthetic import random_velocity
from medreg.errors import MedregError
from medreg.io.images import read_image
from medreg.registration.plugins import STAGES, StageContext, resolve
from medreg.resample import resample
from tests.conftest import SHARED, need, oblique_grid


def test_world_gradient_of_a_linear_image_on_an_oblique_grid():
    grid = oblique_grid((14, 12, 10), spacing=(1.5, 1.0, 2.0))
    g = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    img = (grid.world_points(torch.float64) @ g)[None, None]
    out = world_gradient(img, grid)
    assert out.shape == (1, 3, *grid.shape)
    want = g.reshape(1, 3, 1, 1, 1).expand_as(out)
    assert torch.allclose(out, want, atol=1e-9)  # exact for linear data, borders included


def test_syn_mappings_compose_b_after_a_inverse_and_invert_each_other():
    grid = oblique_grid((24, 22, 20), spacing=(2.0, 2.0, 2.0))
    u_f = random_velocity(grid, mean_mm=1.5, smoothness_mm=10.0, seed=3).displacement().detach()
    u_m = random_velocity(grid, mean_mm=1.5, smoothness_mm=10.0, seed=4).displacement().detach()
    forward, backward, res = syn_mappings(u_f, u_m, grid, grid, tol=1e-3, iterations=100)
    assert max(res["inverse_a_residual_max_mm"], res["inverse_b_residual_max_mm"]) < 2e-3  # float32
    pts = grid.world_points()[3:-3, 3:-3, 3:-3]
    a_pts = pts + sample_field(u_f, grid, pts)  # A(x)
    b_pts = pts + sample_field(u_m, grid, pts)  # B(x)
    fwd_at_a = a_pts + sample_field(forward, grid, a_pts)  # (B o A^-1)(A(x)) = B(x)
    assert float((fwd_at_a - b_pts).norm(dim=-1).mean()) < 0.02
    back = fwd_at_a + sample_field(backward, grid, fwd_at_a)  # (A o B^-1)(B(x)) = A(x)
    assert float((back - a_pts).norm(dim=-1).mean()) < 0.02


@pytest.fixture(scope="module")
def slice_case():
    """A real 2D brain slice (ITK's BrainProtonDensitySlice, 1 mm) warped by a known
    diffeomorphism: moving = fixed o exp(-v), so the true fixed->moving mapping is exp(v)."""
    img = read_image(need(SHARED / "2d/itk/BrainProtonDensitySlice.png"))
    fixed = Image(img.tensor[:1].float(), img.grid)
    svf = random_velocity(fixed.grid, mean_mm=2.5, smoothness_mm=12.0, seed=5)
    moving = resample(fixed, fixed.grid, svf.inverse())
    inner = fixed.tensor[0] > 20  # the head, not the air
    return fixed, moving, svf, inner


@pytest.mark.parametrize("metric, max_ratio", [("lncc", 0.25), ("mse", 0.35)])
def test_syn_recovers_a_known_warp_on_a_2d_slice_with_inverse(slice_case, metric, max_ratio):
    """``lncc`` takes the CC-force path, ``mse`` the autograd path; no folding; the inverse
    field undoes the forward one."""
    fixed, moving, svf, inner = slice_case
    ctx = StageContext(fixed, moving, stage="syn", metric=metric,
                       options=dict(levels=(4, 2, 1), iterations=(60, 30, 10)))
    out = resolve(STAGES, "syn", "stage")(ctx, None)
    pts = fixed.grid.world_points()
    with torch.no_grad():
        truth = svf(pts)
        before = (truth - pts).norm(dim=-1)[inner].mean()
        moved = out.transform(pts)
        after = (moved - truth).norm(dim=-1)[inner].mean()
        back = (out.inverse(moved) - pts).norm(dim=-1)[inner].mean()
    assert float(before) > 1.5
    assert float(after) < max_ratio * float(before), (float(before), float(after))
    assert float(back) < 0.1
    det = jacobian_determinant(out.transform.displacement(), fixed.grid)
    assert float(det.min()) > 0
    assert len(out.info["level_iterations"]) == 3 and out.info["inverse_a_residual_max_mm"] < 0.05


def test_syn_ignores_what_the_moving_mask_excludes(slice_case):
    """Masks weight the forces at the midpoint: with the moving mask covering only the left
    half, the right half of the forward field stays near zero while the unmasked run moves it."""
    fixed, moving, svf, inner = slice_case
    half = moving.tensor.new_zeros(moving.tensor.shape)
    nx = moving.grid.size[0]
    half[..., : nx // 2] = 1  # left half in index x
    opts = dict(levels=(2, 1), iterations=(30, 10))
    outs = []
    for mask in (None, Image(half, moving.grid)):
        ctx = StageContext(fixed, moving, stage="syn", metric="lncc", options=opts,
                           moving_mask=mask, fixed_mask=Image(torch.ones_like(half), fixed.grid))
        outs.append(resolve(STAGES, "syn", "stage")(ctx, None))
    u = [o.transform.displacement()[0].norm(dim=0) for o in outs]  # (H, W) mm
    right = (slice(None), slice(nx // 2 + 25, None))  # well inside the excluded half
    free, masked = float(u[0][right][inner[right]].mean()), float(u[1][right][inner[right]].mean())
    assert free > 1.0 and masked < 0.25 * free, (free, masked)


@pytest.mark.filterwarnings("ignore:Since version 1.3.0")
def test_puller_ramps_rebuild_the_affine_sampling_grid():
    """The per-axis ramps of ``_Puller`` sum to ``affine_norm_grid`` for any theta and shape."""
    from medreg.core.sampling import affine_norm_grid, affine_norm_ramps

    gen = torch.Generator().manual_seed(0)
    for shape in ((5, 1, 7), (4, 6), (3, 8, 2)):
        d = len(shape)
        theta = torch.eye(d + 1, dtype=torch.float64)[:d] + 0.3 * torch.randn(
            d, d + 1, dtype=torch.float64, generator=gen)
        grid = Grid(size=tuple(reversed(shape)))
        ref = affine_norm_grid(theta, grid, torch.float64)[0]  # (*S, dim)
        ramps = affine_norm_ramps(theta, shape)
        for k in range(d):
            total = sum(ramps[k], torch.zeros(shape))
            torch.testing.assert_close(total, ref[..., k].float(), atol=1e-6, rtol=0)


def test_world_gradient_weight_and_reduce_match_the_full_product():
    grid = Grid(size=(6, 5, 4), spacing=(1.0, 2.0, 1.5),
                direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(1, 1, 4, 5, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(1, 1, 4, 5, 6, generator=gen, dtype=torch.float64)

    def reduce(x):
        return torch.nn.functional.avg_pool3d(x, 2, ceil_mode=True)

    full = reduce(world_gradient(img, grid) * w)
    torch.testing.assert_close(world_gradient(img, grid, w, reduce), full)


def test_area_average_is_adaptive_average_pooling():
    from medreg.deformable.greedy import area_average

    x = torch.randn(1, 3, 9, 7, 11, dtype=torch.float64)
    for shape in ((5, 4, 6), (9, 7, 11), (3, 2, 4)):
        torch.testing.assert_close(area_average(x, shape),
                                   torch.nn.functional.adaptive_avg_pool3d(x, shape))
    y = torch.randn(1, 2, 7, 5)
    torch.testing.assert_close(area_average(y, (4, 3)),
                               torch.nn.functional.adaptive_avg_pool2d(y, (4, 3)))



def test_syn_per_level_options_broadcast_and_reach_their_level(slice_case, monkeypatch):
    """``window``/``step``/``grad_sigma``/``field_sigma`` take one value per level: one value is
    broadcast, a wrong count is an error, and :class:`GreedySchedule` hands level ``i`` its own
    settings."""
    fixed, moving, _, _ = slice_case
    base = dict(levels=(2, 1), iterations=(8, 3))
    runs = []
    for opts in (dict(window=5, grad_sigma=3.0), dict(window="5,5", grad_sigma=(3, 3))):
        ctx = StageContext(fixed, moving, stage="syn", metric="lncc", options={**base, **opts})
        runs.append(resolve(STAGES, "syn", "stage")(ctx, None).transform.displacement())
    assert torch.equal(runs[0], runs[1])
    ctx = StageContext(fixed, moving, stage="syn", metric="lncc",
                       options={**base, "window": "5,7,9"})
    with pytest.raises(MedregError, match="2 pyramid levels but 3 values of window"):
        resolve(STAGES, "syn", "stage")(ctx, None)

    seen = []
    monkeypatch.setattr(greedy, "solve_greedy_level",
                        lambda problem, level, params, its, opts, cb: seen.append(
                            (level, problem.cc_window, opts.grad_sigma, opts.lr)))
    levels = ["coarse", "fine"]
    schedule = GreedySchedule(levels, [SolverOptions(lr=0.25, grad_sigma=3.0),
                                       SolverOptions(lr=0.5, grad_sigma=1.5)], [9, 5])
    problem = GreedySyN(None, None, cc_window=1)
    for level in levels:
        schedule(problem, level, [], 1, SolverOptions())
    assert seen == [("coarse", 9, 3.0, 0.25), ("fine", 5, 1.5, 0.5)]


def test_syn_preset_equals_its_explicit_options_and_options_override_it(slice_case):
    """``preset="intersubject"`` is shorthand for its per-level settings; an explicit option
    (``iterations`` here) still wins, and an unknown name is an error."""
    fixed, moving, _, _ = slice_case
    explicit = dict(STAGE_PRESETS["syn"]["intersubject"], iterations=(8, 4, 2))
    runs = []
    for opts in (dict(preset="intersubject", iterations="8,4,2"), explicit):
        ctx = StageContext(fixed, moving, stage="syn", metric="lncc", options=opts)
        out = resolve(STAGES, "syn", "stage")(ctx, None)
        runs.append(out.transform.displacement())
        assert out.info["level_iterations"] == [8, 4, 2]
    assert torch.equal(runs[0], runs[1])
    assert STAGE_PRESETS["syn"]["intersubject"]["window"] == (9, 7, 5)
    ctx = StageContext(fixed, moving, stage="syn", metric="lncc", options=dict(preset="brain"))
    with pytest.raises(MedregError, match="unknown syn preset 'brain'"):
        resolve(STAGES, "syn", "stage")(ctx, None)


def test_syn_preset_with_other_levels_says_what_to_give(slice_case):
    fixed, moving, _, _ = slice_case
    ctx = StageContext(fixed, moving, stage="syn", metric="lncc",
                       options=dict(preset="intersubject", levels="2,1"))
    with pytest.raises(MedregError, match="preset 'intersubject' sets window for 3 levels"):
        resolve(STAGES, "syn", "stage")(ctx, None)


def test_resizer_pools_whole_blocks_like_area_averaging():
    """An exact 2x field grid takes block sums down and the separable doubling up; both
    agree with the general area average and trilinear interpolation."""
    grid = Grid((12, 10, 8), (1.5, 1.0, 2.0), (3.0, -2.0, 1.0))
    field_grid = grid.downsample(2)
    rs = _Resizer(field_grid, grid)
    assert rs.factors == (2, 2, 2)
    x = torch.randn(1, 3, *grid.shape, dtype=torch.float64)
    assert torch.allclose(rs.down(x), area_average(x, field_grid.shape), atol=1e-12)
    v = torch.randn(1, 3, *field_grid.shape, dtype=torch.float64)
    ref = torch.nn.functional.interpolate(v, size=grid.shape, mode="trilinear",
                                          align_corners=False)
    assert torch.allclose(rs.up(v), ref, atol=1e-12)


def test_doubled_grid_of_odd_sizes_moves_fields_by_whole_blocks():
    """Odd sizes: the doubled grid reaches one voxel beyond; up- and down-sampling through it
    agree with world-space interpolation and with block means (the last block one voxel)."""
    grid = oblique_grid((7, 6, 5))
    fg = doubled_grid(grid)
    assert fg.size == (4, 3, 3) and np.allclose(fg.spacing, 2 * np.asarray(grid.spacing))
    assert doubling_factors(fg, grid) == (2, 2, 2) and doubling_factors(grid.downsample(2),
                                                                       grid) is None
    assert doubled_grid(grid.downsample(1)).is_close(fg)
    rs = _Resizer(fg, grid)
    v = torch.randn(1, 3, *fg.shape, dtype=torch.float64)
    world = vectors_to_channels(sample_field(v, fg, grid.world_points(torch.float64))[None])
    assert torch.allclose(rs.up(v), world, atol=1e-9)  # linear in world mm, border repeated
    x = torch.randn(1, 1, *grid.shape, dtype=torch.float64)
    down = rs.down(x)
    assert torch.allclose(down[0, 0, 0, 0, 0], x[0, 0, :2, :2, :2].mean())
    assert torch.allclose(down[0, 0, -1, -1, -1], x[0, 0, -1:, -2:, -1:].mean())  # 5, 6, 7
