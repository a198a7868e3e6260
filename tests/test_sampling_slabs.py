"""3D CPU sampling split over threads (core.sampling): same values and gradients as one call."""

import pytest
import torch
import torch.nn.functional as F

from medreg.core import sampling
from medreg.core.axes import ALIGN_CORNERS


@pytest.fixture
def small_split(monkeypatch):
    monkeypatch.setattr(sampling, "SPLIT_POINTS", 10)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("depth", [5, 7, 8, 31])
def test_slabs_match_one_grid_sample_values_and_gradients(small_split, threads, depth):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(depth)
    img = torch.randn(1, 2, 9, 10, 11, dtype=torch.float64, generator=gen, requires_grad=True)
    pts = (torch.rand(1, depth, 4, 3, 3, dtype=torch.float64, generator=gen) * 2.2 - 1.1)
    pts.requires_grad_(True)
    assert sampling._slab_count(img, pts) == min(threads, depth // 2)
    ref = F.grid_sample(img, pts, align_corners=ALIGN_CORNERS, padding_mode="border")
    out = sampling.sample(img, pts, padding="border")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
    g_ref = torch.autograd.grad((ref * w).sum(), (img, pts))
    g_out = torch.autograd.grad((out * w).sum(), (img, pts))
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_point_lists_and_small_or_single_thread_work_stay_one_call(small_split):
    img = torch.randn(1, 1, 6, 6, 6)
    pts = torch.rand(1, 50, 3) * 2 - 1  # a point list (N, P, dim)
    torch.set_num_threads(2)
    ref = F.grid_sample(img, pts.reshape(1, 50, 1, 1, 3), align_corners=ALIGN_CORNERS)
    torch.testing.assert_close(sampling.sample(img, pts), ref.reshape(1, 1, 50))
    torch.set_num_threads(1)
    assert sampling._slab_count(img, pts.reshape(1, 50, 1, 1, 3)) == 1
    torch.set_num_threads(2)
    assert sampling._slab_count(img.expand(2, 1, 6, 6, 6), torch.rand(2, 50, 1, 1, 3)) == 1


def test_slabs_of_a_channel_first_view_of_the_points(small_split):
    """Points given as a permuted view of a ``(1, 3, *S)`` field (as the greedy warps do)."""
    torch.set_num_threads(2)
    img = torch.randn(1, 1, 8, 9, 10, dtype=torch.float64)
    field = torch.rand(1, 3, 7, 5, 6, dtype=torch.float64) * 2 - 1
    pts = field.permute(0, 2, 3, 4, 1)[:, 1:]  # non-contiguous, non-zero storage offset
    ref = F.grid_sample(img, pts.contiguous(), align_corners=ALIGN_CORNERS)
    torch.testing.assert_close(sampling.sample(img, pts), ref, rtol=0, atol=0)
