"""Linear transforms: float64 gradient checks, inverse/compose identities, from_matrix exactness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from medreg import Affine, Compose, Rigid, Similarity, Translation
from medreg.transforms import LINEAR_TRANSFORMS, linear_from_matrix

KINDS = ("translation", "rigid", "similarity", "affine")


def make(kind: str, ndim: int, center=None):
    """A non-trivial transform of ``kind`` with a non-identity centre."""
    c = [15.0, -25.0, 40.0][:ndim] if center is None else center
    rot = [0.3] if ndim == 2 else [0.2, -0.15, 0.35]
    t = [4.0, -6.0, 2.5][:ndim]
    if kind == "translation":
        return Translation(ndim, t, center=c)
    if kind == "rigid":
        return Rigid(ndim, rot, t, center=c)
    if kind == "similarity":
        return Similarity(ndim, rot, t, scale=0.93, center=c)
    a = np.eye(ndim) + np.random.default_rng(3).normal(0, 0.1, (ndim, ndim))
    return Affine(ndim, a, t, center=c)


def points(ndim: int, n: int = 7) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(4).uniform(-80, 80, (n, ndim)))


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_forward_wrt_params(kind, ndim):
    t = make(kind, ndim)
    x = points(ndim, 4)

    def f(p):
        return functional_call(t, {"params": p}, (x,))

    p = t.params.detach().clone().requires_grad_(True)
    assert p.dtype == torch.float64
    assert torch.autograd.gradcheck(f, (p,), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["rigid", "similarity"])
def test_gradcheck_at_zero_rotation(kind):
    """The rotation-vector parameterization stays differentiable at the identity."""
    t = LINEAR_TRANSFORMS[kind](3, center=[5.0, 6.0, 7.0])
    x = points(3, 3)
    p = t.params.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: functional_call(t, {"params": q}, (x,)), (p,),
                                    eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_rigid_gradient_matches_closed_form_2d_3d(ndim):
    """d T(x) / d translation is the identity (scale 1), whatever the rotation and centre."""
    t = make("rigid", ndim)
    x = points(ndim, 1)
    y = t(x)[0]
    n_rot = 1 if ndim == 2 else 3
    for i in range(ndim):
        (g,) = torch.autograd.grad(y[i], t.params, retain_graph=True)
        expected = torch.zeros(ndim)
        expected[i] = 1.0
        torch.testing.assert_close(g[n_rot:n_rot + ndim].float(), expected)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_inverse_round_trip(kind, ndim):
    t = make(kind, ndim)
    x = points(ndim)
    with torch.no_grad():
        torch.testing.assert_close(t.inverse()(t(x)), x, atol=1e-10, rtol=0)
        torch.testing.assert_close(t(t.inverse()(x)), x, atol=1e-10, rtol=0)
        eye = torch.eye(ndim + 1, dtype=torch.float64)
        torch.testing.assert_close(t.inverse().matrix() @ t.matrix(), eye, atol=1e-12, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_order_matrix_and_inverse(ndim):
    a, b, c = make("rigid", ndim), make("affine", ndim), make("similarity", ndim)
    comp = Compose(a, b, c)
    x = points(ndim)
    with torch.no_grad():
        torch.testing.assert_close(comp(x), c(b(a(x))), atol=1e-10, rtol=0)
        torch.testing.assert_close(comp.matrix(), c.matrix() @ b.matrix() @ a.matrix(),
                                   atol=1e-12, rtol=0)
        torch.testing.assert_close(comp.inverse()(comp(x)), x, atol=1e-9, rtol=0)
        torch.testing.assert_close(Compose(a, a.inverse())(x), x, atol=1e-10, rtol=0)
    # order matters: a rotation then a shift is not a shift then a rotation
    assert not torch.allclose(Compose(a, b)(x), Compose(b, a)(x))
    # nested composes flatten
    assert len(Compose(Compose(a, b), c).parts) == 3


def test_compose_rejects_mixed_dimensions():
    with pytest.raises(ValueError, match="dimensions"):
        Compose(make("rigid", 2), make("rigid", 3))


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_from_matrix_is_exact_for_its_own_kind(kind, ndim):
    t = make(kind, ndim)
    m = t.matrix().detach()
    back = type(t).from_matrix(m, center=t.center)
    torch.testing.assert_close(back.matrix().detach(), m, atol=1e-12, rtol=0)
    torch.testing.assert_close(back.physical.detach(), t.physical.detach(), atol=1e-10, rtol=0)
    torch.testing.assert_close(back.center, t.center)
    # linear_from_matrix by name gives the same
    torch.testing.assert_close(linear_from_matrix(kind, m, center=t.center).matrix().detach(),
                               m, atol=1e-12, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_from_matrix_any_center_same_mapping(ndim):
    t = make("affine", ndim)
    m = t.matrix().detach()
    x = points(ndim)
    for c in ([0.0] * ndim, [100.0, -50.0, 3.0][:ndim]):
        other = Affine.from_matrix(m, center=c)
        torch.testing.assert_close(other.center, torch.as_tensor(c, dtype=torch.float64))
        with torch.no_grad():
            torch.testing.assert_close(other(x), t(x), atol=1e-10, rtol=0)


def test_rigid_from_affine_is_nearest_rotation():
    a = make("affine", 3)
    r = Rigid.from_matrix(a.matrix(), center=a.center)
    rot = r.linear().detach().numpy()
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rot) == pytest.approx(1.0)
    u, _, vt = np.linalg.svd(a.linear().detach().numpy())
    np.testing.assert_allclose(rot, u @ vt, atol=1e-12)  # polar factor of A


def test_similarity_scale_recovered():
    s = Similarity(3, [0.1, 0.2, 0.3], [1.0, 2.0, 3.0], scale=1.2, center=[1.0, 2.0, 3.0])
    back = Similarity.from_matrix(s.matrix(), center=s.center)
    assert float(back.scale().detach()) == pytest.approx(1.2, abs=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown linear transform"):
        linear_from_matrix("shear", np.eye(3))
    with pytest.raises(ValueError, match="scale must be positive"):
        Similarity(2, scale=0.0)
    with pytest.raises(ValueError, match="3x3"):
        Affine.from_matrix(np.eye(5))
    with pytest.raises(ValueError, match="needs 3 values"):
        Translation(3, [1.0, 2.0])


def test_nearest_rigid_keeps_the_image_of_the_centre():
    import numpy as np

    from medreg.transforms import Affine, Rigid

    c = np.array([80.0, -40.0, 30.0])
    aff = Affine(3, np.diag([1.05, 0.95, 1.0]), [3.0, 1.0, -2.0], center=c)
    rig = Rigid.from_matrix(aff.matrix(), center=c)
    ct = torch.as_tensor(c)[None]
    torch.testing.assert_close(rig(ct), aff(ct))
