"""Landmark fits: exact on noise-free points, within noise on noisy ones; TPS; ICP; errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from medreg.errors import MedregError
from medreg.features.landmarks import (
    check_pairs,
    fit_linear,
    fit_tps,
    fre,
    icp,
    registration_errors,
    tre,
    umeyama,
)
from medreg.io import read_image
from medreg.resample import resample
from tests.conftest import MNI_T1, SHARED, need

CENTROIDS = SHARED / "landmarks/colin27_aal_centroids.csv"


def _aal_points() -> np.ndarray:
    """116 AAL region centroids (world RAS in the file) as LPS mm."""
    import csv

    lines = [ln for ln in need(CENTROIDS).read_text().splitlines() if not ln.startswith("#")]
    rows = list(csv.DictReader(lines))
    ras = np.array([[float(r["x_mm"]), float(r["y_mm"]), float(r["z_mm"])] for r in rows])
    return ras * np.array([-1.0, -1.0, 1.0])


def _truth(model: str, dim: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    r = (Rotation.from_euler("zyx", [17, -8, 11], degrees=True).as_matrix() if dim == 3
         else Rotation.from_euler("z", 17, degrees=True).as_matrix()[:2, :2])
    lin = {"translation": np.eye(dim), "rigid": r, "similarity": 1.17 * r,
           "affine": r @ (np.eye(dim) + rng.normal(0, 0.08, (dim, dim)))}[model]
    m = np.eye(dim + 1)
    m[:dim, :dim], m[:dim, dim] = lin, rng.uniform(-20, 20, dim)
    return m


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:-1, :-1].T + m[:-1, -1]


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("model", ["translation", "rigid", "similarity", "affine"])
def test_exact_on_noise_free_real_landmarks(model, dim):
    fixed = _aal_points()[:, :dim]
    m = _truth(model, dim)
    t = fit_linear(fixed, _apply(m, fixed), model)
    np.testing.assert_allclose(t.matrix_numpy(), m, atol=1e-9)
    assert fre(t, fixed, _apply(m, fixed)) < 1e-9


@pytest.mark.parametrize("model,dof", [("rigid", 6), ("similarity", 7), ("affine", 12)])
def test_within_noise_on_noisy_landmarks(model, dof):
    pts = _aal_points()
    rng = np.random.default_rng(11)
    order = rng.permutation(len(pts))
    fid, tgt = pts[order[:60]], pts[order[60:]]
    m = _truth(model, 3)
    sigma = 1.0
    noisy = _apply(m, fid) + rng.normal(0, sigma, fid.shape)
    t = fit_linear(fid, noisy, model)
    # expected FRE for isotropic noise: sigma * sqrt(3 (1 - dof / (3 n)))
    expected = sigma * np.sqrt(3 * (1 - dof / (3 * len(fid))))
    assert fre(t, fid, noisy) == pytest.approx(expected, rel=0.15)
    # targets (noise-free truth) are hit far better than one noise sigma
    assert tre(t, tgt, _apply(m, tgt)) < 0.6 * sigma


def test_umeyama_never_returns_a_reflection():
    pts = _aal_points()[:20]
    mirrored = pts * np.array([-1.0, 1.0, 1.0])
    r = umeyama(pts, mirrored)[:3, :3]
    assert np.linalg.det(r) == pytest.approx(1.0)


@pytest.mark.parametrize("dim", [2, 3])
def test_tps_interpolates_exactly_and_beats_affine_on_a_smooth_warp(dim):
    pts = _aal_points()[:, :dim]
    rng = np.random.default_rng(2)
    order = rng.permutation(len(pts))
    fid, tgt = pts[order[:80]], pts[order[80:]]

    def warp(p):
        return p + 4.0 * np.sin(p[:, ::-1] / 25.0)

    tps = fit_tps(fid, warp(fid))
    assert fre(tps, fid, warp(fid)) < 1e-6
    aff = fit_linear(fid, warp(fid), "affine")
    assert tre(tps, tgt, warp(tgt)) < 0.5 * tre(aff, tgt, warp(tgt))


def test_tps_regularization_smooths_towards_affine():
    pts = _aal_points()
    noisy = pts + np.random.default_rng(4).normal(0, 1.0, pts.shape)
    exact, smooth = fit_tps(pts, noisy), fit_tps(pts, noisy, regularization=1e4)
    assert fre(exact, pts, noisy) < 1e-6 < fre(smooth, pts, noisy)
    assert smooth.bending_energy() < 0.05 * exact.bending_energy()
    aff = fit_linear(pts, noisy, "affine")
    very = fit_tps(pts, noisy, regularization=1e9)
    probe = torch.from_numpy(pts[:10] + 3.0)
    gap = (very(probe) - aff(probe)).detach().abs().max()
    assert float(gap) < 0.05


def test_tps_is_a_transform_that_resample_accepts():
    from medreg import Grid, Image

    grid = Grid((40, 30), [1.5, 2.0], [-20.0, 10.0])
    img = Image(torch.rand(1, 30, 40), grid)
    corners = grid.index_to_world(np.array([[0, 0], [39, 0], [0, 29], [39, 29], [20, 15.0]]))
    ident = fit_tps(corners, corners)
    out = resample(img, grid, ident)
    torch.testing.assert_close(out.tensor, img.tensor, atol=1e-4, rtol=0)
    with pytest.raises(TypeError, match="closed-form inverse"):
        ident.inverse()


def _surface(img) -> np.ndarray:
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(img.tensor[0].numpy() > 30))
    shell = mask & ~ndimage.binary_erosion(mask)
    return img.grid.index_to_world(np.argwhere(shell)[:, ::-1].astype(float))  # (x, y, z)


def test_icp_recovers_rigid_motion_of_a_real_head_surface():
    from medreg.transforms import Affine

    mni = read_image(need(MNI_T1)).float()
    grid = mni.grid.downsample(4)
    truth = np.eye(4)
    truth[:3, :3] = Rotation.from_euler("zyx", [6, -4, 3], degrees=True).as_matrix()
    truth[:3, 3] = [4.0, -3.0, 2.5]
    moved = resample(mni, grid, Affine.from_matrix(truth, center=grid.center()).inverse())
    fixed, moving = _surface(resample(mni, grid)), _surface(moved)  # unpaired, own sampling
    res = icp(fixed, moving, model="rigid")
    assert res.converged
    err = registration_errors(res.transform, fixed, _apply(truth, fixed))
    assert err["rms"] < 1.6  # mm, with 4 mm voxels sampled independently in each set
    plain = icp(fixed, moving, model="rigid", principal_axes=False)
    assert registration_errors(plain.transform, fixed, _apply(truth, fixed))["rms"] > err["rms"]


def test_degenerate_and_mismatched_sets_are_refused():
    line = np.stack([np.arange(5.0), 2 * np.arange(5.0)], 1)
    with pytest.raises(MedregError, match="collinear"):
        fit_linear(line, line, "affine")
    line3 = np.stack([np.arange(5.0)] * 3, 1)
    with pytest.raises(MedregError, match="collinear"):
        fit_linear(line3, line3, "rigid")
    with pytest.raises(MedregError, match="equal counts: 5 fixed vs 4"):
        check_pairs(line, line[:4], "rigid")
    with pytest.raises(MedregError, match="at least 3"):
        fit_linear(line[:2], line[:2], "affine")
    with pytest.raises(MedregError, match="2D but moving points are 3D"):
        check_pairs(line, line3, "rigid")
    with pytest.raises(MedregError, match="choose from"):
        check_pairs(line, line, "bspline")
    with pytest.raises(MedregError, match="duplicate"):
        pts = np.array([[0.0, 0], [1, 0], [0, 1], [0, 1]])
        fit_tps(pts, pts)
    with pytest.raises(MedregError, match="NaN"):
        fit_linear(np.array([[np.nan, 0.0], [1, 1], [2, 0]]), line[:3], "rigid")
