"""Engine: pyramids keep the world extent; optimizer loop stop reasons, history, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medreg import Image
from medreg.engine import OptimizerConfig, gaussian_pyramid, gaussian_smooth, run_optimizer
from medreg.errors import MedregError
from tests.conftest import blob_image, oblique_grid


def test_pyramid_levels_cover_the_same_world_extent():
    img = blob_image(oblique_grid((40, 32, 24)))
    levels = gaussian_pyramid(img, (4, 2, 1))
    assert [lv.grid.size for lv in levels] == [(10, 8, 6), (20, 16, 12), (40, 32, 24)]
    corner = [[-0.5, -0.5, -0.5]]
    for lv in levels:
        np.testing.assert_allclose(lv.grid.index_to_world(corner), img.grid.index_to_world(corner),
                                   atol=1e-9)
        np.testing.assert_allclose(lv.grid.extent, img.grid.extent)
    torch.testing.assert_close(levels[-1].tensor, img.tensor)


def test_gaussian_smooth_preserves_mean_and_matches_variance():
    x = torch.zeros(1, 1, 41, 41, dtype=torch.float64)
    x[0, 0, 20, 20] = 1.0
    y = gaussian_smooth(x, (2.0, 3.0))
    assert float(y.sum()) == pytest.approx(1.0, abs=1e-6)
    r = torch.arange(41, dtype=torch.float64) - 20
    var_h = float((y[0, 0].sum(1) * r**2).sum())
    var_w = float((y[0, 0].sum(0) * r**2).sum())
    assert var_h == pytest.approx(4.0, rel=0.02) and var_w == pytest.approx(9.0, rel=0.02)


@pytest.mark.parametrize("name", ["adam", "gd", "lbfgs"])
def test_optimizers_minimize_a_quadratic(name):
    target = torch.tensor([3.0, -2.0], dtype=torch.float64)
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    lr = {"adam": 0.3, "gd": 0.02, "lbfgs": 1.0}[name]
    cfg = OptimizerConfig(name=name, lr=lr, max_iter=300, tol=1e-10, patience=20,
                          lr_decay=0.99 if name == "adam" else 1.0)
    seen = []
    res = run_optimizer([x], lambda: ((x - target) ** 2).sum(), cfg,
                        callback=lambda i, loss: seen.append(loss))
    torch.testing.assert_close(x.detach(), target, atol=2e-3, rtol=0)
    assert res.stop_reason and res.history == seen and res.iterations == len(seen)


def test_iteration_limit_is_the_recorded_reason():
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    res = run_optimizer([x], lambda: ((x - 100) ** 2).sum(), OptimizerConfig(lr=0.01, max_iter=4))
    assert "iteration limit" in res.stop_reason and res.iterations == 4


def test_nan_loss_is_a_clear_error():
    x = torch.zeros(1, requires_grad=True)
    with pytest.raises(MedregError, match="nan"):
        run_optimizer([x], lambda: (x * float("nan")).sum(), OptimizerConfig(max_iter=3))


def test_bad_config_lists_choices():
    with pytest.raises(ValueError, match="choose from"):
        OptimizerConfig(name="newton")
    with pytest.raises(ValueError):
        OptimizerConfig(max_iter=0)


def test_pyramid_rejects_upsampling():
    with pytest.raises(ValueError):
        gaussian_pyramid(Image(torch.zeros(1, 4, 4), oblique_grid((4, 4))), (0.5, 1))


def test_fast_and_differentiable_smoothing_agree():
    x = torch.rand(1, 2, 9, 12, 10, dtype=torch.float64)
    fast = gaussian_smooth(x, (1.0, 0.0, 2.5))
    slow = gaussian_smooth(x.clone().requires_grad_(True), (1.0, 0.0, 2.5))
    torch.testing.assert_close(fast, slow.detach())


def test_averaged_stochastic_adam_beats_its_last_iterate():
    """Noisy gradients of a quadratic: the mean of the last iterates is closer than the last."""
    target = torch.tensor([3.0, -2.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    last = []

    def loss():
        noise = torch.randn(2, generator=gen, dtype=torch.float64)
        return ((p - target) ** 2).sum() + (p * noise).sum()  # unbiased noisy gradient

    def remember(it, value):
        last.append(p.detach().clone())

    res = run_optimizer([p], loss, OptimizerConfig(name="adam", lr=0.2, max_iter=200,
                                                   average=0.5), callback=remember)
    assert res.iterations == 200 and "mean of the last 100 iterates" in res.stop_reason
    torch.testing.assert_close(p.detach(), torch.stack(last[100:]).mean(0), rtol=0, atol=1e-12)
    assert float((p.detach() - target).norm()) < 0.1
    assert float((p.detach() - target).norm()) < 0.5 * float((last[-1] - target).norm())


def test_averaging_needs_a_first_order_optimizer():
    with pytest.raises(ValueError, match="average"):
        OptimizerConfig(name="lbfgs", average=0.5)
    with pytest.raises(ValueError, match="average"):
        OptimizerConfig(name="adam", average=1.0)


def test_pyramid_box_shrink_matches_blur_then_resample():
    """Even sizes take the box-average shrink (blur after shrinking); odd ones resample. The
    shrink must land on ``grid.downsample(f)`` and keep the blurred image within a few percent
    of blurring first and resampling."""
    from medreg.engine.pyramid import smooth_image
    from medreg.resample import resample

    grid = oblique_grid((40, 36, 32))
    img = blob_image(grid, seed=3)
    levels = gaussian_pyramid(img, (4, 2, 1))
    for level, f in zip(levels, (4, 2, 1), strict=True):
        assert level.grid.is_close(grid.downsample(f))
    torch.testing.assert_close(levels[2].tensor, img.tensor)  # finest level: no blur
    base = min(grid.spacing)
    for level, f in zip(levels[:2], (4, 2), strict=True):
        ref = resample(smooth_image(img, 0.5 * f * base), grid.downsample(f)).tensor
        peak = float(ref.abs().max())
        assert float((level.tensor - ref).abs().max()) < 0.05 * peak
