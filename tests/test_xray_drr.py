"""DRR renderers against closed-form line integrals and point sources."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.errors import MedregError
from medreg.xray.drr import (
    MU_WATER,
    DRRRenderer,
    attenuation_volume,
    crop_to_body,
    march,
    pixel_uv,
    render_reference,
)
from medreg.xray.geometry import (
    CArmGeometry,
    backproject,
    canonical_pose,
    pose_from_params,
    project,
)

GEOM = CArmGeometry(width=48, height=40, pixel_size=4.0)
CENTRE = np.array([12.0, -6.0, 30.0])
SIGMA = 12.0


def gaussian_mu(grid: Grid, centre: np.ndarray, sigma: float, amp: float) -> Image:
    pts = grid.world_points(torch.float64)
    r2 = ((pts - torch.as_tensor(centre)) ** 2).sum(-1)
    return Image((amp * torch.exp(-r2 / (2 * sigma**2)))[None].float(), grid)


def analytic_gaussian(pose, centre, sigma, amp, geometry):
    """Line integral of the 3D Gaussian along every pixel ray: A s sqrt(2 pi) exp(-d^2/2s^2)."""
    uv = pixel_uv(geometry).double().numpy()
    origin, d = backproject(uv, pose, geometry)
    v = centre - origin
    dist2 = (v**2).sum(-1) - (v * d).sum(-1) ** 2
    return amp * sigma * math.sqrt(2 * math.pi) * np.exp(-dist2 / (2 * sigma**2))


@pytest.fixture(scope="module")
def blob():
    grid = Grid((64, 60, 56), (2.0, 2.2, 2.5), (-60.0, -70.0, -40.0))
    return gaussian_mu(grid, CENTRE, SIGMA, 0.05)


@pytest.mark.parametrize("jitter", [False, True])
def test_fast_drr_matches_analytic_gaussian_line_integrals(blob, jitter):
    pose = pose_from_params(canonical_pose(CENTRE + [5, 0, -8], GEOM), (25, -10, 40),
                            (3, -4, 6), CENTRE)
    drr = DRRRenderer(blob, GEOM, jitter=jitter)(pose)[0, 0].double().numpy()
    ref = analytic_gaussian(pose, CENTRE, SIGMA, 0.05, GEOM)
    assert drr.shape == (GEOM.height, GEOM.width)
    assert ref.max() > 1.0  # the blob is in view
    err = np.abs(drr - ref).max() / ref.max()
    assert err < 0.01, err


def test_reference_drr_matches_analytic_gaussian(blob):
    pose = canonical_pose(CENTRE, GEOM)
    ref = analytic_gaussian(pose, CENTRE, SIGMA, 0.05, GEOM)
    hu = Image((blob.tensor / MU_WATER - 1.0) * 1000.0, blob.grid)  # mu_from_hu(hu) == blob
    drr = render_reference(hu, GEOM, pose, step=0.5, supersample=1)[0, 0].double().numpy()
    assert np.abs(drr - ref).max() / ref.max() < 0.01


def test_point_source_lands_on_its_projection():
    grid = Grid((48, 48, 48), (1.5, 1.5, 1.5), (-36.0, -36.0, -36.0))
    pt = np.array([9.3, -4.1, -11.7])
    vol = gaussian_mu(grid, pt, 2.0, 1.0)
    g = CArmGeometry(width=100, height=90, pixel_size=1.0)
    pose = pose_from_params(canonical_pose(np.zeros(3), g), (10, 20, -30), (0, 0, 0), np.zeros(3))
    img = DRRRenderer(vol, g)(pose)[0, 0].double()
    w = torch.clamp(img - 0.2 * img.max(), min=0)
    vv, uu = torch.meshgrid(torch.arange(g.height, dtype=torch.float64),
                            torch.arange(g.width, dtype=torch.float64), indexing="ij")
    centroid = np.array([(w * uu).sum() / w.sum(), (w * vv).sum() / w.sum()])
    assert np.abs(centroid - project(pt, pose, g)).max() < 0.1


def test_ball_chord_lengths_from_hu_volume():
    grid = Grid((80, 80, 80), (1.0, 1.0, 1.0), (-39.5, -39.5, -39.5))
    r2 = (grid.world_points(torch.float64) ** 2).sum(-1)
    hu = torch.where(r2 < 30.0**2, 1000.0, -1000.0)[None]  # a dense ball in air
    vol = attenuation_volume(Image(hu, grid))
    g = CArmGeometry(width=40, height=40, pixel_size=2.0)
    pose = canonical_pose(np.zeros(3), g)
    drr = DRRRenderer(vol, g, jitter=False)(pose)[0, 0].double().numpy()
    origin, d = backproject(pixel_uv(g).double().numpy(), pose, g)
    dist2 = (origin**2).sum() - (-(origin * d).sum(-1)) ** 2
    chord = 2 * np.sqrt(np.clip(30.0**2 - dist2, 0, None))
    inside = chord > 20
    expected = 2 * MU_WATER * chord
    # partial-volume edges cost about one voxel of chord
    assert np.abs(drr - expected)[inside].max() < 2 * MU_WATER * 1.2
    assert np.abs(drr[~inside & (chord == 0)]).max() < 2 * MU_WATER * 1.0


def test_block_averaging_and_cropping_preserve_integrals(blob):
    hu = Image((blob.tensor / MU_WATER - 1.0) * 1000.0, blob.grid)  # so that mu == blob
    pose = canonical_pose(CENTRE, GEOM)
    full = DRRRenderer(attenuation_volume(hu), GEOM, jitter=False)(pose)
    coarse = attenuation_volume(hu, 5.0)
    assert coarse.grid.spacing == (4.0, 4.4, 5.0)
    small = DRRRenderer(crop_to_body(coarse, 1e-6), GEOM, jitter=False)(pose)
    # block averaging + trilinear smoothing widen the blob (variance ~ b^2/4 per axis): the
    # peak drops by about s^2 / (s^2 + b^2 / 4) ~ 4 %, the detector total is kept.
    assert abs(small.sum() / full.sum() - 1).item() < 0.01
    assert (small - full).abs().max() / full.max() < 0.05


def test_batched_poses_and_gradient(blob):
    base = canonical_pose(CENTRE, GEOM)
    poses = np.stack([pose_from_params(base, (0, 0, a), (0, 0, 0), CENTRE) for a in (0, 20)])
    r = DRRRenderer(blob, GEOM)
    both = r(poses)
    assert both.shape == (2, 1, GEOM.height, GEOM.width)
    assert torch.allclose(both[1:], r(poses[1]), atol=1e-5)
    # translation gradient of a pixel value agrees with a central finite difference
    p = torch.tensor(poses[1:], dtype=torch.float64, requires_grad=True)
    target = (slice(None), 0, 20, 27)
    r(p)[target].sum().backward()
    eps = 0.5
    for axis in range(3):
        dp = np.zeros((1, 4, 4))
        dp[0, axis, 3] = eps
        fd = (r(poses[1:] + dp)[target] - r(poses[1:] - dp)[target]).item() / (2 * eps)
        assert abs(p.grad[0, axis, 3].item() - fd) < 0.05 * abs(fd) + 1e-3


def test_pose_behind_source_is_an_error(blob):
    with pytest.raises(MedregError, match="behind"):
        march(blob.tensor[None], blob.grid, torch.eye(4)[None].double() * 1.0
              - torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 500.0], [0, 0, 0, 0]]),
              pixel_uv(GEOM), GEOM, step=1.0, offsets=None)
