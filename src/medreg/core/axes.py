"""Axis-order and sampling conventions, defined once.

Convention:
    * Tensors are ``(N, C, [D,] H, W)``: the last tensor axis is x, then y, then z.
    * Coordinate vectors, sizes, spacings and indices are ``(x, y[, z])``.
    * Normalized coordinates are those of :func:`torch.nn.functional.grid_sample` with
      ``align_corners=ALIGN_CORNERS``: -1 and +1 are the centres of the first and last voxel.

Every conversion between tensor-axis order and coordinate order goes through
:func:`shape_from_size` / :func:`size_from_shape` / :func:`index_from_flat` and the vector /
channel permutations in this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: The one ``align_corners`` policy of medreg: voxel centres sit exactly on -1 and +1.
ALIGN_CORNERS: bool = True


def shape_from_size(size: Sequence[int]) -> tuple[int, ...]:
    """Tensor spatial shape ``(D, H, W)`` from a coordinate-ordered size ``(x, y, z)``."""
    return tuple(int(s) for s in reversed(tuple(size)))


def tensor_order(values: Sequence[float]) -> tuple[float, ...]:
    """Per-axis values given in coordinate order ``(x, y, z)`` -> tensor-axis order ``(z, y, x)``.

    Use it for spacings, sigmas or windows that must follow the tensor's spatial axes.
    """
    return tuple(float(v) for v in reversed(tuple(values)))


def size_from_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Coordinate-ordered size ``(x, y, z)`` from a tensor spatial shape ``(D, H, W)``."""
    return tuple(int(s) for s in reversed(tuple(shape)))


def tensor_axis(coord_axis: int, ndim: int) -> int:
    """Index of the spatial tensor axis (0-based within the spatial dims) holding coordinate axis.

    Example: in 3D coordinate axis 0 (x) is spatial tensor axis 2 (W).
    """
    if not 0 <= coord_axis < ndim:
        raise ValueError(f"coordinate axis {coord_axis} out of range for {ndim}D")
    return ndim - 1 - coord_axis


def vectors_to_channels(vectors: torch.Tensor) -> torch.Tensor:
    """``(N, *spatial, dim)`` vectors -> ``(N, dim, *spatial)``; channel order stays (x,y,z)."""
    ndim = vectors.ndim - 2
    return vectors.permute(0, ndim + 1, *range(1, ndim + 1))


def channels_to_vectors(field: torch.Tensor) -> torch.Tensor:
    """``(N, dim, *spatial)`` -> ``(N, *spatial, dim)``; channel order stays (x,y,z)."""
    ndim = field.ndim - 2
    return field.permute(0, *range(2, ndim + 2), 1)


def xyz_to_tensor_order(points: torch.Tensor) -> torch.Tensor:
    """Reverse the last axis: ``(..., (x, y, z))`` -> ``(..., (z, y, x))`` (and back)."""
    return points.flip(-1)


def index_from_flat(flat: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(n,)`` flat indices into a contiguous ``(..., H, W)`` tensor -> ``(n, dim)`` integer
    indices in coordinate order ``(x, y[, z])`` (x varies fastest in memory)."""
    # int32 division is about twice as fast as int64 on the CPU; exact below 2**31 voxels
    out, rest = [], flat.int() if math.prod(size) < 2**31 else flat
    for n in size:
        q = torch.div(rest, n, rounding_mode="floor")
        out.append(rest - q * n)
        rest = q
    return torch.stack(out, dim=-1).to(flat.dtype)
