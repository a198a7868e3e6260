"""Landmark definitions, ray-pair triangulation and bone snapping on known geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.errors import MedregError
from medreg.xray.geometry import CArmGeometry, canonical_pose, pose_grid, project
from medreg.xray.landmarks import (
    LANDMARKS,
    NAMES,
    landmarks_from_labels,
    load_landmarks,
    save_landmarks,
)
from medreg.xray.prepare import (
    bone_surface,
    pair_midpoints,
    phase2a_poses,
    snap_to_surface,
    triangulate,
)

G = CArmGeometry().scaled(2)


def test_landmark_rules_on_a_synthetic_label_map(tmp_path):
    grid = Grid((60, 50, 40), (2.0, 2.0, 2.5), (-60.0, -50.0, -50.0))
    arr = np.zeros(grid.shape, np.int16)
    structures = {}
    for d in LANDMARKS:
        structures.setdefault(d.structure, len(structures) + 1)
    # every structure a one-slice box of its own: x index 10..30
    for lab in structures.values():
        arr[lab % 40, (lab // 40) * 20 + 2:(lab // 40) * 20 + 12, 10:31] = lab
    lab_img = Image(torch.from_numpy(arr)[None], grid)
    pts = landmarks_from_labels(lab_img, structures, depth=1.0)
    assert pts.shape == (23, 3)
    for d, p in zip(LANDMARKS, pts, strict=True):
        lab = structures[d.structure]
        kji = np.argwhere(arr == lab)
        world = grid.index_to_world(kji[:, ::-1].astype(float))
        if d.rule == "centroid":
            assert np.allclose(p, world.mean(0))
        elif d.direction[0] > 0:  # tip toward the patient's left: x index 30
            assert np.isclose(p[0], grid.index_to_world([[30, 0, 0]])[0, 0])
        elif d.direction[0] < 0:
            assert np.isclose(p[0], grid.index_to_world([[10, 0, 0]])[0, 0])
        else:  # superior / inferior tips: only one slice thick here
            assert np.isclose(p[2], world[:, 2].mean())
    save_landmarks(tmp_path / "l.csv", pts)
    names, back = load_landmarks(tmp_path / "l.csv")
    assert names == NAMES and np.allclose(back, pts, atol=1e-4)
    with pytest.raises(MedregError, match="no voxels"):
        landmarks_from_labels(Image(torch.zeros_like(lab_img.tensor), grid), structures)


def test_pair_midpoints_closed_form():
    o = np.array([[0.0, 0, 0], [0.0, 0, 10]])
    d = np.array([[1.0, 0, 0], [0.0, 1, 0]])  # skew lines 10 mm apart, common perpendicular on z
    mids, dist = pair_midpoints(o, d, tau=12.0)
    assert np.allclose(mids, [[0, 0, 5]]) and np.allclose(dist, [10.0])
    assert len(pair_midpoints(o, d, tau=6.0)[0]) == 0  # further apart than tau: dropped


def test_triangulation_recovers_points_from_noisy_detections():
    rng = np.random.default_rng(0)
    iso = np.array([5.0, 10.0, -120.0])
    pts = iso + rng.uniform(-60, 60, (5, 3))
    poses = phase2a_poses(iso, G)
    assert poses.shape == (90, 4, 4)
    uv = np.stack([project(pts, p, G) for p in poses]) + rng.normal(0, 0.3, (90, 5, 2))
    conf = np.ones((90, 5))
    conf[:, 4] = 0.0  # never detected
    uv[::9, 1] += 25.0  # every 9th detection of landmark 1 is wrong
    med, n_rays, n_pairs = triangulate(uv, conf, poses, G, tau=6.0)
    assert np.linalg.norm(med[:4] - pts[:4], axis=-1).max() < 1.5
    assert np.isnan(med[4]).all() and n_rays[4] == 0
    assert n_pairs[1] < n_pairs[0]  # the wrong rays were dropped by tau


def test_bone_surface_snapping_on_a_shell():
    grid = Grid((50, 50, 50), (1.0, 1.0, 1.0), (-24.5, -24.5, -24.5))
    r = torch.sqrt((grid.world_points(torch.float64) ** 2).sum(-1))
    hu = torch.where((r > 10) & (r < 14), 350.0, 0.0)
    hu = torch.where(r <= 10, 900.0, hu)  # dense core is above the snapping range
    ct = Image(hu[None].float(), grid)
    surf = bone_surface(ct)
    radii = np.linalg.norm(surf, axis=-1)
    assert radii.min() > 9.5 and radii.max() < 14.5
    p = np.array([[20.0, 0.5, -0.3], [0.0, 0.0, 1.0], [100.0, 0, 0]])
    snapped, dist = snap_to_surface(p, surf, max_mm=20.0)
    assert abs(np.linalg.norm(snapped[0]) - 13.5) < 1.0 and abs(dist[0] - 6.5) < 1.0
    assert abs(np.linalg.norm(snapped[1]) - 10.5) < 1.0  # from inside, to the inner surface
    assert np.isinf(dist[2]) and np.allclose(snapped[2], p[2])  # nothing within 20 mm
    with pytest.raises(MedregError, match="no bone"):
        bone_surface(Image(torch.zeros(1, 5, 5, 5), Grid((5, 5, 5))))
    # pose_grid sanity: the canonical pose is in the phase-2a set (rz=0 is not, rx=0 is)
    grid_poses = pose_grid(canonical_pose(np.zeros(3), G), np.zeros(3), rx=[0.0], ry=[0.0],
                           rz=[0.0])
    assert np.allclose(grid_poses[0], canonical_pose(np.zeros(3), G))
