"""Similarities and intensity-based refinement (BOBYQA, Adam) recovering known poses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.errors import MedregError
from medreg.xray.drr import render_reference
from medreg.xray.geometry import (
    CArmGeometry,
    canonical_pose,
    perturbation,
    pose_from_params,
    project,
    to_camera,
)
from medreg.xray.refine import Level, Pyramid, bin_xray, refine_pose, xray_tensor
from medreg.xray.similarity import gradncc, lncc, ncc
from tests.conftest import SHARED, need

CHEST = SHARED / "ct/chest/cxr.nii.gz"


@pytest.mark.parametrize("fn", [ncc, lncc, gradncc])
def test_similarities_are_one_for_affine_intensity_copies(fn):
    a = torch.rand(1, 1, 30, 40)
    a = torch.nn.functional.avg_pool2d(a, 3, 1, 1)  # some structure for LNCC windows
    b = torch.cat([3.0 * a + 2.0, torch.rand(1, 1, 30, 40)])
    s = fn(a, b)
    assert s.shape == (2,)
    assert abs(s[0].item() - 1.0) < 1e-3
    assert s[1].item() < 0.5


def test_xray_size_must_match_geometry():
    g = CArmGeometry(width=40, height=30)
    assert xray_tensor(np.zeros((30, 40)), g).shape == (1, 1, 30, 40)
    with pytest.raises(MedregError, match="40x30"):
        xray_tensor(np.zeros((40, 30)), g)
    with pytest.raises(MedregError, match="unknown X-ray metric"):
        refine_pose(np.zeros((30, 40)), Image(torch.zeros(1, 4, 4, 4), Grid((4, 4, 4))), g,
                    np.eye(4), metric="mi")


def test_binned_detector_is_exact_block_averaging():
    g = CArmGeometry(width=120, height=94, pixel_size=3.2)
    b, (r0, c0) = g.binned(4)
    assert (b.width, b.height, b.pixel_size, r0, c0) == (30, 23, 12.8, 1, 0)
    # an image whose pixels hold their own (u, v) bins to the binned pixel centres' (u, v)
    v, u = torch.meshgrid(torch.arange(94.0), torch.arange(120.0), indexing="ij")
    ub, vb = (bin_xray(t[None, None], 4, b, (r0, c0))[0, 0] for t in (u, v))
    jb, ib = torch.meshgrid(torch.arange(23.0), torch.arange(30.0), indexing="ij")
    torch.testing.assert_close(ub, (ib + 0.5) * 4 - 0.5 + c0)
    torch.testing.assert_close(vb, (jb + 0.5) * 4 - 0.5 + r0)
    # and the binned geometry projects world points onto those same centres
    pose = canonical_pose(np.zeros(3), g)
    pts = np.random.default_rng(0).normal(0, 80, (6, 3))
    full, small = project(pts, pose, g), project(pts, pose, b)
    np.testing.assert_allclose((small + 0.5) * 4 - 0.5 + [c0, r0], full, atol=1e-9)
    with pytest.raises(MedregError, match="cannot bin"):
        g.binned(60)


def _errors(pose, gt, pts, g):
    tre = np.linalg.norm(to_camera(pts, pose) - to_camera(pts, gt), axis=-1).mean()
    mpd = np.linalg.norm(project(pts, pose, g) - project(pts, gt, g), axis=-1).mean()
    return tre, mpd * g.pixel_size


@pytest.fixture(scope="module")
def chest():
    from medreg.io.images import read_image

    return read_image(need(CHEST), dtype=torch.float32)


def test_bobyqa_ncc_recovers_pose_on_real_chest_ct(chest):
    g = CArmGeometry().scaled(2)  # 120x94 fast detector
    iso = chest.grid.center()
    gt = pose_from_params(canonical_pose(iso, g), (8, -6, 15), (4, -6, 7), iso)
    # test X-ray: full-resolution CT, 0.5 mm steps, random offsets, plus noise (no inverse crime)
    xray = render_reference(chest, g, gt, step=0.5, supersample=1)
    xray = xray + 0.01 * xray.std() * torch.randn_like(xray)
    start = gt @ perturbation((4, -3, 3), (-7, 6, 8), iso)
    pts = iso + np.random.default_rng(0).normal(0, 50, (30, 3))
    tre0, _ = _errors(start, gt, pts, g)
    pyramid = Pyramid(chest, g)  # the default levels: 30x23 on 10 mm, 60x47 on 2.5 mm
    res = refine_pose(xray[0, 0], pyramid, g, start, metric="ncc")
    tre, mpd = _errors(res.pose, gt, pts, g)
    assert tre0 > 8.0
    assert tre < 2.0 and mpd < 1.0, (tre, mpd)
    assert res.similarity > res.initial_similarity
    assert res.evaluations <= 200, res.history  # about 85: 50 coarse + 35 fine renders
    assert [h["detector"] for h in res.history] == [[30, 23], [60, 47]]
    # the CT itself gives the same result (the pyramid is built inside, deterministically)
    again = refine_pose(xray[0, 0], chest, g, start, metric="ncc")
    np.testing.assert_allclose(again.pose, res.pose, atol=1e-9)
    with pytest.raises(MedregError, match="another C-arm"):
        refine_pose(xray[0, 0], pyramid, dataclasses.replace(g, sid=850.0), start)
    with pytest.raises(MedregError, match="levels"):
        refine_pose(xray[0, 0], pyramid, g, start, levels=(Level(1.0, 5.0, 1.0, 5),))
    inside = gt.copy()
    inside[2, 3] -= g.sid  # the source at the isocentre: half the CT behind it
    with pytest.raises(MedregError, match="behind the X-ray source"):
        refine_pose(xray[0, 0], pyramid, g, inside)


def test_adam_recovers_translation_on_blob_phantom():
    grid = Grid((40, 40, 40), (2.0, 2.0, 2.0), (-39.0, -39.0, -39.0))
    pts = grid.world_points(torch.float64)
    hu = torch.full(grid.shape, -1000.0, dtype=torch.float64)
    for c, s in (([10, 0, 5], 6.0), ([-12, 8, -6], 8.0), ([0, -15, 12], 5.0)):
        hu += 3000.0 * torch.exp(-((pts - torch.tensor(c)) ** 2).sum(-1) / (2 * s * s))
    ct = Image(hu[None].float(), grid)
    g = CArmGeometry(width=48, height=40, pixel_size=3.0)
    gt = canonical_pose(np.zeros(3), g)
    xray = render_reference(ct, g, gt, step=0.5, supersample=1)
    start = gt @ perturbation((0, 0, 0), (4, 0, -4), np.zeros(3))
    res = refine_pose(xray[0, 0], ct, g, start, metric="ncc", optimizer="adam",
                      levels=(Level(1.0, 2.0, 5.0, 60),), center=np.zeros(3))
    t_err = np.abs(to_camera(np.zeros(3), res.pose) - to_camera(np.zeros(3), gt))
    assert t_err[:2].max() < 0.5, t_err  # in-plane position is well determined
    assert res.similarity > 0.99 > res.initial_similarity
