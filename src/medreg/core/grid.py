"""The immutable sampling grid: size, spacing, origin and direction of an image.

Convention:
    * World space is LPS millimetres (ITK/DICOM).
    * ``index`` is a continuous voxel index ``(i, j, k)`` ordered ``(x, y, z)``.
    * ``world = origin + direction @ diag(spacing) @ index`` (ITK's definition).
    * ``norm`` is grid_sample's normalized space under ``ALIGN_CORNERS`` (voxel centres at +-1).
    * Matrices are named after what they map: ``world_from_index`` maps index -> world.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from medreg.core.axes import ALIGN_CORNERS, shape_from_size


def _as_tuple(values: Sequence[float] | np.ndarray, dtype: type, name: str) -> tuple:
    try:
        return tuple(dtype(v) for v in np.asarray(values).ravel())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"grid {name} must be a sequence of numbers, got {values!r}") from exc


@dataclass(frozen=True)
class Grid:
    """Geometry of a 2D or 3D image.

    Attributes:
        size: voxel counts ``(x, y[, z])``.
        spacing: voxel spacing in mm ``(x, y[, z])``.
        origin: world (LPS mm) position of voxel index 0.
        direction: ``dim x dim`` matrix whose columns are the index axes' world directions,
            stored row-major as a flat tuple.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def __init__(
        self,
        size: Sequence[int],
        spacing: Sequence[float] | None = None,
        origin: Sequence[float] | None = None,
        direction: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        size_t = _as_tuple(size, int, "size")
        dim = len(size_t)
        if dim not in (2, 3):
            raise ValueError(f"only 2D and 3D grids are supported, got size {size_t}")
        if any(s < 1 for s in size_t):
            raise ValueError(f"grid size must be positive in every axis, got {size_t}")
        spacing_t = _as_tuple(spacing if spacing is not None else [1.0] * dim, float, "spacing")
        origin_t = _as_tuple(origin if origin is not None else [0.0] * dim, float, "origin")
        direction_t = _as_tuple(
            direction if direction is not None else np.eye(dim), float, "direction"
        )
        if len(spacing_t) != dim or len(origin_t) != dim or len(direction_t) != dim * dim:
            raise ValueError(
                f"grid size {size_t}, spacing {spacing_t}, origin {origin_t} and direction "
                f"({len(direction_t)} values) disagree on the dimension {dim}"
            )
        if any(not np.isfinite(s) or s <= 0 for s in spacing_t):
            raise ValueError(f"grid spacing must be finite and positive, got {spacing_t}")
        if not all(np.isfinite(origin_t)):
            raise ValueError(f"grid origin must be finite, got {origin_t}")
        dmat = np.asarray(direction_t).reshape(dim, dim)
        if np.abs(dmat.T @ dmat - np.eye(dim)).max() > 1e-3:
            raise ValueError(f"grid direction must be orthonormal, got {dmat.tolist()}")
        object.__setattr__(self, "size", size_t)
        object.__setattr__(self, "spacing", spacing_t)
        object.__setattr__(self, "origin", origin_t)
        object.__setattr__(self, "direction", direction_t)

    # ----------------------------------------------------------------- basic properties
    @property
    def ndim(self) -> int:
        """Spatial dimension (2 or 3)."""
        return len(self.size)

    @property
    def shape(self) -> tuple[int, ...]:
        """Tensor spatial shape ``(D, H, W)`` / ``(H, W)``."""
        return shape_from_size(self.size)

    @property
    def numel(self) -> int:
        return int(np.prod(self.size))

    @property
    def direction_matrix(self) -> np.ndarray:
        """``(dim, dim)`` float64 direction cosines, columns = index axes in world space."""
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    @property
    def extent(self) -> np.ndarray:
        """Physical size ``size * spacing`` in mm, per index axis."""
        return np.asarray(self.size) * np.asarray(self.spacing)

    def center(self) -> np.ndarray:
        """World position of the geometric centre of the grid, ``(dim,)`` LPS mm."""
        mid = (np.asarray(self.size, dtype=np.float64) - 1.0) / 2.0
        return self.index_to_world(mid[None])[0]

    # ----------------------------------------------------------------- matrices (numpy f64)
    @cached_property
    def world_from_index(self) -> np.ndarray:
        """``(dim+1, dim+1)`` homogeneous matrix mapping voxel index -> world LPS mm."""
        d = self.ndim
        m = np.eye(d + 1)
        m[:d, :d] = self.direction_matrix @ np.diag(self.spacing)
        m[:d, d] = self.origin
        return m

    @cached_property
    def index_from_world(self) -> np.ndarray:
        """Inverse of :attr:`world_from_index`."""
        return np.linalg.inv(self.world_from_index)

    @cached_property
    def norm_from_index(self) -> np.ndarray:
        """``(dim+1, dim+1)`` index -> normalized grid_sample coordinates (ALIGN_CORNERS)."""
        d = self.ndim
        m = np.eye(d + 1)
        for a, n in enumerate(self.size):
            if ALIGN_CORNERS:
                scale = 2.0 / max(n - 1, 1)
                m[a, a], m[a, d] = scale, -1.0
            else:
                m[a, a], m[a, d] = 2.0 / n, 1.0 / n - 1.0
        return m

    @cached_property
    def index_from_norm(self) -> np.ndarray:
        return np.linalg.inv(self.norm_from_index)

    @cached_property
    def norm_from_world(self) -> np.ndarray:
        """World LPS mm -> normalized coordinates of this grid."""
        return self.norm_from_index @ self.index_from_world

    @cached_property
    def world_from_norm(self) -> np.ndarray:
        """Normalized coordinates of this grid -> world LPS mm."""
        return self.world_from_index @ self.index_from_norm

    # ----------------------------------------------------------------- point conversions
    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """``(n, dim)`` continuous indices (x, y, z) -> ``(n, dim)`` world LPS mm."""
        m = self.world_from_index
        return np.asarray(index, dtype=np.float64) @ m[:-1, :-1].T + m[:-1, -1]

    def world_to_index(self, points: np.ndarray) -> np.ndarray:
        """``(n, dim)`` world LPS mm -> ``(n, dim)`` continuous indices (x, y, z)."""
        m = self.index_from_world
        return np.asarray(points, dtype=np.float64) @ m[:-1, :-1].T + m[:-1, -1]

    def world_points(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """World coordinates of every voxel centre.

        Returns:
            ``(*shape, dim)`` tensor (``(D, H, W, 3)`` in 3D), last axis ordered (x, y, z).
        """
        axes = [torch.arange(n, dtype=torch.float64, device=device) for n in self.size]
        mesh = torch.meshgrid(*reversed(axes), indexing="ij")  # tensor order (z, y, x)
        index = torch.stack(list(reversed(mesh)), dim=-1)  # (..., dim) in (x, y, z)
        m = torch.as_tensor(self.world_from_index, dtype=torch.float64, device=device)
        world = index @ m[:-1, :-1].T + m[:-1, -1]
        return world.to(dtype)

    # ----------------------------------------------------------------- derived grids
    def with_(self, **changes) -> Grid:
        """A copy with some of size/spacing/origin/direction replaced."""
        fields = dict(size=self.size, spacing=self.spacing, origin=self.origin,
                      direction=self.direction)
        fields.update(changes)
        return Grid(**fields)

    def downsample(self, factor: float) -> Grid:
        """A coarser grid covering the same physical extent (ITK shrink convention).

        The outer voxel *boundaries* are kept: ``new_size * new_spacing == size * spacing``.
        """
        if factor < 1:
            raise ValueError(f"downsampling factor must be >= 1, got {factor}")
        size = np.maximum(np.round(np.asarray(self.size) / factor), 1).astype(int)
        spacing = self.extent / size
        shift = (spacing - np.asarray(self.spacing)) / 2.0
        origin = np.asarray(self.origin) + self.direction_matrix @ shift
        return Grid(size, spacing, origin, self.direction)

    def is_close(self, other: Grid, tol: float = 1e-4) -> bool:
        """True when both grids describe the same voxels up to ``tol`` (mm, cosines)."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def to_dict(self) -> dict:
        return dict(size=list(self.size), spacing=list(self.spacing),
                    origin=list(self.origin), direction=list(self.direction))

    def __repr__(self) -> str:
        fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        return (f"Grid(size={self.size}, spacing={fmt(self.spacing)}, origin={fmt(self.origin)}, "
                f"direction={fmt(self.direction)})")
