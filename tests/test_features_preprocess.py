"""Intensity preprocessing: equalization, histogram matching, normalization, masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medreg import Grid, Image
from medreg.errors import MedregError
from medreg.features.preprocess import (
    apply_mask,
    clahe,
    clip_intensity,
    equalize_histogram,
    match_histogram,
    normalize_intensity,
    scalar_image,
    threshold_mask,
    to_uint8,
)
from medreg.io import read_image
from tests.conftest import ITK2D, SHARED, need


def _t1() -> Image:
    return scalar_image(read_image(need(ITK2D / "BrainT1SliceBorder20.png")))


def _coronal() -> Image:
    """Real T1 slice with continuous (float) intensities."""
    return Image.from_numpy(np.load(need(SHARED / "2d/misc/dipy_t1_coronal_slice.npy"))
                            .astype(np.float32))


def _pd() -> Image:
    return scalar_image(read_image(need(ITK2D / "BrainProtonDensitySliceBorder20.png")))


def test_scalar_image_averages_channels_and_squeezes_single_slices():
    rgb = read_image(need(ITK2D / "BrainProtonDensitySliceBorder20.png"))
    assert rgb.channels == 3 and scalar_image(rgb).tensor.shape == (1, 257, 221)
    vol = Image(torch.ones(1, 1, 5, 6), Grid((6, 5, 1), [0.5, 0.7, 3.0], [1.0, 2.0, 3.0]))
    flat = scalar_image(vol)
    assert flat.grid.size == (6, 5) and flat.grid.spacing == (0.5, 0.7)


def test_equalization_flattens_the_histogram_inside_the_mask():
    img = _coronal()
    mask = threshold_mask(img)
    eq = equalize_histogram(img, mask=mask)
    inside = eq.tensor[0].numpy()[mask.tensor[0].numpy() != 0]
    hist, _ = np.histogram(inside, bins=10, range=(0, 1))
    assert hist.min() > 0.5 * hist.mean()  # roughly uniform on [0, 1]
    assert torch.equal(img.tensor, _coronal().tensor)  # input untouched


def test_histogram_matching_reproduces_reference_quantiles():
    src, ref = _coronal(), _pd()
    sm, rm = threshold_mask(src), threshold_mask(ref)
    out = match_histogram(src, ref, mask=sm, reference_mask=rm)
    q = [0.1, 0.3, 0.5, 0.7, 0.9]
    got = np.quantile(out.tensor.numpy()[sm.tensor.numpy() != 0], q)
    want = np.quantile(ref.tensor.numpy()[rm.tensor.numpy() != 0], q)
    np.testing.assert_allclose(got, want, atol=0.03 * float(ref.tensor.max()))
    before = np.quantile(src.tensor.numpy()[sm.tensor.numpy() != 0], q)
    assert np.abs(before - want).max() > 10 * np.abs(got - want).max()


def test_normalization_and_clipping():
    img = _t1()
    z = normalize_intensity(img, "zscore").tensor
    assert float(z.mean()) == pytest.approx(0, abs=1e-4)
    assert float(z.std()) == pytest.approx(1, rel=1e-3)
    mm = normalize_intensity(img, "minmax").tensor
    assert float(mm.min()) == 0 and float(mm.max()) == pytest.approx(1.0)
    c = clip_intensity(img, 5, 95).tensor
    lo, hi = np.percentile(img.tensor.numpy(), [5, 95])
    assert float(c.min()) >= lo - 1e-4 and float(c.max()) <= hi + 1e-4
    with pytest.raises(MedregError, match="choose from"):
        normalize_intensity(img, "robust")
    with pytest.raises(MedregError, match="percentiles"):
        clip_intensity(img, 50, 10)


def test_masks_and_uint8():
    img = _t1()
    mask = threshold_mask(img)
    frac = float(mask.tensor.float().mean())
    assert 0.2 < frac < 0.8
    out = apply_mask(img, mask, fill=-1.0).tensor
    assert float(out[mask.tensor == 0].max()) == -1.0
    empty = Image(torch.zeros_like(mask.tensor), mask.grid)
    with pytest.raises(MedregError, match="empty"):
        normalize_intensity(img, mask=empty)
    u8 = to_uint8(img)
    assert u8.dtype == np.uint8 and u8.max() == 255
    assert clahe(u8).std() > u8.std() * 0.8
