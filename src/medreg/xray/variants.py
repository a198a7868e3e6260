"""Realistic patient variants of one CT: smooth deformations, intensity and noise changes.

A variant is ``V(x) = a(CT(phi(x)))`` on a working grid, with

* ``phi(x) = c + S (x - c) + u(x)``: an anisotropic scaling ``S`` (body size, +-``scale`` per
  axis) about the centre ``c`` plus a smooth random displacement ``u`` (a coarse random lattice,
  control points every ``lattice_mm``, amplitude ``amplitude`` mm, upsampled trilinearly after
  Gaussian smoothing);
* ``a``: bone density change (HU above 200 scaled by ``1 +- bone``), soft-tissue contrast change,
  and Gaussian noise of ``noise`` HU (CT noise, mildly smoothed).

Landmarks move with the anatomy: a CT point ``p`` sits in the variant at ``x`` with
``phi(x) = p``, found by fixed-point iteration ``x <- c + S^-1 (p - u(x) - c)``.
Training variants and held-out test variants use disjoint seeds (:data:`TEST_SEEDS`).

Convention: world LPS mm; the working grid keeps the CT's direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.core.sampling import sample, world_to_norm

#: Seeds reserved for held-out test patients; training uses seeds from 0 upward, below 1000.
TEST_SEEDS = (1001, 1002, 1003, 1004, 1005, 1006)


@dataclass(frozen=True)
class VariantParams:
    """Strength of the random changes (see the module docstring)."""

    amplitude: float = 6.0
    lattice_mm: float = 60.0
    scale: float = 0.05
    bone: float = 0.15
    soft: float = 0.1
    noise: float = 15.0


@dataclass
class Variant:
    """A variant CT (HU) and the deformation that maps its points to the source CT."""

    ct: Image
    seed: int
    center: np.ndarray
    scale: np.ndarray
    disp: torch.Tensor  # (1, 3, d, h, w) displacement lattice (mm), channels (x, y, z)
    disp_grid: Grid

    def _u(self, points: np.ndarray) -> np.ndarray:
        pts = torch.as_tensor(np.asarray(points, float))[None]
        n = world_to_norm(pts, self.disp_grid)
        return sample(self.disp, n, padding="border")[0].T.numpy()

    def phi(self, points: np.ndarray) -> np.ndarray:
        """``(n, 3)`` variant world -> source-CT world."""
        p = np.asarray(points, float)
        return self.center + (p - self.center) * self.scale + self._u(p)

    def from_source(self, points: np.ndarray, iterations: int = 30) -> np.ndarray:
        """``(n, 3)`` source-CT points -> their positions in the variant (inverse of ``phi``)."""
        p = np.asarray(points, float)
        x = p.copy()
        for _ in range(iterations):
            x = self.center + (p - self._u(x) - self.center) / self.scale
        return x


def working_grid(ct: Image, voxel_mm: float) -> Grid:
    """The CT's extent on voxels of about ``voxel_mm`` (never finer than the CT)."""
    g = ct.grid
    k = np.maximum(1, np.round(voxel_mm / np.asarray(g.spacing)))
    size = np.maximum(2, np.floor(np.asarray(g.size) / k)).astype(int)
    spacing = np.asarray(g.spacing) * k
    origin = np.asarray(g.origin) + g.direction_matrix @ ((k - 1) / 2 * np.asarray(g.spacing))
    return Grid(size, spacing, origin, g.direction)


def _lattice(grid: Grid, params: VariantParams, rng: np.random.Generator
             ) -> tuple[torch.Tensor, Grid]:
    ext = grid.extent
    n = np.maximum(3, np.ceil(ext / params.lattice_mm).astype(int) + 1)
    lg = Grid(n, ext / (n - 1), grid.index_to_world(np.full((1, 3), -0.5))[0], grid.direction)
    d = torch.as_tensor(rng.normal(0.0, params.amplitude, (1, 3, *lg.shape)), dtype=torch.float32)
    d = F.avg_pool3d(F.pad(d, (1,) * 6, mode="replicate"), 3, stride=1)  # mild smoothing
    return d, lg


def make_variant(ct: Image, seed: int, *, voxel_mm: float = 1.5,
                 params: VariantParams = VariantParams()) -> Variant:
    """Make one variant of ``ct`` (HU) on a working grid of about ``voxel_mm``.

    Args:
        ct: 3D CT in HU.
        seed: random seed (see :data:`TEST_SEEDS`).

    Returns:
        :class:`Variant` whose ``ct`` is float32 HU ``(1, D, H, W)``.
    """
    rng = np.random.default_rng(seed)
    grid = working_grid(ct, voxel_mm)
    center = grid.center()
    scale = 1.0 + rng.uniform(-params.scale, params.scale, 3)
    disp, lg = _lattice(grid, params, rng)
    var = Variant(ct, seed, center, scale, disp, lg)
    src = torch.as_tensor(ct.tensor, dtype=torch.float32)[None]
    slabs = []
    for z in range(grid.size[2]):  # one slice at a time keeps memory small
        idx = np.stack(np.meshgrid(np.arange(grid.size[0]), np.arange(grid.size[1]), [z],
                                   indexing="xy"), -1).reshape(-1, 3).astype(float)
        pts = var.phi(grid.index_to_world(idx))
        n = world_to_norm(torch.as_tensor(pts, dtype=torch.float32)[None], ct.grid)
        slabs.append(sample(src, n, padding="border")[0, 0].reshape(grid.size[1], grid.size[0]))
    hu = torch.stack(slabs)[None]
    hu = _intensity(hu, params, rng)
    var.ct = Image(hu, grid)
    return var


def _intensity(hu: torch.Tensor, params: VariantParams, rng: np.random.Generator) -> torch.Tensor:
    bone = 1.0 + rng.uniform(-params.bone, params.bone)
    soft = 1.0 + rng.uniform(-params.soft, params.soft)
    out = torch.where(hu > 200, 200 + (hu - 200) * bone, hu)
    out = torch.where((out > -200) & (out < 200), out * soft, out)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    noise = torch.randn(hu.shape, generator=gen) * params.noise
    noise = F.avg_pool3d(noise[None], 3, stride=1, padding=1)[0] * 27**0.5  # keep the std
    return (out + noise).float()
