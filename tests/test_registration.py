"""Known-transform recovery in 2D and 3D, on synthetic and real images; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import medreg
from medreg import Affine, Image, Rigid, Translation, read_image, resample
from medreg.engine import smooth_image
from medreg.errors import MedregError
from medreg.transforms.rotations import rotation_angle_deg
from tests.conftest import ITK2D, MNI_T1, blob_image, need, oblique_grid


def _error_mm(est, true, points: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        err = (est(points) - true(points)).norm(dim=-1)
    return float(err.mean()), float(err.max())


@pytest.fixture(scope="module")
def mni4():
    """MNI152 2009a at 4 mm (float32) and its head mask."""
    img = read_image(need(MNI_T1)).float()
    grid = img.grid.downsample(4)
    small = resample(smooth_image(img, 1.5), grid)
    return small, small.with_tensor((small.tensor > 15).float())


def test_translation_2d_synthetic_exact():
    g = oblique_grid((64, 56))
    fixed = blob_image(g)
    true = Translation(2, [3.3, -4.1])
    moving = resample(fixed, g, true.inverse())
    res = medreg.register(fixed, moving, transform="translation", metric="mse",
                          levels=(2, 1), iterations=(50, 50))
    pts = g.world_points(torch.float64).reshape(-1, 2)
    assert _error_mm(res.transform, true, pts)[0] < 0.05
    assert res.history and res.stop_reason


def test_rigid_3d_oblique_grids_recovered():
    g = oblique_grid((40, 36, 32))
    fixed = blob_image(g, seed=4)
    true = Rigid(3, [0.08, -0.05, 0.1], [2.0, -3.0, 1.5], center=g.center())
    moving = resample(fixed, g, true.inverse())
    res = medreg.register(fixed, moving, transform="rigid", metric="ncc", levels=(2, 1))
    pts = g.world_points(torch.float64).reshape(-1, 3)
    mean, worst = _error_mm(res.transform, true, pts)
    assert mean < 0.1 and worst < 0.25


def test_brainweb_slice_rotation_10_degrees():
    fixed = read_image(need(ITK2D / "BrainProtonDensitySliceBorder20.png")).float()
    moving = read_image(need(ITK2D / "BrainProtonDensitySliceRotated10.png")).float()
    res = medreg.register(fixed, moving, transform="rigid", metric="mi", init="geometry")
    m = res.transform.matrix().detach().numpy()
    assert rotation_angle_deg(m[:2, :2]) == pytest.approx(10.0, abs=0.05)
    from medreg.metrics.functional import ncc

    correlation = 1 - float(ncc(fixed.batch, res.warped.batch))
    assert correlation > 0.99


def test_brainweb_slice_shift_13_17():
    fixed = read_image(need(ITK2D / "BrainProtonDensitySliceBorder20.png")).float()
    moving = read_image(need(ITK2D / "BrainProtonDensitySliceShifted13x17y.png")).float()
    res = medreg.register(fixed, moving, transform="translation", metric="mse")
    t = res.transform.matrix().detach().numpy()[:2, 2]
    # the moving slice shows the anatomy shifted by (+13, +17) px: T(x) = x + (13, 17)
    np.testing.assert_allclose(t, [13.0, 17.0], atol=0.1)


def _mni_case(mni4, seed: int):
    fixed, mask = mni4
    rng = np.random.default_rng(seed)
    r = Rotation.from_euler("xyz", rng.uniform(-8, 8, 3), degrees=True).as_matrix()
    true = Affine(3, r @ np.diag(rng.uniform(0.95, 1.05, 3)), rng.uniform(-8, 8, 3),
                  center=fixed.grid.center())
    moving = resample(fixed, fixed.grid, true.inverse())
    pts = fixed.grid.world_points(torch.float64)[mask.tensor[0] > 0]
    return fixed, moving, true, pts


def test_mni_affine_mono_modal(mni4):
    fixed, moving, true, pts = _mni_case(mni4, 1)
    noisy = moving.with_tensor(moving.tensor + torch.randn_like(moving.tensor))
    res = medreg.register(fixed, noisy, transform="rigid,affine", metric="ncc")
    mean, worst = _error_mm(res.transform, true, pts)
    assert mean < 0.25 and worst < 0.6, (mean, worst)  # 4 mm voxels: < 1/16 voxel on average
    assert [s["name"] for s in res.stages] == ["rigid", "affine"]


def test_mni_affine_multimodal_mi_with_non_monotonic_remap(mni4):
    fixed, moving, true, pts = _mni_case(mni4, 2)
    v = moving.tensor / float(moving.tensor.max())
    remapped = moving.with_tensor(100 * (3.2 * v * (1 - v) + 0.2 * v))
    for metric in ("mi", "nmi"):
        res = medreg.register(fixed, remapped, transform="affine", metric=metric)
        mean, worst = _error_mm(res.transform, true, pts)
        assert mean < 0.35 and worst < 0.8, (metric, mean, worst)
    # and a monotonic metric cannot do it
    bad = medreg.register(fixed, remapped, transform="affine", metric="ncc")
    assert _error_mm(bad.transform, true, pts)[0] > 1.0


def test_same_seed_same_result(mni4):
    fixed, moving, _, _ = _mni_case(mni4, 3)
    kw = dict(transform="affine", metric="mi", iterations=(10, 8, 5))
    a = medreg.register(fixed, moving, seed=7, **kw).transform.matrix()
    b = medreg.register(fixed, moving, seed=7, **kw).transform.matrix()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("init", ["geometry", "com", "moments", "search"])
def test_initializers_handle_large_offsets(mni4, init):
    fixed, mask = mni4
    true = Rigid(3, [0, 0, np.deg2rad(25) if init in ("moments", "search") else 0.0],
                 [25.0, -20.0, 15.0], center=fixed.grid.center())
    moving = resample(fixed, fixed.grid, true.inverse())
    res = medreg.register(fixed, moving, transform="rigid", metric="mse", init=init)
    pts = fixed.grid.world_points(torch.float64)[mask.tensor[0] > 0]
    assert _error_mm(res.transform, true, pts)[0] < 0.5


def test_masks_restrict_the_metric():
    g = oblique_grid((48, 40))
    fixed = blob_image(g, seed=1)
    true = Translation(2, [2.0, 1.0])
    moving = resample(fixed, g, true.inverse())
    # corrupt one side of the moving image; masks that exclude it keep the answer
    side = g.world_points(torch.float64)[..., 0] > float(g.center()[0]) + 3.0
    noise = torch.rand(moving.tensor.shape, generator=torch.Generator().manual_seed(0)) * 3
    corrupted = moving.with_tensor(torch.where(side[None], noise, moving.tensor))
    mmask = Image((~side)[None].float(), g)
    fmask = resample(mmask, g, true)
    fmask = fmask.with_tensor((fmask.tensor > 0.5).float())
    pts = g.world_points(torch.float64).reshape(-1, 2)
    kw = dict(transform="translation", metric="mse", levels=(1,))  # no blur across the cut
    masked = medreg.register(fixed, corrupted, fixed_mask=fmask, moving_mask=mmask, **kw)
    plain = medreg.register(fixed, corrupted, **kw)
    err_masked = _error_mm(masked.transform, true, pts)[0]
    assert err_masked < 0.2
    assert _error_mm(plain.transform, true, pts)[0] > 3 * err_masked


def test_bad_input_messages():
    g3 = oblique_grid((8, 8, 8))
    g2 = oblique_grid((8, 8))
    img3 = blob_image(g3)
    with pytest.raises(MedregError, match="3D but moving image is 2D"):
        medreg.register(img3, blob_image(g2))
    nan = img3.with_tensor(img3.tensor.clone())
    nan.tensor[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        medreg.register(img3, nan)
    with pytest.raises(MedregError, match="empty"):
        medreg.register(img3, img3, fixed_mask=img3.with_tensor(torch.zeros_like(img3.tensor)))
    with pytest.raises(MedregError, match="unknown transform"):
        medreg.register(img3, img3, transform="rigid,warp")
    with pytest.raises(MedregError, match="unknown metric"):
        medreg.register(img3, img3, metric="cc")
    with pytest.raises(MedregError, match="not found"):
        medreg.register("missing.nii.gz", img3)


def test_stochastic_batches_are_stratified_memory_ordered_and_cycle():
    from medreg.metrics import get_metric
    from medreg.registration.objective import LevelObjective

    g = oblique_grid((30, 20, 10))
    img = blob_image(g)
    obj = LevelObjective(img, img, get_metric("mse"), samples=500, resample_every_call=True,
                         batches=3, seed=5, off_grid=False)
    idx = torch.as_tensor(g.world_to_index(obj.points.numpy())).round().long()
    flat = idx[:, 0] + 30 * (idx[:, 1] + 20 * idx[:, 2])
    assert bool((flat[1:] > flat[:-1]).all())  # memory order, no repeats
    assert bool(((flat // 12) == torch.arange(500)).all())  # one point in each run of 12 voxels
    torch.testing.assert_close(obj.values[0], img.tensor.reshape(-1)[flat])
    t = Translation(3, [0.0, 0.0, 0.0])
    seen = []
    for _ in range(4):
        obj(t)
        seen.append(obj.points.clone())
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    torch.testing.assert_close(seen[3], seen[0])  # the 3 batches are used in turn
    again = LevelObjective(img, img, get_metric("mse"), samples=500, resample_every_call=True,
                           batches=3, seed=5, off_grid=False)
    torch.testing.assert_close(again.points, seen[0])


def test_linear_schedule_plans_levels():
    from medreg.registration.linear import LinearOptions

    opts = LinearOptions.from_options({})
    assert opts.stochastic and opts.iterations == (30, 30, 40)
    assert opts.level_plan(0, 5_000, needs_grid=False) == ("lbfgs", None, False)
    assert opts.level_plan(2, 1_000_000, needs_grid=False) == ("adam", 16_000, True)
    assert opts.level_plan(1, 1_000_000, needs_grid=False) == ("adam", 4000, True)
    assert opts.level_plan(0, 1_000_000, needs_grid=False) == ("adam", 2000, True)
    per_level = LinearOptions.from_options({"samples": [500, None, "auto"]})
    assert per_level.level_plan(0, 10**6, False) == ("adam", 500, True)
    assert per_level.level_plan(1, 10**6, False) == ("lbfgs", None, False)
    assert per_level.level_plan(2, 10**6, False) == ("adam", 16_000, True)
    with pytest.raises(MedregError, match="sample count per level"):
        LinearOptions.from_options({"samples": [1000, 2000]})
    lncc = LinearOptions.from_options({}, needs_grid=True)
    assert not lncc.stochastic and lncc.iterations == (60, 40, 25)
    assert lncc.level_plan(0, 10**6, True) == ("adam", None, False)
    assert lncc.level_plan(2, 10**6, True) == ("lbfgs", None, False)
    fixed = LinearOptions.from_options({"stochastic": False})
    assert fixed.level_plan(2, 10**6, False) == ("lbfgs", 100_000, False)
    with pytest.raises(MedregError, match="stochastic"):
        LinearOptions.from_options({"stochastic": "sometimes"})


def test_check_finite_counts_bad_voxels_and_accepts_huge_finite_ones():
    """Opposite infinities cancel to NaN in the sum and are still caught; finite values whose
    sum overflows are still accepted."""
    img = blob_image(oblique_grid((6, 5, 4)))
    bad = img.with_tensor(img.tensor.clone())
    bad.tensor.view(-1)[:2] = torch.tensor([float("inf"), float("-inf")])
    with pytest.raises(ValueError, match="2 NaN/Inf voxels"):
        bad.check_finite("moving")
    huge = img.with_tensor(torch.full_like(img.tensor, 3e38))
    assert huge.check_finite() is huge
