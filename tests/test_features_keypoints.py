"""Keypoint registration: BrainWeb slices with known motions, radiographs under homographies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medreg import Grid, Image
from medreg.errors import MedregError
from medreg.features.keypoints import (
    detect,
    draw_matches,
    fit_model,
    match,
    register_keypoints,
)
from medreg.features.preprocess import scalar_image
from medreg.io import read_image
from medreg.resample import resample
from medreg.transforms import Affine
from medreg.transforms.homography import Homography
from tests.conftest import ITK2D, SHARED, need

BRAIN = "BrainProtonDensitySliceBorder20.png"


def _slice(name: str) -> Image:
    return scalar_image(read_image(need(ITK2D / name)))


def _radiograph(name: str, factor: float = 4.0) -> Image:
    """Downsampled radiograph placed on a grid with non-unit spacing, offset origin, rotation."""
    xray = scalar_image(read_image(need(SHARED / "2d/xray" / name)))
    small = resample(xray, xray.grid.downsample(factor))
    a = np.radians(7.0)
    grid = Grid(small.grid.size, [0.35, 0.35], [-100.0, 50.0],
                [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return Image(small.tensor, grid)


def _max_gap(t1, t2, grid: Grid, step: int = 53) -> float:
    pts = grid.world_points(torch.float64).reshape(-1, 2)[::step]
    return float((t1(pts) - t2(pts)).detach().norm(dim=-1).max())


def _feature_gap(result, truth, grid: Grid) -> float:
    """Largest disagreement with the truth over the box (in pixel indices) spanned by inliers.

    Radiographs carry their structure in part of the field of view; a model is only pinned
    down where the keypoints are, so that region is where it is judged.
    """
    idx = result.fixed.index[result.matches[result.inliers, 0]]
    lo, hi = idx.min(0), idx.max(0)
    xs, ys = np.meshgrid(np.linspace(lo[0], hi[0], 15), np.linspace(lo[1], hi[1], 15))
    pts = torch.from_numpy(grid.index_to_world(np.stack([xs.ravel(), ys.ravel()], 1)))
    span = float(np.linalg.norm(hi - lo))
    assert span > 100, f"inliers cover only {span:.0f} px"
    return float((result.transform(pts) - truth(pts)).detach().norm(dim=-1).max())


@pytest.mark.parametrize("detector", ["sift", "orb", "akaze"])
def test_brainweb_shift_13_17(detector):
    fixed, moving = _slice(BRAIN), _slice("BrainProtonDensitySliceShifted13x17y.png")
    result = register_keypoints(fixed, moving, detector=detector, model="translation")
    tol = 0.05 if detector == "sift" else 0.15  # binary descriptors localize a bit worse
    np.testing.assert_allclose(result.matrix[:2, 2], [13.0, 17.0], atol=tol)
    assert result.report["inlier_ratio"] > 0.9


def test_brainweb_rotation_10_rigid():
    fixed, moving = _slice(BRAIN), _slice("BrainProtonDensitySliceRotated10.png")
    result = register_keypoints(fixed, moving, detector="sift", model="rigid")
    angle = np.degrees(float(result.transform.physical[0].detach()))
    assert angle == pytest.approx(10.0, abs=0.1)


def test_brainweb_r10x13y17s12_similarity():
    fixed, moving = _slice(BRAIN), _slice("BrainProtonDensitySliceR10X13Y17S12.png")
    result = register_keypoints(fixed, moving, detector="sift", model="similarity")
    t = result.transform
    assert float(t.scale().detach()) == pytest.approx(1 / 1.2, abs=0.004)
    assert abs(np.degrees(float(t.physical[0].detach()))) == pytest.approx(10.0, abs=0.15)
    warped = resample(moving, fixed.grid, t).tensor[0].numpy().ravel()
    assert np.corrcoef(warped, fixed.tensor[0].numpy().ravel())[0, 1] > 0.99


@pytest.mark.parametrize("name,detector", [("RG3_UNCR_tibia_xray.dcm", "sift"),
                                           ("RG1_UNCR_chest_xray.dcm", "orb")])
def test_radiograph_under_known_homography(name, detector):
    fixed = _radiograph(name)
    h_index = np.array([[1.04, 0.05, -14.0], [-0.03, 0.97, 9.0], [1.5e-4, -1.0e-4, 1.0]])
    truth = Homography.from_index_matrix(h_index, fixed.grid, fixed.grid)
    moving = resample(fixed, fixed.grid, truth.inverse())  # moving(H(x)) = fixed(x)
    result = register_keypoints(fixed, moving, detector=detector, model="homography")
    assert isinstance(result.transform, Homography)
    assert _feature_gap(result, truth, fixed.grid) < 0.35  # mm = 1 pixel
    assert result.report["inliers"] >= 15


def test_radiograph_affine_in_world_units():
    fixed = _radiograph("RG3_UNCR_tibia_xray.dcm")
    truth = Affine.from_matrix(np.array([[1.06, 0.08, 3.0], [-0.05, 0.95, -2.0], [0, 0, 1.0]]),
                               center=fixed.grid.center())
    moving = resample(fixed, fixed.grid, truth.inverse())
    result = register_keypoints(fixed, moving, detector="sift", model="affine")
    assert _feature_gap(result, truth, fixed.grid) < 0.35


def test_homography_transform_matches_affine_fast_path():
    fixed = _slice(BRAIN)
    m = np.array([[0.97, 0.1, 4.0], [-0.08, 1.02, -3.0], [0.0, 0.0, 1.0]])
    a = resample(fixed, fixed.grid, Affine.from_matrix(m)).tensor
    h = resample(fixed, fixed.grid, Homography(m)).tensor
    assert float((a - h).abs().max()) < 1e-3 * float(fixed.tensor.max())
    hom = Homography(np.array([[1.0, 0.1, 2.0], [0.0, 1.1, -1.0], [1e-3, 2e-4, 1.0]]))
    pts = torch.rand(50, 2, dtype=torch.float64) * 100
    torch.testing.assert_close(hom.inverse()(hom(pts)), pts)


def test_match_picture_written(tmp_path):
    fixed, moving = _slice(BRAIN), _slice("BrainProtonDensitySliceR10X13Y17.png")
    result = register_keypoints(fixed, moving, detector="orb", model="similarity")
    out = draw_matches(fixed, moving, result, tmp_path / "matches.png")
    import matplotlib.image as mpimg

    pic = mpimg.imread(out)
    assert pic.shape[0] > 200 and pic.shape[1] > 400
    green = (pic[..., 1] > 0.8) & (pic[..., 0] < 0.3)
    assert green.sum() > 500  # inlier lines were drawn


def test_bad_input_messages():
    blank = Image(torch.zeros(1, 64, 64), Grid((64, 64)))
    fixed = _slice(BRAIN)
    with pytest.raises(MedregError, match="too few keypoints"):
        register_keypoints(blank, fixed)
    with pytest.raises(MedregError, match="choose from"):
        detect(fixed, "surf")
    with pytest.raises(MedregError, match="choose from"):
        register_keypoints(fixed, fixed, model="spline")
    with pytest.raises(MedregError, match="at least 4"):
        fit_model(np.zeros((3, 2)), np.zeros((3, 2)), "homography")
    with pytest.raises(MedregError, match="ransac or lmeds"):
        fit_model(np.zeros((9, 2)), np.zeros((9, 2)), "rigid", method="magsac")
    noise = Image(torch.from_numpy(np.random.default_rng(1).random((96, 96))).float()[None],
                  Grid((96, 96)))
    with pytest.raises(MedregError, match="needed"):
        register_keypoints(fixed, noise, detector="sift", model="affine")


def test_matching_cross_check_is_mutual():
    fixed, moving = _slice(BRAIN), _slice("BrainProtonDensitySliceRotated10.png")
    f, m = detect(fixed, "orb"), detect(moving, "orb")
    loose = match(f, m, ratio=1.0, cross_check=False)
    strict = match(f, m, ratio=0.8, cross_check=True)
    assert 0 < len(strict) < len(loose)
    assert len(np.unique(strict[:, 1])) == len(strict)  # mutual: no moving point used twice


def test_mask_limits_keypoints_and_usac_variants_agree():
    fixed = _slice(BRAIN)
    keep = torch.zeros(1, *fixed.grid.shape, dtype=torch.uint8)
    keep[..., : fixed.grid.size[0] // 2] = 1  # left half (small x) only
    feats = detect(fixed, "sift", mask=Image(keep, fixed.grid))
    assert len(feats) > 20 and feats.index[:, 0].max() < fixed.grid.size[0] / 2 + 1
    moving = _slice("BrainProtonDensitySliceR10X13Y17.png")
    mats = [register_keypoints(fixed, moving, model="homography", method=m).matrix
            for m in ("magsac", "usac_accurate", "ransac")]
    corners = np.array([[0, 0, 1], [220, 0, 1], [0, 256, 1], [220, 256, 1.0]]).T
    proj = [(m @ corners)[:2] / (m @ corners)[2] for m in mats]
    assert max(np.abs(p - proj[0]).max() for p in proj) < 1.0
