"""Bias flattening and the modality check of the finest linear level."""

import math

import numpy as np
import pytest
import torch

import medreg
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.engine.pyramid import smooth_image
from medreg.registration.intensity import (
    aligned_correlation,
    flatten_bias,
    lowpass,
    same_modality,
)
from medreg.transforms.linear import Affine, Translation
from tests.conftest import blob_image, oblique_grid
from tests.test_registration import _error_mm, _mni_case, mni4  # noqa: F401 (fixture)


def _bias(grid: Grid, amplitude: float = 0.3) -> torch.Tensor:
    """Smooth multiplicative field ``(1, *S)``, ``1 +- amplitude`` across the grid."""
    pts = grid.world_points(torch.float64)
    c = torch.as_tensor(grid.center(), dtype=torch.float64)
    half = float(np.max(grid.extent)) / 2
    ramp = ((pts - c) / half).sum(-1) / grid.ndim
    return (1 + amplitude * ramp)[None].float()


def test_lowpass_of_a_constant_is_the_constant():
    g = Grid((40, 36, 30), (1.5, 1.0, 2.0))
    img = Image(torch.full((1, 30, 36, 40), 7.0), g)
    torch.testing.assert_close(lowpass(img, 15.0), img.tensor, rtol=1e-5, atol=1e-5)


def test_lowpass_follows_a_full_resolution_blur():
    g = oblique_grid((96, 80))
    img = blob_image(g)
    ref = smooth_image(img, 10.0).tensor
    got = lowpass(img, 10.0)
    inner = (slice(None), slice(20, -20), slice(20, -20))  # away from the replicated borders
    err = (got - ref)[inner].abs().max() / ref[inner].abs().max()
    assert float(err) < 0.05


def test_flatten_bias_closed_form_cases():
    g = Grid((40, 32), (1.0, 2.0))
    const = Image(torch.full((1, 32, 40), 5.0), g)
    torch.testing.assert_close(flatten_bias(const).tensor, torch.ones(1, 32, 40))
    # a bright square on an empty background: background stays 0; far from the square the
    # low-pass falls under the bound, so values there are divided by 0.25 * object mean
    data = torch.zeros(1, 32, 40)
    data[:, 12:20, 15:25] = 8.0
    out = flatten_bias(Image(data, g), sigma_mm=6.0, floor=0.25).tensor
    assert float(out[data == 0].abs().max()) == 0.0
    assert float(out.max()) <= 8.0 / (0.25 * 8.0 * 0.5) + 1e-5  # bound >= 0.25 * half of 8


def test_flatten_bias_removes_a_smooth_multiplicative_field():
    g = Grid((64, 64, 48), (2.0, 2.0, 2.5))
    img = blob_image(g)
    img = img.with_tensor(img.tensor - img.tensor.min() + 1.0)
    biased = img.with_tensor(img.tensor * _bias(g, 0.3))
    a, b = flatten_bias(img).tensor, flatten_bias(biased).tensor
    raw = ((biased.tensor - img.tensor) / img.tensor).abs().mean()
    flat = ((b - a) / a).abs().mean()
    assert float(raw) > 0.05 and float(flat) < 0.2 * float(raw)


def test_flatten_bias_rejects_impossible_parameters():
    img = blob_image(Grid((16, 16)))
    for sigma, floor in ((0.0, 0.1), (10.0, 0.0), (math.nan, 0.1)):
        with pytest.raises(ValueError, match="sigma_mm > 0 and floor > 0"):
            flatten_bias(img, sigma, floor)


def test_correlation_tells_same_contrast_from_a_non_monotonic_remap():
    g = oblique_grid((64, 56))
    fixed = blob_image(g)
    true = Translation(2, [2.0, -1.5])
    moving = medreg.resample(fixed, g, true.inverse())
    mono, r = same_modality(fixed, moving, true)
    assert mono and r > 0.99
    v = (moving.tensor - moving.tensor.min()) / (moving.tensor.max() - moving.tensor.min())
    remapped = moving.with_tensor(4 * v * (1 - v))
    mono, r = same_modality(fixed, remapped, true)
    assert not mono and r < 0.9


def test_correlation_is_nan_without_overlap():
    g = Grid((32, 32))
    img = blob_image(g)
    far = Translation(2, [1000.0, 0.0])
    assert math.isnan(aligned_correlation(img, img, far))
    assert same_modality(img, img, far)[0] is False


def _biased_case(mni4, seed: int, amplitude: float = 0.3):  # noqa: F811
    fixed, moving, true, pts = _mni_case(mni4, seed)
    return fixed, moving.with_tensor(moving.tensor * _bias(moving.grid, amplitude)), true, pts


def test_mi_with_a_bias_field_flattens_and_gains(mni4):  # noqa: F811
    fixed, biased, true, pts = _biased_case(mni4, 3)
    errors = {}
    for flatten in ("auto", False):
        res = medreg.register(fixed, biased, transform="affine", metric="mi",
                              flatten_bias=flatten)
        errors[flatten] = _error_mm(res.transform, true, pts)[0]
        finest = res.stages[-1]["info"]["levels"][-1]
        assert finest["bias_flattened"] is (flatten == "auto")
    assert finest.get("mono") is None  # no check when switched off
    assert errors["auto"] < 0.6 * errors[False], errors


def test_cross_modality_pair_is_not_flattened(mni4):  # noqa: F811
    fixed, moving, true, pts = _mni_case(mni4, 2)
    v = moving.tensor / float(moving.tensor.max())
    remapped = moving.with_tensor(100 * (3.2 * v * (1 - v) + 0.2 * v))
    res = medreg.register(fixed, remapped, transform="affine", metric="mi")
    finest = res.stages[-1]["info"]["levels"][-1]
    assert finest["mono"] is False and finest["bias_flattened"] is False
    assert finest["correlation"] < 0.9


def test_flatten_bias_option_is_checked():
    img = blob_image(Grid((24, 24)))
    with pytest.raises(medreg.MedregError, match="flatten_bias"):
        medreg.register(img, img, transform="translation", flatten_bias="yes")


def test_negative_intensities_are_not_flattened():
    g = Grid((48, 48), (2.0, 2.0))
    fixed = blob_image(g)
    fixed = fixed.with_tensor(fixed.tensor - fixed.tensor.mean())  # CT-like: negative values
    moving = medreg.resample(fixed, g, Affine(2, np.eye(2), [1.0, 0.5]).inverse())
    res = medreg.register(fixed, moving, transform="translation", metric="mi")
    finest = res.stages[-1]["info"]["levels"][-1]
    assert finest["mono"] is True and finest["bias_flattened"] is False


def test_conditional_mi_helps_a_multi_modal_pair_with_a_bias_field(mni4):  # noqa: F811
    # bias field first, then a non-monotonic contrast change (as the multi-modal bench case):
    # flattening cannot undo it, conditioning MI on 2 x 2 x 2 regions can in part
    fixed, biased, true, pts = _biased_case(mni4, 5, 0.3)
    v = biased.tensor / float(biased.tensor.max())
    remapped = biased.with_tensor(100 * (3.2 * v * (1 - v) + 0.2 * v))
    errors = {}
    for regions in ("auto", 1):
        res = medreg.register(fixed, remapped, transform="affine", metric="mi", regions=regions)
        finest = res.stages[-1]["info"]["levels"][-1]
        assert finest["regions"] == (2 if regions == "auto" else 1)
        assert finest["bias_flattened"] is False
        errors[regions] = _error_mm(res.transform, true, pts)[0]
    assert errors["auto"] < 0.85 * errors[1], errors


def test_regions_option_is_checked():
    img = blob_image(Grid((24, 24)))
    for bad in (0, 1.5, "two"):
        with pytest.raises(medreg.MedregError, match="regions"):
            medreg.register(img, img, transform="translation", regions=bad)
