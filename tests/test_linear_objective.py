"""The linear objective's fast path (WarpedValues) against the grid_sample + autograd path."""

from __future__ import annotations

import pytest
import torch

from medreg import Affine, Image, Similarity
from medreg.metrics import get_metric
from medreg.registration.objective import LevelObjective
from medreg.transforms.base import Compose
from tests.conftest import blob_image, oblique_grid


def _transform(kind: str, grid):
    kw = dict(center=grid.center(), radius=20.0)
    if kind == "affine":  # affine in its parameters: the constant-Jacobian path
        return Affine(3, [[1.05, 0.02, 0.0], [0.0, 0.97, 0.03], [0.01, 0.0, 1.0]],
                      [1.5, -2.0, 0.5], **kw)
    return Similarity(3, rotation=[0.05, -0.03, 0.08], translation=[1.5, -2.0, 0.5], scale=1.04,
                      **kw)  # not affine in them: autograd from the index map on


@pytest.mark.parametrize("metric", ["mi", "ncc", "mse"])
@pytest.mark.parametrize("samples", [700, None])
@pytest.mark.parametrize("kind", ["affine", "similarity"])
def test_fast_path_matches_grid_sample_path(metric, samples, kind):
    grid = oblique_grid((14, 12, 10))
    moving_grid = oblique_grid((13, 12, 11), angle_deg=25.0)
    fixed, moving = blob_image(grid, seed=0).to(torch.float64), blob_image(moving_grid, seed=1)
    moving = moving.to(torch.float64)
    mask = Image(torch.ones((1, *moving_grid.shape)), moving_grid)
    mask.tensor[:, :, :, :4] = 0  # a moving mask that cuts the overlap
    kw = dict(samples=samples, moving_mask=mask, dtype=torch.float64, seed=3, off_grid=True)
    obj = LevelObjective(fixed, moving, get_metric(metric, bins=16) if metric == "mi"
                         else get_metric(metric), **kw)
    t = _transform(kind, grid)
    fast = obj(t)
    (g_fast,) = torch.autograd.grad(fast, t.params)
    slow = obj(Compose(t))  # a linear transform that is not a LinearTransform: grid_sample
    (g_slow,) = torch.autograd.grad(slow, t.params)
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(g_fast, g_slow, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("metric", ["mi", "ncc"])
def test_no_overlap_gives_the_finite_sentinel_and_a_zero_gradient(metric):
    """A transform that maps every fixed point outside the moving image: the huge finite loss
    (line searches step back from it) and no gradient, on the fast and the general path."""
    from medreg.registration.objective import NO_OVERLAP_LOSS

    grid = oblique_grid((10, 9, 8))
    fixed, moving = blob_image(grid, seed=0), blob_image(grid, seed=1)
    obj = LevelObjective(fixed, moving, get_metric(metric), samples=300, seed=1)
    far = Affine(3, translation=[500.0, 0.0, 0.0], center=grid.center(), radius=20.0)
    for t in (far, Compose(far)):
        loss = obj(t)
        (grad,) = torch.autograd.grad(loss, far.params)
        assert float(loss.detach()) == pytest.approx(NO_OVERLAP_LOSS, rel=1e-6)  # float32
        assert torch.count_nonzero(grad) == 0


def test_without_gradients_the_fast_path_gives_the_same_loss():
    """Scoring transforms under ``no_grad`` (initialization) takes the value-only branch."""
    grid = oblique_grid((12, 11, 10))
    fixed, moving = blob_image(grid, seed=0), blob_image(grid, seed=1)
    obj = LevelObjective(fixed, moving, get_metric("mi", bins=16), samples=500, seed=2)
    t = Affine(3, translation=[1.0, -0.5, 0.25], center=grid.center(), radius=20.0)
    with_grad = obj(t)
    with torch.no_grad():
        without = obj(t)
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach())
