"""Jacobian determinant statistics and inverse consistency of a transform on a grid.

Convention:
    * Transforms map fixed world points to moving world points (LPS mm); the Jacobian is that
      of ``T`` at the voxel centres of ``grid`` (world derivatives, see
      :func:`medreg.deformable.fields.jacobian_matrix`). ``det J > 1`` means the fixed-space
      neighbourhood maps onto a larger moving-space volume.
"""

from __future__ import annotations

import torch

from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.deformable.fields import jacobian_determinant
from medreg.deformable.transforms import dense_from_transform
from medreg.errors import MedregError
from medreg.transforms.base import Transform


def _mask(mask: Image | torch.Tensor | None, grid: Grid) -> torch.Tensor | None:
    if mask is None:
        return None
    t = mask.tensor if isinstance(mask, Image) else mask
    t = t.reshape(grid.shape) if t.numel() == grid.numel else None
    if t is None:
        raise MedregError(f"mask does not match the evaluation grid {grid.shape}")
    return t > 0


def jacobian_map(transform: Transform, grid: Grid) -> Image:
    """``(1, *S)`` float32 image of ``det J_T`` at the voxel centres of ``grid``."""
    u = dense_from_transform(transform, grid, torch.float64).field
    return Image(jacobian_determinant(u, grid).float()[None], grid)


def folding_percent(jac: Image, mask: Image | torch.Tensor | None = None) -> float:
    """Percentage of voxels (inside ``mask``) with ``det J <= 0``."""
    det = jac.tensor[0]
    m = _mask(mask, jac.grid)
    vals = det if m is None else det[m]
    return 100.0 * float((vals <= 0).sum()) / max(vals.numel(), 1)


def std_log_jacobian(jac: Image, mask: Image | torch.Tensor | None = None) -> float:
    """Standard deviation of ``log det J`` over voxels with ``det J > 0`` (inside ``mask``)."""
    det = jac.tensor[0].double()
    m = _mask(mask, jac.grid)
    vals = det if m is None else det[m]
    vals = vals[vals > 0]
    return float(vals.log().std()) if vals.numel() > 1 else 0.0


def jacobian_stats(transform: Transform, grid: Grid, mask: Image | torch.Tensor | None = None
                   ) -> dict[str, float]:
    """``folding_percent``, ``std_log_jacobian``, ``min``/``max`` of det J in one dict."""
    jac = jacobian_map(transform, grid)
    det = jac.tensor[0]
    m = _mask(mask, grid)
    vals = det if m is None else det[m]
    return dict(folding_percent=folding_percent(jac, mask), std_log_jacobian=std_log_jacobian(
        jac, mask), det_min=float(vals.min()), det_max=float(vals.max()))


def inverse_consistency(forward: Transform, inverse: Transform, grid: Grid,
                        mask: Image | torch.Tensor | None = None) -> dict[str, float]:
    """``|inverse(forward(x)) - x|`` (mm) over the voxel centres ``x`` of ``grid``.

    Returns:
        ``mean``, ``p95`` and ``max`` in mm.
    """
    pts = grid.world_points(torch.float64)
    with torch.no_grad():
        back = inverse(forward(pts.float()).float()).double()
    err = (back - pts).norm(dim=-1)
    m = _mask(mask, grid)
    vals = (err if m is None else err[m]).reshape(-1)
    p95 = float(vals.sort().values[int(0.95 * (vals.numel() - 1))])
    return dict(mean=float(vals.mean()), p95=p95, max=float(vals.max()))
