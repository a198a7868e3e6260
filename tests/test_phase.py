"""Phase correlation: closed-form shifts, the BrainWeb slices with known motions, 3D MNI152."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft as sfft
import torch
from scipy import ndimage

from medreg import Grid, Image
from medreg.errors import MedregError
from medreg.features.phase import (
    estimate_rotation_scale,
    phase_correlate,
    register_phase,
    window,
)
from medreg.features.preprocess import scalar_image
from medreg.io import read_image
from medreg.resample import resample
from medreg.transforms import Similarity, Translation
from tests.conftest import ITK2D, MNI_T1, need, oblique_grid

BRAIN = "BrainProtonDensitySliceBorder20.png"


def _slice(name: str) -> Image:
    return scalar_image(read_image(need(ITK2D / name)))


def _shift(result) -> np.ndarray:
    return result.transform.translation().detach().numpy()


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _fourier_shift(arr: np.ndarray, shift_tensor_order) -> np.ndarray:
    return sfft.ifftn(ndimage.fourier_shift(sfft.fftn(arr), shift_tensor_order)).real


def test_integer_roll_is_exact_and_confident():
    rng = np.random.default_rng(3)
    a = ndimage.gaussian_filter(rng.normal(size=(64, 80)), 2)
    b = np.roll(a, (5, -7), axis=(0, 1))  # content moves +5 rows (y), -7 columns (x)
    res = phase_correlate(a, b, window_kind="none")
    np.testing.assert_allclose(res.shift, [-7.0, 5.0], atol=1e-6)
    assert res.confidence > 0.99


@pytest.mark.parametrize("shift", [(2.37, -4.81), (-0.5, 0.25), (9.93, 3.02)])
def test_subpixel_shift_of_real_slice(shift):
    fixed = _slice(BRAIN).tensor[0].numpy().astype(np.float64)
    moving = _fourier_shift(fixed, shift)  # exact band-limited sub-pixel shift
    res = phase_correlate(fixed, moving, upsample=100)
    np.testing.assert_allclose(res.shift, shift[::-1], atol=0.02)


def test_brainweb_shift_13_17_and_sign_against_resample():
    fixed, moving = _slice(BRAIN), _slice("BrainProtonDensitySliceShifted13x17y.png")
    result = register_phase(fixed, moving, model="translation")
    np.testing.assert_allclose(_shift(result), [13.0, 17.0], atol=0.05)
    warped = resample(moving, fixed.grid, result.transform)
    # warped(x) = moving(T(x)) must reproduce the fixed image (ITK's result for this pair)
    inner = (slice(20, -20), slice(20, -20))
    assert _ncc(warped.tensor[0].numpy()[inner], fixed.tensor[0].numpy()[inner]) > 0.999
    assert result.confidence > 0.8


def test_3d_brainweb_slice_as_single_slice_volume_gives_3d_transform():
    fixed = read_image(need(ITK2D / "BrainProtonDensitySliceBorder20.mhd"))
    moving = read_image(need(ITK2D / "BrainProtonDensitySliceShifted13x17y.mhd"))
    result = register_phase(fixed, moving)
    np.testing.assert_allclose(_shift(result), [13.0, 17.0], atol=0.05)


def test_rotated10_rigid():
    fixed, moving = _slice(BRAIN), _slice("BrainProtonDensitySliceRotated10.png")
    result = register_phase(fixed, moving, model="rigid")
    assert result.info["angle_deg"] == pytest.approx(10.0, abs=0.1)
    warped = resample(moving, fixed.grid, result.transform).tensor[0].numpy()
    assert _ncc(warped, fixed.tensor[0].numpy()) > 0.99


def test_r10x13y17_rigid_agrees_with_keypoints():
    from medreg.features.keypoints import register_keypoints

    fixed, moving = _slice(BRAIN), _slice("BrainProtonDensitySliceR10X13Y17.png")
    phase = register_phase(fixed, moving, model="rigid")
    keys = register_keypoints(fixed, moving, detector="sift", model="rigid")
    assert phase.info["angle_deg"] == pytest.approx(10.0, abs=0.1)
    corners = torch.tensor([[0.0, 0.0], [220.0, 0.0], [0.0, 256.0], [220.0, 256.0]],
                           dtype=torch.float64)
    gap = (phase.transform(corners) - keys.transform(corners)).detach().norm(dim=-1).max()
    assert float(gap) < 0.7  # two independent methods agree to well under a pixel


def test_r10x13y17s12_similarity_scale_and_angle():
    fixed, moving = _slice(BRAIN), _slice("BrainProtonDensitySliceR10X13Y17S12.png")
    result = register_phase(fixed, moving, model="similarity")
    t = result.transform
    # measured direction: the moving content is 1.2x smaller, so fixed->moving scales by 1/1.2
    assert float(t.scale().detach()) == pytest.approx(1 / 1.2, abs=0.004)
    assert abs(result.info["angle_deg"]) == pytest.approx(10.0, abs=0.15)
    warped = resample(moving, fixed.grid, t).tensor[0].numpy()
    assert _ncc(warped, fixed.tensor[0].numpy()) > 0.99


@pytest.mark.parametrize("angle_deg,scale", [(-23.0, 1.15), (35.0, 0.9), (170.0, 1.0)])
def test_synthetic_similarity_recovered_including_180_ambiguity(angle_deg, scale):
    fixed = _slice(BRAIN)
    truth = Similarity(2, rotation=[np.radians(angle_deg)], translation=[4.0, -6.0],
                       scale=scale, center=fixed.grid.center())
    moving = resample(fixed, fixed.grid, truth.inverse())  # moving(T(x)) = fixed(x)
    result = register_phase(fixed, moving, model="similarity")
    assert result.info["angle_deg"] == pytest.approx(angle_deg, abs=0.2)
    assert float(result.transform.scale().detach()) == pytest.approx(scale, rel=0.004)
    pts = fixed.grid.world_points(torch.float64).reshape(-1, 2)[::97]
    err = (result.transform(pts) - truth(pts)).detach().norm(dim=-1).max()
    assert float(err) < 1.0


def test_world_geometry_respected_on_oblique_anisotropic_grid():
    brain = _slice(BRAIN)
    grid = oblique_grid(brain.grid.size, spacing=[0.8, 1.2], origin=[-30.0, 12.0], angle_deg=25.0)
    fixed = Image(brain.tensor, grid)  # the real slice on an oblique, anisotropic grid
    truth = Translation(2, translation=[3.3, -5.1])  # world mm
    moving = resample(fixed, grid, truth.inverse())
    result = register_phase(fixed, moving)
    np.testing.assert_allclose(_shift(result), [3.3, -5.1], atol=0.15)


def test_3d_translation_on_mni152():
    mni = read_image(need(MNI_T1)).float()
    grid = mni.grid.downsample(2.5)
    fixed = resample(mni, grid)
    truth = Translation(3, translation=[7.4, -4.2, 11.8])
    moving = resample(mni, grid, truth)  # moving(x) = mni(x + t): content shifted by -t
    result = register_phase(fixed, moving, upsample=20)
    # fixed(x) = mni(x) = moving(x - t): the fixed->moving map is x -> x - t
    np.testing.assert_allclose(_shift(result), [-7.4, 4.2, -11.8],
                               atol=0.3)
    assert result.confidence > 0.3
    unrelated = phase_correlate(fixed.tensor[0].numpy(),
                                np.random.default_rng(0).normal(size=grid.shape))
    assert unrelated.confidence < 0.1 < result.confidence


def test_windows_and_bad_input():
    assert window((5, 7), "hann").shape == (5, 7)
    assert window((9,), "tukey")[4] == pytest.approx(1.0)
    with pytest.raises(MedregError, match="window"):
        window((4, 4), "kaiser")
    with pytest.raises(MedregError, match="one shape"):
        phase_correlate(np.zeros((10, 10)), np.zeros((10, 12)))
    with pytest.raises(MedregError, match="2D only"):
        estimate_rotation_scale(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)))
    vol = Image(torch.zeros(1, 8, 8, 8), Grid((8, 8, 8)))
    with pytest.raises(MedregError, match="translation"):
        register_phase(vol, vol, model="rigid")
    with pytest.raises(MedregError, match="choose from"):
        register_phase(vol, vol, model="affine")


def test_rigid_on_oblique_anisotropic_grid_is_a_world_rotation():
    from medreg.transforms import Rigid

    brain = _slice(BRAIN)
    grid = oblique_grid(brain.grid.size, spacing=[0.7, 1.1], origin=[5.0, -40.0], angle_deg=-15.0)
    fixed = Image(brain.tensor, grid)
    truth = Rigid(2, rotation=[np.radians(12.0)], translation=[-4.0, 2.5], center=grid.center())
    moving = resample(fixed, grid, truth.inverse())
    result = register_phase(fixed, moving, model="rigid")
    pts = grid.world_points(torch.float64).reshape(-1, 2)[::101]
    err = (result.transform(pts) - truth(pts)).detach().norm(dim=-1).max()
    assert float(err) < 0.8  # mm, over the whole field of view
