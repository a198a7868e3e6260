"""Per-level data for coarse-to-fine field optimization.

Convention:
    * Level ``factor`` f: the fixed grid downsampled by f (ITK shrink convention, same extent),
      images smoothed with a Gaussian of ``0.5 f`` voxels (of the full-resolution grid) first.
    * Moving images stay on their own (downsampled) grid and are sampled through the
      transform; nothing is resampled twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.deformable.filters import gaussian_smooth
from medreg.errors import MedregError
from medreg.resample import resample


def normalize_intensity(image: Image, lo_pct: float = 0.5, hi_pct: float = 99.5) -> Image:
    """First channel as float32 mapped so the given percentiles become 0 and 1."""
    data = image.tensor[:1].float()
    flat = data.reshape(-1)
    sub = flat[:: max(1, flat.numel() // 1_000_000)].numpy()
    lo, hi = np.percentile(sub, [lo_pct, hi_pct])
    scale = float(hi - lo) if hi > lo else float(np.abs(sub).max() or 1.0)
    return image.with_tensor((data - float(lo)) / scale)


def smooth_downsample(image: Image, factor: float, grid: Grid | None = None) -> Image:
    """Gaussian-smoothed (sigma ``0.5 factor`` voxels) image resampled to the coarser grid."""
    if factor <= 1 and grid is None:
        return image
    sigma = 0.5 * factor if factor > 1 else 0.0
    smoothed = image.with_tensor(gaussian_smooth(image.tensor[None].float(), sigma)[0])
    return resample(smoothed, grid or image.grid.downsample(factor), interpolation="linear")


def doubled_grid(grid: Grid) -> Grid:
    """The grid of 2x2(x2) blocks of ``grid``'s voxels, for fields twice as coarse.

    Spacing doubled and ``ceil(n / 2)`` voxels along each axis of two or more voxels (others
    kept): block ``k`` covers voxels ``2k`` and ``2k + 1``, so for an odd size the last block
    reaches one voxel beyond the grid. ``Grid.downsample(2)`` gives the same grid for even
    sizes; for odd ones it stretches the spacing instead, after which neither averaging down
    nor interpolating up works on whole blocks.
    """
    factors = np.array([2 if n > 1 else 1 for n in grid.size])
    size = -(-np.asarray(grid.size) // factors)
    spacing = np.asarray(grid.spacing) * factors
    origin = np.asarray(grid.origin) + grid.direction_matrix @ ((spacing - grid.spacing) / 2)
    return Grid(size, spacing, origin, grid.direction)


def doubling_factors(field_grid: Grid, grid: Grid, tol: float = 1e-5) -> tuple[int, ...] | None:
    """Per-axis factors (tensor order) when ``field_grid`` is :func:`doubled_grid` of ``grid``
    or ``grid`` itself along each axis (factor 1), else ``None``."""
    if not np.allclose(field_grid.direction, grid.direction, atol=1e-6):
        return None
    out = []
    for n, m, s, t in zip(grid.size, field_grid.size, grid.spacing, field_grid.spacing,
                          strict=True):
        f = int(round(t / s))
        if f not in (1, 2) or abs(t - f * s) > tol * s or m != -(-n // f):
            return None
        out.append(f)
    shift = grid.direction_matrix @ ((np.asarray(field_grid.spacing) - grid.spacing) / 2)
    if not np.allclose(np.asarray(grid.origin) + shift, field_grid.origin,
                       atol=tol * min(grid.spacing)):
        return None
    return tuple(out[::-1])


@dataclass
class Level:
    """Images of one pyramid level.

    Attributes:
        factor: downsampling factor of the fixed grid.
        fixed: ``(1, *S)`` image on the level grid (normalized intensities).
        moving: ``(1, *S_m)`` image on the moving level grid.
        mask: ``(1, 1, *S)`` fixed-space mask on the level grid, or ``None``.
        field_grid: grid on which the level's fields live.
        moving_mask: ``(1, 1, *S_m)`` moving-space mask on the moving level grid, or ``None``.
    """

    factor: float
    fixed: Image
    moving: Image
    mask: torch.Tensor | None
    field_grid: Grid
    moving_mask: torch.Tensor | None = None

    @property
    def grid(self) -> Grid:
        return self.fixed.grid


def build_levels(fixed: Image, moving: Image, factors: tuple[float, ...], *,
                 field_factor: float = 1.0, mask: Image | None = None,
                 moving_mask: Image | None = None, relative_fields: bool = False) -> list[Level]:
    """Coarse-to-fine levels for ``factors`` (e.g. ``(4, 2, 1)``).

    Args:
        mask, moving_mask: optional masks on the fixed / moving grids (resampled linearly to
            each level's fixed / moving grid).
        field_factor: fields live on the fixed grid downsampled by ``max(f, field_factor)``
            (a coarser velocity grid is smooth anyway and integrates several times faster),
            or by ``f * field_factor`` with ``relative_fields`` (every level's fields
            ``field_factor`` times coarser than its images; for a factor of 2 the
            :func:`doubled_grid` of the level grid, so fields move between the grids by whole
            blocks).
    """
    if not factors or any(f < 1 for f in factors):
        raise MedregError(f"pyramid factors must be >= 1, got {list(factors)}")
    if fixed.ndim != moving.ndim:
        raise MedregError(f"fixed is {fixed.ndim}D but moving is {moving.ndim}D")
    if field_factor < 1:
        raise MedregError(f"field_factor must be >= 1, got {field_factor}")
    f_norm, m_norm = normalize_intensity(fixed), normalize_intensity(moving)
    levels = []
    for f in factors:
        fx = smooth_downsample(f_norm, f)
        mv = smooth_downsample(m_norm, f)
        mk = None
        if mask is not None:
            mk = resample(mask.float(), fx.grid, interpolation="linear").tensor[None]
        mm = None
        if moving_mask is not None:
            mm = resample(moving_mask.float(), mv.grid, interpolation="linear").tensor[None]
        ff = f * field_factor if relative_fields else max(f, field_factor)
        fg = doubled_grid(fx.grid) if relative_fields and field_factor == 2 else \
            fixed.grid.downsample(ff)
        levels.append(Level(float(f), fx, mv, mk, fg, mm))
    return levels
