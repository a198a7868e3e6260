"""Evaluation measures: closed forms on small synthetic cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.deformable.synthetic import random_velocity
from medreg.errors import MedregError
from medreg.evaluation import (
    dice,
    folding_percent,
    hausdorff95,
    inverse_consistency,
    jacobian_map,
    jacobian_stats,
    landmark_tre,
    std_log_jacobian,
)
from medreg.transforms import Affine, Translation
from tests.conftest import oblique_grid


def _labels(arr: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Image:
    return Image.from_numpy(arr.astype(np.int32), spacing=spacing)


def test_jacobian_of_a_scaling_is_its_volume_ratio():
    grid = oblique_grid((10, 12, 9))
    jac = jacobian_map(Affine(3, linear=np.diag([1.2, 0.9, 1.1])), grid)
    assert torch.allclose(jac.tensor, torch.full_like(jac.tensor, 1.2 * 0.9 * 1.1), atol=1e-5)
    assert folding_percent(jac) == 0.0 and std_log_jacobian(jac) < 1e-5


def test_folding_percent_counts_negative_determinants():
    grid = Grid((10, 10, 10))
    jac = jacobian_map(Affine(3, linear=np.diag([-1.0, 1.0, 1.0])), grid)
    assert folding_percent(jac) == 100.0
    half = jac.tensor.clone()
    half[..., :5] = 1.0
    assert folding_percent(Image(half, grid)) == 50.0
    mask = torch.zeros(grid.shape, dtype=torch.bool)
    mask[..., :5] = True
    assert folding_percent(Image(half, grid), mask) == 0.0


def test_std_log_jacobian_of_known_values():
    grid = Grid((4, 1, 1))
    jac = Image(torch.tensor([1.0, math.e, 1.0, math.e]).reshape(1, 1, 1, 4), grid)
    assert abs(std_log_jacobian(jac) - float(torch.tensor([0.0, 1, 0, 1]).std())) < 1e-6


def test_svf_stats_and_inverse_consistency():
    grid = oblique_grid((20, 18, 16))
    svf = random_velocity(grid, mean_mm=1.5, smoothness_mm=6.0, seed=1)
    stats = jacobian_stats(svf, grid)
    assert stats["folding_percent"] == 0.0 and 0 < stats["det_min"] < 1 < stats["det_max"]
    ic = inverse_consistency(svf, svf.inverse(), grid.downsample(2))
    assert ic["mean"] < 0.05
    wrong = inverse_consistency(svf, Translation(3, [1.0, 0.0, 0.0]), grid)
    assert wrong["mean"] > 0.5


def test_dice_closed_form():
    a = np.zeros((1, 10, 10), int)
    b = np.zeros((1, 10, 10), int)
    a[0, :4, :5] = 1  # 20 voxels
    b[0, 2:6, :5] = 1  # 20 voxels, 10 shared
    a[0, 8:, 8:] = 2
    b[0, 8:, 8:] = 2
    d = dice(_labels(a), _labels(b))
    assert d["per_label"] == {1: 0.5, 2: 1.0} and d["mean"] == 0.75
    assert dice(_labels(a), _labels(b), labels=[3])["per_label"][3] != dice(
        _labels(a), _labels(b), labels=[3])["per_label"][3]  # nan: absent from both


def test_hausdorff95_of_shifted_cube_in_mm():
    a = np.zeros((20, 20, 20), int)
    a[5:15, 5:15, 5:15] = 1
    b = np.roll(a, 2, axis=2)  # 2 voxels along x
    hd = hausdorff95(_labels(a, (1.5, 1.0, 1.0)), _labels(b, (1.5, 1.0, 1.0)))
    assert abs(hd["per_label"][1] - 3.0) < 1e-6  # 2 voxels * 1.5 mm
    assert hausdorff95(_labels(a), _labels(a))["mean"] == 0.0


def test_label_maps_must_be_integers_on_one_grid():
    a = _labels(np.ones((3, 3, 3)))
    with pytest.raises(MedregError, match="float voxels"):
        dice(a, Image(a.tensor.float(), a.grid))
    with pytest.raises(MedregError, match="share one grid"):
        dice(a, _labels(np.ones((3, 3, 4))))


def test_landmark_tre():
    t = Translation(3, [1.0, 2.0, 2.0])
    fixed = np.array([[0.0, 0, 0], [10, 0, 0]])
    moving = fixed + [1.0, 2.0, 2.0]
    moving[1] += [3.0, 4.0, 0.0]
    tre = landmark_tre(t, fixed, moving)
    assert np.allclose(tre["per_point"], [0.0, 5.0]) and tre["max"] == 5.0
    with pytest.raises(MedregError, match="landmarks"):
        landmark_tre(t, fixed, moving[:1])
