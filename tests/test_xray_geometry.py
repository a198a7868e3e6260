"""C-arm conventions checked with point sources whose projections are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest

from medreg.errors import MedregError
from medreg.xray.geometry import (
    CArmGeometry,
    backproject,
    canonical_pose,
    load_pose,
    perturbation,
    pose_from_params,
    project,
    random_poses,
    rotation_error_deg,
    save_pose,
    source_position,
)

ISO = np.array([10.0, -20.0, -150.0])


def test_canonical_pose_points_project_where_expected():
    g = CArmGeometry()
    pose = canonical_pose(ISO, g)
    mag = g.focal / g.sid  # pixels per mm at the isocentre
    uv = project(np.stack([ISO, ISO + [10, 0, 0], ISO + [0, 0, 10], ISO + [0, 50, 0]]), pose, g)
    assert np.allclose(uv[0], [g.cu, g.cv])
    assert np.allclose(uv[1], [g.cu + 10 * mag, g.cv])  # patient left -> larger column u
    assert np.allclose(uv[2], [g.cu, g.cv - 10 * mag])  # superior -> smaller row v
    assert np.allclose(uv[3], [g.cu, g.cv])  # along the beam (posterior) -> same pixel
    src = source_position(pose)
    assert np.allclose(src, ISO - [0, g.sid, 0])  # the source is anterior (-y in LPS)


def test_pixel_centre_and_principal_point():
    g = CArmGeometry(width=4, height=3, pixel_size=2.0, sdd=1000.0, sid=500.0)
    assert (g.cu, g.cv) == (1.5, 1.0)
    k = g.intrinsics()
    assert k[0, 0] == 500.0 and k[0, 2] == 1.5 and k[1, 2] == 1.0
    # a point on the ray of pixel (0, 0) centre
    pose = np.eye(4)
    x = np.array([(0 - 1.5) / 500.0 * 700, (0 - 1.0) / 500.0 * 700, 700.0])
    assert np.allclose(project(x, pose, g), [0.0, 0.0])


def test_project_backproject_round_trip():
    g = CArmGeometry()
    rng = np.random.default_rng(0)
    pose = pose_from_params(canonical_pose(ISO, g), (20, -10, 35), (5, -8, 12), ISO)
    pts = ISO + rng.normal(0, 60, (50, 3))
    uv = project(pts, pose, g)
    origin, d = backproject(uv, pose, g)
    v = pts - origin
    dist = np.linalg.norm(v - (v * d).sum(-1, keepdims=True) * d, axis=-1)
    assert dist.max() < 1e-8
    assert ((v * d).sum(-1) > 0).all()  # directions point away from the source


def test_scaled_detector_keeps_physical_positions():
    g = CArmGeometry()
    h = g.scaled(2)
    assert (h.width, h.height, h.pixel_size) == (120, 94, 3.2)
    pose = canonical_pose(ISO, g)
    pts = ISO + np.random.default_rng(1).normal(0, 40, (10, 3))
    uv, uvh = project(pts, pose, g), project(pts, pose, h)
    assert np.allclose((uv + 0.5) / 2 - 0.5, uvh, atol=0.02)  # 188/94 and 240/120 are exact


def test_perturbation_is_rigid_about_centre_and_euler_order():
    m = perturbation((10, 0, 0), (0, 0, 0), ISO)
    assert np.allclose(m[:3, :3] @ ISO + m[:3, 3], ISO)
    m = perturbation((0, 0, 90), (1, 2, 3), np.zeros(3))
    assert np.allclose(m[:3, :3] @ [1, 0, 0], [0, 1, 0])  # +90 deg about z: x -> y
    assert np.allclose(m[:3, 3], [1, 2, 3])
    a = perturbation((30, 20, 0), (0, 0, 0), np.zeros(3))[:3, :3]
    rx = perturbation((30, 0, 0), (0, 0, 0), np.zeros(3))[:3, :3]
    ry = perturbation((0, 20, 0), (0, 0, 0), np.zeros(3))[:3, :3]
    assert np.allclose(a, ry @ rx)  # extrinsic x then y
    assert abs(rotation_error_deg(a, rx) - 20.0) < 1e-9


def test_pose_json_round_trip_and_bad_input(tmp_path):
    g = CArmGeometry(width=100, height=80, pixel_size=0.5, cu=40.0)
    p = g.save(tmp_path / "g.json")
    assert CArmGeometry.load(p) == g
    pose = random_poses(canonical_pose(ISO, g), ISO, 1, np.random.default_rng(2))[0]
    save_pose(pose, tmp_path / "p.json")
    assert np.array_equal(load_pose(tmp_path / "p.json"), pose)
    bad = pose.copy()
    bad[:3, :3] *= 2
    with pytest.raises(MedregError, match="rotation"):
        save_pose(bad, tmp_path / "bad.json")
    with pytest.raises(MedregError, match="behind"):
        project(ISO[None], np.eye(4), g)  # the isocentre has z_c < 0 with an identity pose
    with pytest.raises(MedregError, match="sid"):
        CArmGeometry(sdd=500, sid=700)
    with pytest.raises(MedregError, match="unknown geometry keys"):
        CArmGeometry.from_dict({"sdd": 1000, "focal": 3})
