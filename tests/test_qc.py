"""QC pictures: checkerboard tiling, overlay colours, robust normalization and the PNG figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medreg import Grid, Image, MedregError
from medreg.viz.qc import (
    checkerboard,
    difference,
    normalize,
    orthogonal_slices,
    overlay,
    qc_figure,
)


def test_checkerboard_tiles_2d():
    a, b = np.zeros((8, 8)), np.ones((8, 8))
    cb = checkerboard(a, b, tiles=2)
    assert cb[0, 0] == 0 and cb[0, 7] == 1 and cb[7, 0] == 1 and cb[7, 7] == 0
    assert cb[:4, :4].sum() == 0 and cb[:4, 4:].sum() == 16
    assert cb.mean() == pytest.approx(0.5)


def test_checkerboard_tiles_per_axis_3d():
    a, b = np.zeros((4, 6, 6)), np.ones((4, 6, 6))
    cb = checkerboard(a, b, tiles=(1, 3, 2))
    assert cb[0, 0, 0] == 0 and cb[3, 0, 0] == 0  # one tile along D
    assert cb[0, 2, 0] == 1 and cb[0, 0, 3] == 1 and cb[0, 2, 3] == 0
    with pytest.raises(MedregError, match="tiles"):
        checkerboard(a, b, tiles=(2, 2))


def test_normalize_is_robust_to_outliers():
    a = np.linspace(0, 1, 1000)
    a[0] = -1e6
    a[-1] = 1e6
    n = normalize(a)
    assert n.min() == 0 and n.max() == 1
    assert n[500] == pytest.approx(0.5, abs=0.02)  # the outliers do not squash the rest
    assert np.all(normalize(np.full((5, 5), 3.0)) == 0)


def test_overlay_colours_and_difference():
    a = np.zeros((10, 10))
    b = np.zeros((10, 10))
    a[:, :5] = 1.0
    b[:, 5:] = 1.0
    rgb = overlay(a, b)
    assert rgb.shape == (10, 10, 3)
    np.testing.assert_allclose(rgb[0, 0], [1, 0, 1])  # only a: magenta
    np.testing.assert_allclose(rgb[0, 9], [0, 1, 0])  # only b: green
    d = difference(a, b)
    assert d[0, 0] == 1 and d[0, 9] == -1
    with pytest.raises(MedregError, match="same shape"):
        overlay(a, b[:5])


def test_orthogonal_slices_shapes():
    v = np.zeros((4, 5, 6))
    shapes = [s.shape for _, s in orthogonal_slices(v)]
    assert shapes == [(5, 6), (4, 6), (4, 5)]
    assert [s.shape for _, s in orthogonal_slices(np.zeros((3, 7)))] == [(3, 7)]


def _png_size(path) -> tuple[int, int]:
    from PIL import Image as PILImage

    with PILImage.open(path) as im:
        assert im.format == "PNG"
        return im.size


@pytest.mark.parametrize("shape", [(24, 20), (12, 16, 14)])
def test_qc_figure_writes_png(tmp_path, shape):
    g = Grid(tuple(reversed(shape)))
    rng = np.random.default_rng(0)
    fixed = Image(torch.from_numpy(rng.random(shape))[None], g)
    moving = Image(torch.from_numpy(rng.random(shape))[None], g)
    out = qc_figure(fixed, moving, fixed, tmp_path / "sub" / "qc.png", title="t")
    assert out.exists()
    w, h = _png_size(out)
    rows = 2 * (3 if len(shape) == 3 else 1)
    assert w > 400 and h > rows * 150  # one row of panels per stage and orientation


def test_qc_figure_resamples_other_grid_and_rejects_other_dimension(tmp_path):
    fixed = Image(torch.rand(1, 8, 8), Grid((8, 8)))
    other = Image(torch.rand(1, 8, 9), Grid((9, 8), spacing=(0.9, 1.0)))
    assert qc_figure(fixed, other, fixed, tmp_path / "qc.png").exists()
    vol = Image(torch.zeros(1, 4, 8, 8), Grid((8, 8, 4)))
    with pytest.raises(MedregError, match="3D but the fixed image is 2D"):
        qc_figure(fixed, vol, fixed, tmp_path / "qc3.png")
    assert not (tmp_path / "qc3.png").exists()
