"""Known smooth diffeomorphisms for tests, benchmarks and augmentation.

Convention: velocities ``(1, dim, *S)`` in mm on the given grid; ``exp(v)`` is the fixed->moving
mapping, so the matching moving image is ``fixed o exp(-v)``.
"""

from __future__ import annotations

import numpy as np
import torch

from medreg.core.grid import Grid
from medreg.deformable.filters import gaussian_smooth
from medreg.deformable.transforms import StationaryVelocityField
from medreg.errors import MedregError


def random_velocity(grid: Grid, *, mean_mm: float = 3.0, smoothness_mm: float = 12.0,
                    seed: int = 0, steps: int = 7) -> StationaryVelocityField:
    """A random smooth stationary velocity field whose mean vector length is ``mean_mm``.

    Args:
        grid: field geometry.
        mean_mm: mean vector length of ``v`` over the grid (the flow's displacement is of
            that order; the largest is about 2.5 times more).
        smoothness_mm: Gaussian correlation length of the white noise it is made from.
        seed: numpy seed.
    """
    if not (mean_mm >= 0 and smoothness_mm > 0):
        raise MedregError("random_velocity needs mean_mm >= 0 and smoothness_mm > 0")
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.standard_normal((1, grid.ndim, *grid.shape))).float()
    sigma = [smoothness_mm / s for s in grid.spacing]
    v = gaussian_smooth(noise, sigma)
    v = v * (mean_mm / v.norm(dim=1).mean().clamp_min(1e-12))
    return StationaryVelocityField(grid, v, steps)
