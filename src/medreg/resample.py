"""Resampling an image onto any grid through any transform.

Convention:
    ``out(x) = image(T(x))`` for every voxel centre ``x`` of ``grid`` (fixed world -> moving
    world). Points that ``T`` sends outside the image's voxel extent ``[-0.5, size - 0.5]`` get
    ``fill`` (default 0); inside it, values beyond the last voxel centre repeat the border
    (ITK's ResampleImageFilter behaviour).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from medreg.core.axes import xyz_to_tensor_order
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.core.sampling import (
    affine_norm_grid,
    inside_fov,
    sample,
    theta_between,
    world_to_norm,
)
from medreg.transforms.base import Transform, parameter_dtype

INTERPOLATIONS = ("linear", "nearest", "bspline")


def _norm_points(image: Image, grid: Grid, transform: Transform | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """``(1, *grid.shape, dim)`` positions in the image's normalized space."""
    dev = image.device
    if transform is None or transform.is_linear:
        m = (torch.eye(grid.ndim + 1, dtype=torch.float64) if transform is None
             else transform.matrix().detach().to(torch.float64).cpu())
        theta = theta_between(grid, image.grid, m)
        return affine_norm_grid(theta.to(dev), grid, dtype)
    pts = grid.world_points(torch.float64, dev)
    with torch.no_grad():
        moved = transform(pts.to(parameter_dtype(transform)))
    return world_to_norm(moved.to(torch.float64), image.grid).to(dtype)[None]




def resample(image: Image, grid: Grid | None = None, transform: Transform | None = None, *,
             interpolation: str = "linear", fill: float = 0.0) -> Image:
    """Resample ``image`` onto ``grid`` through ``transform`` (``out(x) = image(T(x))``).

    Args:
        image: the moving image, ``(C, *S)``.
        grid: output geometry (default: the image's own grid).
        transform: fixed->moving transform; ``None`` means identity.
        interpolation: ``linear``, ``nearest`` (label values kept exactly) or ``bspline``
            (cubic B-spline).
        fill: value for points outside the image.

    Returns:
        ``Image`` on ``grid``; integer inputs keep their dtype with ``nearest``, other
        interpolations return float32 (float64 stays float64).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose from "
                         f"{', '.join(INTERPOLATIONS)}")
    grid = grid or image.grid
    if grid.ndim != image.ndim:
        raise ValueError(f"cannot resample a {image.ndim}D image onto a {grid.ndim}D grid")
    if transform is not None and transform.ndim != grid.ndim:
        raise ValueError(f"a {transform.ndim}D transform cannot map a {grid.ndim}D grid")
    out_dtype = image.dtype if image.dtype == torch.float64 else torch.float32
    if interpolation == "nearest":
        # float64 keeps integer labels exact up to 2**53
        work = image.tensor.to(torch.float64)
        norm = _norm_points(image, grid, transform, torch.float64)
        vals = sample(work[None], norm, mode="nearest", padding="border")[0]
        out_dtype = image.dtype
    else:
        norm = _norm_points(image, grid, transform, torch.float64 if interpolation == "bspline"
                            else torch.float32 if out_dtype == torch.float32 else torch.float64)
        work = image.tensor.to(norm.dtype)
        if interpolation == "linear":
            vals = sample(work[None], norm, mode="linear", padding="border")[0]
        else:
            vals = _bspline(work, norm[0], image.grid)
    inside = inside_fov(norm[0].to(torch.float64), image.grid)
    vals = torch.where(inside[None], vals, torch.as_tensor(fill, dtype=vals.dtype))
    if not out_dtype.is_floating_point:
        vals = vals.round()
    return Image(vals.to(out_dtype), grid)


def _bspline(data: torch.Tensor, norm: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Cubic B-spline interpolation (scipy) of ``(C, *S)`` at ``(*P, dim)`` norm points."""
    m = torch.as_tensor(grid.index_from_norm, dtype=torch.float64)
    idx = norm.to(torch.float64).cpu() @ m[:-1, :-1].T + m[:-1, -1]  # (x, y, z) indices
    coords = xyz_to_tensor_order(idx).movedim(-1, 0).numpy()  # tensor-axis order for scipy
    arr = data.detach().cpu().numpy().astype(np.float64)
    out = np.stack([ndimage.map_coordinates(ch, coords, order=3, mode="mirror") for ch in arr])
    return torch.from_numpy(out).to(data.device)
