"""Scattered linear interpolation with its gradient, against grid_sample (the reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medreg.registration.interp import (
    PointInterpolator,
    WarpedValues,
    interp_linear,
    interp_nearest,
)


def _reference(image: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """grid_sample (border padding, align_corners) at ``(n, dim)`` voxel indices: ``(C, n)``."""
    dim = index.shape[1]
    size = torch.tensor(image.shape[1:][::-1], dtype=index.dtype)
    norm = index / (size - 1).clamp_min(1) * 2 - 1
    pts = norm.reshape(1, -1, *([1] * (dim - 1)), dim)
    out = F.grid_sample(image[None], pts, mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out.reshape(image.shape[0], -1)


@pytest.mark.parametrize("shape", [(2, 7, 9, 11), (1, 9, 11), (1, 1, 5, 6)])
def test_values_and_gradient_match_grid_sample(shape):
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(shape, dtype=torch.float64, generator=gen)
    dim = len(shape) - 1
    size = torch.tensor(shape[1:][::-1], dtype=torch.float64)
    # points inside and up to 1.5 voxels outside, so border clamping is exercised
    index = (torch.rand(400, dim, dtype=torch.float64, generator=gen) * (size + 2) - 1.5)
    index.requires_grad_()
    ref = _reference(image, index)
    ref_grad = [torch.autograd.grad(ref[c].sum(), index, retain_graph=True)[0]
                for c in range(shape[0])]
    values, grad = interp_linear(image, index.detach().T.contiguous())
    torch.testing.assert_close(values, ref, atol=1e-12, rtol=0)
    for c in range(shape[0]):
        torch.testing.assert_close(grad[:, c].T, ref_grad[c], atol=1e-12, rtol=0)


def test_exact_on_a_linear_ramp():
    z, y, x = torch.meshgrid(torch.arange(4.0), torch.arange(5.0), torch.arange(6.0),
                             indexing="ij")
    image = (2 * x - 3 * y + 0.5 * z)[None].double()
    index = torch.tensor([[1.25, 2.5, 0.75], [4.9, 0.1, 2.0]], dtype=torch.float64)
    values, grad = interp_linear(image, index.T.contiguous())
    torch.testing.assert_close(values[0], 2 * index[:, 0] - 3 * index[:, 1] + 0.5 * index[:, 2])
    torch.testing.assert_close(grad[:, 0].T, torch.tensor([[2.0, -3.0, 0.5]] * 2,
                                                          dtype=torch.float64))


def test_nearest_picks_the_voxel():
    image = torch.arange(24.0).reshape(1, 2, 3, 4)
    index = torch.tensor([[2.4, 0.6, 1.0], [9.0, -3.0, 0.2]]).T.contiguous()  # x, y, z rows
    # (x 2, y 1, z 1) -> 1*12 + 1*4 + 2; the second point clamps to (3, 0, 0)
    assert interp_nearest(image, index)[0].tolist() == [18.0, 3.0]


def test_warped_values_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(2, 9, 10, 11, dtype=torch.float64, generator=gen)
    points = torch.rand(3, 200, dtype=torch.float64, generator=gen) * 4
    lin = (torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(3, 3, dtype=torch.float64,
                                                                 generator=gen)).requires_grad_()
    off = torch.tensor([2.0, 3.0, 3.5], dtype=torch.float64, requires_grad=True)
    sampler = PointInterpolator(image)
    assert torch.autograd.gradcheck(lambda a, o: WarpedValues.apply(a, o, points, sampler)[0],
                                    (lin, off))


def test_warped_values_backward_matches_autograd_reference():
    """Same gradient as autograd through addmm + grid_sample, float32 and one channel."""
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(1, 12, 13, 14, generator=gen)
    points = torch.rand(3, 500, generator=gen) * 8
    lin = torch.eye(3, dtype=torch.float64) * 1.1
    off = torch.tensor([1.0, 0.5, 1.5], dtype=torch.float64)
    a1, o1 = lin.clone().requires_grad_(), off.clone().requires_grad_()
    values, index = WarpedValues.apply(a1, o1, points, PointInterpolator(image))
    (values ** 2).sum().backward()
    a2, o2 = lin.clone().requires_grad_(), off.clone().requires_grad_()
    idx = torch.addmm(o2.float()[:, None], a2.float(), points)
    ref = _reference(image, idx.T)
    (ref ** 2).sum().backward()
    torch.testing.assert_close(values, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a1.grad, a2.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(o1.grad, o2.grad, atol=1e-3, rtol=1e-4)
    assert not index.requires_grad
