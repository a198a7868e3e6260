"""Recovery of a known smooth diffeomorphism on Colin27 with its AAL labels (real data).

The moving image (and its labels) is Colin27 warped at 1 mm by ``exp(-v)`` for a random velocity
``v``, then the image is reduced to 4 mm like the fixed one, so the true fixed->moving mapping is
``exp(v)``. Dice compares the fixed 4 mm labels with the 1 mm moving labels pulled through the
estimate (nearest neighbour); the true warp scores 0.95 that way, identity 0.80.
"""

from __future__ import annotations

import pytest
import torch

from medreg.core.image import Image
from medreg.deformable.pyramid import smooth_downsample
from medreg.deformable.synthetic import random_velocity
from medreg.evaluation import dice, jacobian_stats
from medreg.io.images import read_image
from medreg.registration.plugins import STAGES, StageContext, resolve
from medreg.resample import resample
from tests.conftest import SHARED, need

COLIN = SHARED / "brain/colin27"
RES = 4.0


@pytest.fixture(scope="module")
def case():
    img = read_image(need(COLIN / "ch2bet.nii.gz")).float()
    lab = read_image(need(COLIN / "aal.nii.gz"))
    grid = img.grid.downsample(RES)
    true = random_velocity(img.grid.downsample(4), mean_mm=3.0, smoothness_mm=15.0, seed=1)
    moving_1mm = resample(img, img.grid, true.inverse())
    fixed = smooth_downsample(img, RES, grid)
    moving = smooth_downsample(moving_1mm, RES, grid)
    lab_f = resample(lab, grid, interpolation="nearest")
    lab_m = resample(lab, lab.grid, true.inverse(), interpolation="nearest")  # 1 mm
    brain = lab_f.tensor[0] > 0
    return dict(fixed=fixed, moving=moving, lab_f=lab_f, lab_m=lab_m, true=true, brain=brain)


def _errors(case, transform):
    pts = case["fixed"].grid.world_points()
    with torch.no_grad():
        truth = case["true"](pts)
        err = (transform(pts) - truth).norm(dim=-1)[case["brain"]]
        before = (truth - pts).norm(dim=-1)[case["brain"]]
    return float(before.mean()), float(err.mean())


@pytest.mark.parametrize("stage, max_err, min_dice", [
    ("syn", 0.55, 0.92),
    ("svf", 0.8, 0.90),
    ("bspline", 1.0, 0.88),
])
def test_recovers_known_warp(case, stage, max_err, min_dice):
    opts = dict(levels=(2, 1), iterations=(60, 30), metric="lncc")
    ctx = StageContext(case["fixed"], case["moving"], stage=stage, metric="lncc", options=opts)
    out = resolve(STAGES, stage, "stage")(ctx, None)
    before, after = _errors(case, out.transform)
    assert before > 2.0  # the warp is large enough to matter
    assert after < max_err, f"{stage}: mean error {after:.3f} mm (was {before:.3f})"
    warped = resample(case["lab_m"], case["lab_f"].grid, out.transform, interpolation="nearest")
    unwarped = resample(case["lab_m"], case["lab_f"].grid, interpolation="nearest")
    d_before = dice(case["lab_f"], unwarped)["mean"]  # about 0.80; 0.95 with the true warp
    d_after = dice(case["lab_f"], warped)["mean"]
    assert d_after > min_dice and d_after > d_before + 0.08, (d_before, d_after)
    stats = jacobian_stats(out.transform, case["fixed"].grid, case["brain"])
    assert stats["folding_percent"] == 0.0
    assert out.info["peak_memory_bytes"] > 0 and out.info["memory_estimate_bytes"] > 0


def test_syn_inverse_is_consistent(case):
    opts = dict(levels=(2, 1), iterations=(40, 20))
    ctx = StageContext(case["fixed"], case["moving"], stage="syn", metric="lncc", options=opts)
    out = resolve(STAGES, "syn", "stage")(ctx, None)
    pts = case["fixed"].grid.world_points()
    with torch.no_grad():
        back = out.inverse(out.transform(pts))
    err = (back - pts).norm(dim=-1)[case["brain"]]
    # limited by linear interpolation of the 8 mm velocity grids inside scaling and squaring
    assert float(err.mean()) < 0.3 and float(err.max()) < 2.0


def test_syn_with_linear_init_composes(case):
    """The stage output is the full mapping: a known shift given as init is kept."""
    from medreg.transforms import Translation

    shift = Translation(3, translation=[3.0, -2.0, 1.0])
    moved = Image(case["moving"].tensor, case["moving"].grid.with_(
        origin=tuple(o - s for o, s in zip(case["moving"].grid.origin, (3.0, -2.0, 1.0),
                                           strict=True))))
    ctx = StageContext(case["fixed"], moved, stage="syn", metric="lncc",
                       options=dict(levels=(2, 1), iterations=(40, 20)))
    out = resolve(STAGES, "syn", "stage")(ctx, shift.inverse())
    pts = case["fixed"].grid.world_points()
    with torch.no_grad():
        truth = case["true"](pts) - torch.tensor([3.0, -2.0, 1.0])
        err = (out.transform(pts) - truth).norm(dim=-1)[case["brain"]]
    assert float(err.mean()) < 0.8


def test_deformable_metric_applies_to_the_deformable_stage_only(case):
    """``metric`` drives the linear stages, ``deformable_metric`` the ``syn`` stage."""
    from medreg.registration.api import register

    res = register(case["fixed"], case["moving"], transform="affine,syn", metric="mi",
                   deformable_metric="lncc", init="none", levels=(2, 1),
                   iterations=(20, 10))
    syn = res.stages[1]
    assert syn["name"] == "syn" and syn["info"]["metric"] == "lncc"
    before, after = _errors(case, res.transform)
    assert after < 0.8 * before
