"""The one place where medreg calls ``grid_sample`` / ``affine_grid``.

Convention:
    * ``norm_points`` are ``(N, *P, dim)`` normalized coordinates ordered (x, y[, z]) under
      :data:`~medreg.core.axes.ALIGN_CORNERS`.
    * ``theta`` matrices map *output* normalized coordinates to *input* normalized coordinates.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medreg.core.axes import ALIGN_CORNERS
from medreg.core.grid import Grid

_MODES = {"linear": "bilinear", "nearest": "nearest"}


def sample(tensor: torch.Tensor, norm_points: torch.Tensor, *, mode: str = "linear",
           padding: str = "zeros") -> torch.Tensor:
    """Sample ``(N, C, *S)`` at ``(N, *P, dim)`` normalized points -> ``(N, C, *P)``.

    ``P`` may have any number of axes; they are flattened into grid_sample's layout.
    """
    n, dim = norm_points.shape[0], norm_points.shape[-1]
    spatial = tensor.ndim - 2
    if dim != spatial:
        raise ValueError(f"{dim}-D points cannot sample a {spatial}-D image")
    pshape = norm_points.shape[1:-1]
    pts = norm_points
    if len(pshape) != spatial:
        pts = norm_points.reshape(n, -1, *([1] * (spatial - 1)), dim)
    pts = pts.to(tensor.dtype)
    slabs = _slab_count(tensor, pts)
    if slabs > 1:
        out = _sample_in_slabs(tensor, pts, slabs, mode, padding)
    else:
        out = F.grid_sample(tensor, pts, mode=_MODES[mode], padding_mode=padding,
                            align_corners=ALIGN_CORNERS)
    return out.reshape(n, tensor.shape[1], *pshape)


#: Points times channels per 3D sample call above which the CPU work is split over the
#: intra-op threads.
SPLIT_POINTS = 50_000


def _slab_count(tensor: torch.Tensor, pts: torch.Tensor) -> int:
    """Slabs for a 3D CPU ``grid_sample`` of one batch item (ATen runs it on one thread per
    batch item, so a single large volume would use one core)."""
    k = torch.get_num_threads()
    if (k < 2 or tensor.ndim != 5 or tensor.shape[0] != 1 or tensor.device.type != "cpu"
            or pts[0, ..., 0].numel() * tensor.shape[1] < SPLIT_POINTS):
        return 1
    return max(1, min(k, pts.shape[1] // 2))


def _sample_in_slabs(tensor: torch.Tensor, pts: torch.Tensor, k: int, mode: str,
                     padding: str) -> torch.Tensor:
    """``grid_sample`` of ``(1, C, *S)`` at ``(1, Do, Ho, Wo, 3)`` points as ``k`` batch items.

    The first output axis is cut into ``k`` equal slabs of ``c`` slices starting every ``s``
    slices (``s (k - 1) + c = Do``, so neighbours may overlap): a strided view of the points
    and a stride-0 view of the image, no copies. Returns ``(1, C, Do, Ho, Wo)``.
    """
    d = pts.shape[1]
    c = -(-d // k)
    while (d - c) % (k - 1):
        c += 1
    s = (d - c) // (k - 1)
    st = pts.stride()
    slabs = pts.as_strided((k, c, *pts.shape[2:]), (s * st[1], *st[1:]))
    out = F.grid_sample(tensor.expand(k, *tensor.shape[1:]), slabs, mode=_MODES[mode],
                        padding_mode=padding, align_corners=ALIGN_CORNERS)
    parts = [out[i:i + 1, :, :s] for i in range(k - 1)] + [out[k - 1:]]
    return torch.cat(parts, dim=2)


def theta_between(out_grid: Grid, in_grid: Grid, world_matrix: np.ndarray | torch.Tensor,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(dim, dim+1)`` theta for ``affine_grid``: output norm -> world -> T -> input norm.

    Args:
        world_matrix: ``(dim+1, dim+1)`` fixed-world -> moving-world matrix (may carry grad).
    """
    m = torch.as_tensor(world_matrix)
    dev = m.device
    wfn = torch.as_tensor(out_grid.world_from_norm, dtype=m.dtype, device=dev)
    nfw = torch.as_tensor(in_grid.norm_from_world, dtype=m.dtype, device=dev)
    return (nfw @ m @ wfn)[:-1].to(dtype)


def affine_norm_grid(theta: torch.Tensor, grid: Grid, dtype: torch.dtype) -> torch.Tensor:
    """``(1, *grid.shape, dim)`` normalized sampling points for an affine ``theta``."""
    size = (1, 1, *grid.shape)
    return F.affine_grid(theta[None].to(dtype), list(size), align_corners=ALIGN_CORNERS)


def _norm_centres(n: int) -> torch.Tensor:
    """``(n,)`` float64 normalized voxel centres of one axis, as ``affine_grid`` makes them."""
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    x = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    return x if ALIGN_CORNERS else x * ((n - 1) / n)


def affine_norm_ramps(theta: torch.Tensor, shape: tuple[int, ...]) -> list[list[torch.Tensor]]:
    """``affine_norm_grid(theta)`` as broadcastable 1D terms: ``grid[..., k] = sum(ramps[k])``.

    Lets a caller add an affine sampling grid to a field in place, one broadcast ramp per axis,
    instead of storing the ``(1, *S, dim)`` grid.

    Args:
        theta: ``(dim, dim+1)`` output-normalized -> input-normalized map, as for
            :func:`affine_norm_grid`.
        shape: the output tensor shape ``S`` (``(D, H, W)`` or ``(H, W)``).

    Returns:
        per output coordinate ``k``, ``dim`` tensors shaped to broadcast over ``S``; the
        constant ``theta[k, dim]`` is folded into the first.
    """
    d = len(shape)
    th = theta.to(torch.float64)
    out = []
    for k in range(d):
        ramps = []
        for a in range(d):  # coordinate a runs along tensor axis d - 1 - a
            n = shape[d - 1 - a]
            x = _norm_centres(n)
            term = th[k, a] * x + (th[k, d] if a == 0 else 0.0)
            view = [1] * d
            view[d - 1 - a] = n
            ramps.append(term.to(torch.float32).reshape(view))
        out.append(ramps)
    return out


def apply_homogeneous(matrix, points: torch.Tensor) -> torch.Tensor:
    """``(..., dim)`` points through a ``(dim+1, dim+1)`` homogeneous matrix (numpy or torch),
    in the points' dtype and device (e.g. ``grid.world_from_index`` on ``(x, y, z)`` indices)."""
    m = torch.as_tensor(matrix, dtype=points.dtype, device=points.device)
    return points @ m[:-1, :-1].T + m[:-1, -1]


def world_to_norm(points: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``(..., dim)`` world LPS mm -> normalized coordinates of ``grid``."""
    return apply_homogeneous(grid.norm_from_world, points)


def inside_fov(norm_points: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Boolean ``(...)``: point lies in the voxel extent ``[-0.5, size - 0.5]`` (ITK's rule).

    Index and normalized coordinates differ by a per-axis scale and shift, so the test is a
    per-axis bound on the normalized coordinates.
    """
    return inside_bounds(norm_points, *norm_bounds(grid, norm_points.dtype, norm_points.device))


def inside_bounds(norm_points: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Boolean ``(...)``: ``lo <= norm_points <= hi`` on every axis (bounds from
    :func:`norm_bounds`)."""
    ok = (norm_points >= lo) & (norm_points <= hi)
    out = ok[..., 0]
    for axis in range(1, ok.shape[-1]):  # cheaper than .all(-1) over a length-3 axis
        out = out & ok[..., axis]
    return out


#: Slack of the field-of-view test, so voxel-boundary points count as inside.
_FOV_SLACK = 1e-6


def index_bounds(grid: Grid, dtype: torch.dtype, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dim,)`` voxel-index bounds of the field of view, ``-0.5`` and ``size - 0.5`` per axis
    (ITK's rule, axes ordered x, y[, z]), widened by a tiny slack."""
    size = torch.as_tensor(grid.size, dtype=dtype, device=device)
    return torch.full_like(size, -0.5 - _FOV_SLACK), size - 0.5 + _FOV_SLACK


def norm_bounds(grid: Grid, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dim,)`` normalized coordinates of index ``-0.5`` and ``size - 0.5`` per axis."""
    m = np.asarray(grid.norm_from_index, dtype=np.float64)
    size = np.asarray(grid.size, dtype=np.float64)
    a = m[:-1, :-1] @ np.full(len(size), -0.5) + m[:-1, -1]
    b = m[:-1, :-1] @ (size - 0.5) + m[:-1, -1]
    lo, hi = np.minimum(a, b) - _FOV_SLACK, np.maximum(a, b) + _FOV_SLACK
    return (torch.as_tensor(lo, dtype=dtype, device=device),
            torch.as_tensor(hi, dtype=dtype, device=device))
