"""PnP recovers known poses from exact and from corrupted projections."""

from __future__ import annotations

import numpy as np
import pytest

from medreg.errors import MedregError
from medreg.xray.geometry import CArmGeometry, canonical_pose, pose_from_params, project
from medreg.xray.geometry import rotation_error_deg as rot_err
from medreg.xray.pnp import solve_pnp

G = CArmGeometry()
ISO = np.array([0.0, 40.0, -120.0])


def _landmarks(rng, n=23):
    return ISO + rng.uniform(-1, 1, (n, 3)) * [110, 60, 140]


@pytest.mark.parametrize("params", [((0, 0, 0), (0, 0, 0)), ((30, -12, 40), (10, -15, 12)),
                                    ((-35, 15, -45), (-15, 15, -15))])
def test_pnp_recovers_pose_from_exact_projections(params):
    rng = np.random.default_rng(3)
    pts = _landmarks(rng)
    gt = pose_from_params(canonical_pose(ISO, G), *params, ISO)
    res = solve_pnp(pts, project(pts, gt, G), G)
    assert res.success and len(res.inliers) == len(pts)
    assert rot_err(res.pose, gt) < 1e-4
    assert np.abs(res.pose[:3, 3] - gt[:3, 3]).max() < 1e-3
    assert res.reprojection_px < 1e-4


def test_pnp_rejects_outliers_and_tolerates_noise():
    rng = np.random.default_rng(4)
    pts = _landmarks(rng)
    gt = pose_from_params(canonical_pose(ISO, G), (10, 5, -20), (4, 0, -6), ISO)
    uv = project(pts, gt, G) + rng.normal(0, 0.5, (len(pts), 2))
    bad = [2, 9, 15]
    uv[bad] += rng.uniform(40, 80, (3, 2))  # three wrong detections
    res = solve_pnp(pts, uv, G)
    assert res.success
    assert not set(bad) & set(res.inliers.tolist())
    assert rot_err(res.pose, gt) < 1.0
    src_err = np.linalg.norm(res.pose[:3, :3].T @ res.pose[:3, 3] - gt[:3, :3].T @ gt[:3, 3])
    assert src_err < 15.0  # depth is the weak direction of a single view


def test_pnp_bad_input():
    rng = np.random.default_rng(5)
    pts = _landmarks(rng, 4)
    with pytest.raises(MedregError, match="too few landmarks"):
        solve_pnp(pts, np.zeros((4, 2)), G)
    with pytest.raises(MedregError, match="as many"):
        solve_pnp(_landmarks(rng, 8), np.zeros((7, 2)), G)
    res = solve_pnp(_landmarks(rng, 10), rng.uniform(0, 240, (10, 2)), G)  # random detections
    assert not res.success and res.pose is None and "inliers" in res.message
