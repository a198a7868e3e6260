"""Metrics: closed-form values, invariances, masks and float64 gradient checks."""

from __future__ import annotations

import math

import pytest
import torch

from medreg.errors import MedregError
from medreg.metrics import functional as Fm
from medreg.metrics import get_metric


def _pair(shape=(1, 1, 9, 10, 11), dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    f = torch.rand(shape, generator=g, dtype=dtype)
    m = torch.rand(shape, generator=g, dtype=dtype)
    return f, m


def test_mse_l1_closed_form():
    f = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])
    m = torch.tensor([[[1.0, 1.0, 0.0, 3.0]]])
    assert float(Fm.mse(f, m)) == pytest.approx((1 + 0 + 4 + 0) / 4)
    assert float(Fm.l1(f, m)) == pytest.approx((1 + 0 + 2 + 0) / 4)
    mask = torch.tensor([[[1.0, 1.0, 0.0, 1.0]]])
    assert float(Fm.mse(f, m, mask)) == pytest.approx(1 / 3)


def test_ncc_invariant_to_linear_intensity_change():
    f, _ = _pair()
    assert float(Fm.ncc(f, 3.0 * f + 7.0)) == pytest.approx(0.0, abs=1e-5)
    assert float(Fm.ncc(f, -f)) == pytest.approx(2.0, abs=1e-5)


def test_lncc_perfect_and_local_affine_invariance():
    f, _ = _pair()
    ramp = torch.linspace(1, 1.3, 11, dtype=torch.float64)
    assert float(Fm.lncc(f, f, window=5)) == pytest.approx(0.0, abs=5e-3)
    # globally non-linear but locally almost affine: still near-perfect
    assert float(Fm.lncc(f, f * ramp + ramp, window=3)) < 0.05
    f2, m2 = _pair()
    assert float(Fm.lncc(f2, m2, window=5)) > 0.5


def test_box_filter_matches_direct_mean():
    x = torch.rand(1, 1, 7, 8, dtype=torch.float64)
    out = Fm.box_filter(x, (3, 3))
    assert float(out[0, 0, 3, 4]) == pytest.approx(float(x[0, 0, 2:5, 3:6].mean()))
    assert float(out[0, 0, 0, 0]) == pytest.approx(float(x[0, 0, 0:2, 0:2].mean()))


def test_mi_of_independent_and_identical():
    f, m = _pair((1, 1, 40000))
    assert float(-Fm.mi(f, m)) == pytest.approx(0.0, abs=0.02)
    h_self = -Fm.mi(f, f)
    assert float(h_self) > 1.5  # roughly the entropy of a 32-bin uniform histogram
    # MI is invariant to a non-monotonic (bijective on bins) remap
    remap = torch.where(f < 0.5, 1.0 - f, f)
    assert float(-Fm.mi(f, remap)) > 0.5 * float(h_self)
    # NMI lies in [1, 2]; the Parzen blur keeps identical images below 2
    nmi_random, nmi_self = float(-Fm.nmi(f, m)), float(-Fm.nmi(f, f))
    assert nmi_random >= 1.0 and nmi_random < 1.05 < 1.3 < nmi_self <= 2.0


def test_joint_histogram_is_a_distribution():
    f, m = _pair((2, 1, 1000))
    joint = Fm.joint_histogram(f, m, bins=16)
    assert joint.shape == (2, 16, 16)
    torch.testing.assert_close(joint.sum((1, 2)), torch.ones(2, dtype=torch.float64))
    assert float(joint.min()) >= 0


@pytest.mark.parametrize("name", ["mse", "l1", "ncc", "mi", "nmi"])
def test_empty_mask_is_a_clear_error(name):
    f, m = _pair()
    with pytest.raises(MedregError, match="empty"):
        get_metric(name)(f, m, torch.zeros_like(f))


@pytest.mark.parametrize("name,opts", [("mse", {}), ("ncc", {}), ("lncc", {"window": 3}),
                                       ("mi", {"bins": 12, "fixed_range": (0.0, 1.0),
                                               "moving_range": (0.0, 1.0)}),
                                       ("nmi", {"bins": 12, "fixed_range": (0.0, 1.0),
                                                "moving_range": (0.0, 1.0)})])
def test_gradcheck_float64(name, opts):
    f, m = _pair((1, 1, 5, 6, 4))
    m = (0.8 * m + 0.1).requires_grad_(True)
    mask = (torch.rand_like(f) > 0.2).double()
    metric = get_metric(name, **opts)
    assert torch.autograd.gradcheck(lambda w: metric(f, w, mask), (m,), eps=1e-6, atol=1e-5)


def test_unknown_metric_lists_choices():
    with pytest.raises(ValueError, match="choose from"):
        get_metric("cosine-similarity")


def test_mi_parzen_matches_entropy_of_known_two_level_image():
    f = torch.cat([torch.zeros(5000), torch.ones(5000)]).reshape(1, 1, -1).double()
    # two equally likely intensities, moving identical: MI = H = ln 2 (up to Parzen blur)
    assert float(-Fm.mi(f, f, bins=32)) == pytest.approx(math.log(2), rel=0.1)


@pytest.mark.parametrize("window", ["box", "bspline"])
@pytest.mark.parametrize("name", ["mi", "nmi"])
def test_fused_parzen_matches_the_autograd_reference(name, window):
    f, m = _pair((1, 1, 3000))
    mask = (torch.rand_like(f) > 0.3).double()
    opts = dict(bins=16, fixed_range=(0.0, 1.0), moving_range=(0.0, 1.0), fixed_window=window)
    fn = getattr(Fm, name)
    w1 = m.clone().requires_grad_(True)
    fused = fn(f, w1, mask, **opts)
    fused.backward()
    w2 = m.clone().requires_grad_(True)
    f_ref = f.clone().requires_grad_(True)  # a fixed image with grad takes the autograd path
    ref = fn(f_ref, w2, mask, **opts)
    ref.backward()
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(w1.grad, w2.grad)


def _regional_pair(n: int = 4000):
    """Fixed ``(1, 1, n)``; moving = fixed in region 0 and ``1 - fixed`` (inverted contrast) in
    region 1, plus a little noise; region ids ``(n,)``."""
    g = torch.Generator().manual_seed(3)
    f = torch.rand(1, 1, n, generator=g, dtype=torch.float64)
    ids = (torch.arange(n) >= n // 2).long()
    m = torch.where(ids[None, None] == 0, f, 1 - f) + 0.02 * torch.randn(1, 1, n, generator=g,
                                                                          dtype=torch.float64)
    return f, m.clamp(0, 1), ids


@pytest.mark.parametrize("name", ["mi", "nmi"])
def test_conditional_mi_with_one_region_is_plain_mi(name):
    f, m, _ = _regional_pair()
    opts = dict(bins=16, fixed_range=(0.0, 1.0), moving_range=(0.0, 1.0))
    fn = getattr(Fm, name)
    ones = torch.zeros(f.shape[-1], dtype=torch.long)
    torch.testing.assert_close(fn(f, m, **opts, regions=(ones, 1)), fn(f, m, **opts))


def test_conditional_mi_is_the_region_weighted_mean_of_regional_mi():
    # I(F; M | R) = sum_r p(r) I(F; M | R = r), each from its own histogram (same binning)
    f, m, ids = _regional_pair()
    opts = dict(bins=16, fixed_range=(0.0, 1.0), moving_range=(0.0, 1.0))
    cond = -Fm.mi(f, m, **opts, regions=(ids, 2))
    parts = [-Fm.mi(f[..., ids == r], m[..., ids == r], **opts) for r in (0, 1)]
    assert float(cond) == pytest.approx(0.5 * float(parts[0] + parts[1]), rel=1e-5)  # eps clamps
    # the contrast flips between regions, so the pooled histogram has two branches: plain MI
    # loses about ln 2 nats (which branch) that the region tells
    assert float(cond) - float(-Fm.mi(f, m, **opts)) > 0.5


@pytest.mark.parametrize("name", ["mi", "nmi"])
def test_conditional_mi_gradcheck_float64(name):
    f, m, ids = _regional_pair(300)
    m = (0.8 * m + 0.1).requires_grad_(True)
    mask = (torch.rand_like(f) > 0.2).double()
    opts = dict(bins=12, fixed_range=(0.0, 1.0), moving_range=(0.0, 1.0), regions=(ids, 2))
    fn = getattr(Fm, name)
    assert torch.autograd.gradcheck(lambda w: fn(f, w, mask, **opts), (m,), eps=1e-6, atol=1e-5)


def test_conditional_mi_needs_the_fused_path():
    f, m, ids = _regional_pair(100)
    with pytest.raises(MedregError, match="conditional"):
        Fm.mi(f.requires_grad_(True), m, bins=12, regions=(ids, 2))


@pytest.mark.parametrize("window", ["box", "bspline"])
def test_precomputed_fixed_rows_give_the_same_loss_and_gradient(window):
    """``fixed_rows`` from :func:`parzen_fixed_rows` only skip work: same loss and gradient,
    with and without regions; a gradient on the fixed image cannot use them."""
    f, m, ids = _regional_pair(400)
    opts = dict(bins=16, fixed_range=(0.0, 1.0), moving_range=(0.0, 1.0), fixed_window=window)
    for regions in (None, (ids, 2)):
        rows = Fm.parzen_fixed_rows(f.reshape(-1), 16, (0.0, 1.0), window,
                                    None if regions is None else regions[0])
        a, b = m.clone().requires_grad_(True), m.clone().requires_grad_(True)
        plain = Fm.mi(f, a, **opts, regions=regions)
        fast = Fm.mi(f, b, **opts, regions=regions, fixed_rows=rows)
        plain.backward()
        fast.backward()
        torch.testing.assert_close(fast, plain)
        torch.testing.assert_close(b.grad, a.grad)
    with pytest.raises(MedregError, match="precomputed fixed rows"):
        Fm.mi(f.clone().requires_grad_(True), m, **opts, fixed_rows=rows)


@pytest.mark.parametrize("name,opts", [("mi", {"bins": 16}), ("nmi", {"bins": 16}),
                                       ("ncc", {}), ("mse", {}), ("l1", {})])
def test_value_and_grad_matches_autograd(name, opts):
    """``Metric.value_and_grad`` (closed form for MI/NMI, autograd on the metric otherwise) gives
    the loss and ``d loss / d warped`` of the metric itself, masked and multi-channel, and
    leaves no graph behind."""
    f, m = _pair((1, 2, 7, 8, 9))
    mask = (torch.rand((1, 1, 7, 8, 9), generator=torch.Generator().manual_seed(5)) > 0.3)
    metric = get_metric(name, **opts)
    ranges = dict(fixed_range=(0.0, 1.0), moving_range=(0.0, 1.0)) if name in ("mi", "nmi") \
        else {}
    leaf = m.clone().requires_grad_(True)
    ref = metric(f, leaf, mask.to(f.dtype), **ranges)
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    loss, grad = metric.value_and_grad(f, m, mask.to(f.dtype), **ranges)
    assert not loss.requires_grad and not grad.requires_grad and grad.shape == m.shape
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grad, ref_grad)
    if name in ("mi", "nmi"):  # closed form: a batch of two pairs falls back to autograd
        assert getattr(Fm, f"{name}_value_and_grad")(f.expand(2, -1, -1, -1, -1), m.expand(
            2, -1, -1, -1, -1), None, **opts, **ranges) is None
