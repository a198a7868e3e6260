"""Shared fixtures: seeded randomness, paths to ../shared/data, small synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNI_T1 = SHARED / "brain/mni152_2009a/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
ITK2D = SHARED / "2d/itk"


def need(path: Path) -> Path:
    """Skip (with the reason) when the shared data folder is not beside the checkout."""
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(1)


def oblique_grid(size, spacing=None, origin=None, angle_deg: float = 20.0):
    """A grid with non-identity spacing, origin and a rotated direction."""
    from scipy.spatial.transform import Rotation

    from medreg import Grid

    d = len(size)
    spacing = spacing or [0.9, 1.3, 2.1][:d]
    origin = origin or [-12.5, 30.25, 7.0][:d]
    if d == 2:
        a = np.deg2rad(angle_deg)
        direction = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    else:
        direction = Rotation.from_euler("zyx", [angle_deg, -11, 7], degrees=True).as_matrix()
    return Grid(size, spacing, origin, direction)


def blob_image(grid, seed: int = 0):
    """Smooth random image on ``grid`` (float32), a few Gaussian blobs."""
    from medreg import Image

    rng = np.random.default_rng(seed)
    pts = grid.world_points(torch.float64)
    lo = pts.reshape(-1, grid.ndim).min(0).values
    hi = pts.reshape(-1, grid.ndim).max(0).values
    out = torch.zeros(grid.shape, dtype=torch.float64)
    width = float((hi - lo).min()) / 10  # blobs fade out well inside the field of view
    for _ in range(8):
        c = lo + torch.as_tensor(rng.uniform(0.3, 0.7, grid.ndim)) * (hi - lo)
        out += rng.uniform(0.5, 1.5) * torch.exp(-((pts - c) ** 2).sum(-1) / (2 * width**2))
    return Image(out[None].float(), grid)
